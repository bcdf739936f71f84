"""The core :class:`Model`: one model directory and one sequence over it.

A thin typed layer over ``moeflux._core.Context``. Evaluation returns numpy float32
logits; errors are the classes of :mod:`moeflux.errors`. Generation, tokenizer and
snapshot methods come from :class:`moeflux.features.ModelFeatures`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType
from typing import Any, Optional, Sequence, Type, Union

import numpy as np

from . import _core
from .errors import ArgumentError
from .features import ModelFeatures

TokensLike = Union[int, Sequence[int], np.ndarray]
PathLike = Union[str, os.PathLike]


def _io_kwargs(io_mode: Optional[str], io_threads: Optional[int],
               expert_cache_bytes: int, prefetch: Optional[bool]) -> dict:
    """The expert I/O options as _core.Context keywords, checked."""
    if io_mode is not None and io_mode not in ("auto", "pread", "mmap", "direct"):
        raise ArgumentError(f"io_mode must be auto, pread, mmap, direct or None, got "
                            f"{io_mode!r}")
    if io_threads is not None and (not isinstance(io_threads, int) or io_threads < 1):
        raise ArgumentError(f"io_threads must be an int >= 1 or None, got {io_threads!r}")
    if not isinstance(expert_cache_bytes, int) or expert_cache_bytes < 0:
        raise ArgumentError(f"expert_cache_bytes must be an int >= 0, got "
                            f"{expert_cache_bytes!r}")
    return {"io_mode": io_mode, "io_threads": io_threads or 0,
            "expert_cache_bytes": expert_cache_bytes,
            "prefetch": -1 if prefetch is None else int(bool(prefetch))}


class Model(ModelFeatures):
    """A loaded model directory and one sequence (context) over it.

    Attributes:
        path: the model directory.
        config: config.json as a dict.

    Example::

        with moeflux.Model("qwen3-next-dir") as m:
            logits = m.eval([1, 2, 3])          # [n_vocab] float32
            nxt = int(logits.argmax())
            logits = m.eval([nxt])              # continues the sequence

    Several Models may share one loaded model: ``Model.share(other)`` makes a second
    sequence without loading the weights again.
    """

    path: Path
    config: dict

    def __init__(self, path: Union[PathLike, "_core.ModelHandle"],
                 threads: Optional[int] = None, backend: str = "cpu",
                 n_ctx: Optional[int] = None, *, use_2bit: int = 0,
                 io_mode: Optional[str] = None, io_threads: Optional[int] = None,
                 expert_cache_bytes: int = 0, prefetch: Optional[bool] = None) -> None:
        """Load `path` and create a sequence over it.

        Args:
            path: model directory (config.json, model_weights.{bin,json},
                packed_experts/), or a ``_core.ModelHandle`` to share a loaded model.
            threads: compute threads; None = all online cores.
            backend: "cpu" (default); "cuda"/"metal" where built.
            n_ctx: maximum sequence length; None = min(4096, max_position_embeddings).
            use_2bit: 0 reads packed_experts/, 1 packed_experts_2bit/, -1 the 2-bit
                experts only when the 4-bit ones are absent.
            io_mode: how experts are read: None = "auto" (mmap when the experts fit
                in 3/4 of RAM, else pread) unless $MOEFLUX_IO says otherwise;
                "pread", "mmap" or "direct" (O_DIRECT; pread where refused). Every
                mode gives bitwise the same logits; ``stats()`` names the mode in
                effect ("io_mode") and why ("io_fallback").
            io_threads: expert I/O threads of this sequence; None = 8.
            expert_cache_bytes: in-process RAM cache of experts (LFRU); 0 = none.
            prefetch: during decode, read each layer's previous-token experts ahead;
                None = default (off).

        Raises:
            MoefluxIOError: a missing or short file (the message names it).
            FormatError: malformed JSON, unknown model_type, unsupported quantization.
            ShapeError: a tensor that does not fit config.json.
            UnsupportedError: an architecture this build does not implement.
            BackendError: an unknown or unavailable backend.
            ArgumentError: bad threads / n_ctx.
        """
        self._ctx: Optional[_core.Context] = None
        if threads is not None and threads < 1:
            raise ArgumentError(f"threads must be >= 1 or None, got {threads}")
        if n_ctx is not None and n_ctx < 1:
            raise ArgumentError(f"n_ctx must be >= 1 or None, got {n_ctx}")
        if isinstance(path, _core.ModelHandle):
            handle = path
        else:
            handle = _core.ModelHandle(os.fspath(path), backend=backend, use_2bit=use_2bit)
        self._handle = handle
        self._ctx = _core.Context(handle, n_threads=threads or 0, n_ctx=n_ctx or 0,
                                  **_io_kwargs(io_mode, io_threads, expert_cache_bytes,
                                               prefetch))
        self.config = json.loads(handle.config_json)
        self.path = Path(handle.path)

    @classmethod
    def share(cls, other: "Model", threads: Optional[int] = None,
              n_ctx: Optional[int] = None, *, io_mode: Optional[str] = None,
              io_threads: Optional[int] = None, expert_cache_bytes: int = 0,
              prefetch: Optional[bool] = None) -> "Model":
        """A new, empty sequence over the model already loaded by `other` (no second
        load: the weights mapping and expert files are shared; `other` may be closed
        later without affecting it). The expert I/O options are as for ``Model()``
        and belong to the new sequence alone."""
        if threads is not None and threads < 1:
            raise ArgumentError(f"threads must be >= 1 or None, got {threads}")
        m = cls.__new__(cls)
        m._ctx = None
        m._handle = other._handle
        m._ctx = _core.Context(other._handle, n_threads=threads or 0, n_ctx=n_ctx or 0,
                               **_io_kwargs(io_mode, io_threads, expert_cache_bytes,
                                            prefetch))
        m.config = json.loads(other._handle.config_json)   # its own copy to edit
        m.path = other.path
        return m

    # ---- evaluation

    def eval(self, tokens: TokensLike, all_logits: bool = False) -> np.ndarray:
        """Evaluate `tokens` after the current position.

        Args:
            tokens: token ids: an int, a sequence of ints, or an integer numpy array
                (int32 arrays are used without a copy).
            all_logits: return the logits of every position instead of the last.

        Returns:
            float32 array [n_vocab], or [n_tokens, n_vocab] when all_logits.

        Raises:
            ArgumentError: an id outside [0, n_vocab), no tokens, or the sequence
                would pass n_ctx. The sequence is unchanged on any error.
            KeyboardInterrupt: Ctrl-C; the sequence is unchanged.
        """
        return self._live().eval(tokens, all_logits)

    def reset(self) -> None:
        """Forget the sequence: position 0, state equal to a fresh Model's."""
        self._live().reset()

    def stats(self) -> dict:
        """Counters since creation or ``stats_reset()``.

        ``n_tokens_evaluated``; ``expert_reads`` and ``expert_bytes_read`` (blobs and
        bytes read from the expert files); ``compute_s`` (wall seconds in eval) and its
        phases ``attention_s`` (token mixers), ``routing_s``, ``io_wait_s`` (waiting for
        expert bytes; ``expert_read_s`` is the same), ``experts_s`` (routed experts),
        ``shared_s`` (shared experts, dense FFN layers) and ``head_s`` (embedding, final
        norm, head). Where the expert bytes came from: ``expert_bytes_disk`` (pread /
        O_DIRECT), ``expert_bytes_mapped`` (mmap mode), ``expert_bytes_cache`` (a slot
        that already held them: RAM cache or prefetch), ``cache_hits``,
        ``cache_misses``, ``prefetch_issued``, ``prefetch_hits``; ``io_mode`` (the mode
        in effect) and ``io_fallback`` (how it was chosen, any fallback and why)."""
        return self._live().stats()

    def stats_reset(self) -> None:
        """Zero the counters of :meth:`stats`."""
        self._live().stats_reset()

    def abort(self) -> None:
        """Stop an eval running in another thread at its next layer (AbortedError)."""
        if self._ctx is not None:
            self._ctx.abort()

    # ---- facts

    @property
    def n_vocab(self) -> int:
        """Vocabulary size (rows of the logits)."""
        return self._live().n_vocab

    @property
    def n_past(self) -> int:
        """Tokens in the sequence so far."""
        return self._live().n_past

    @property
    def n_ctx(self) -> int:
        """Maximum tokens in the sequence."""
        return self._live().n_ctx

    @property
    def n_layer(self) -> int:
        """Number of decoder layers."""
        return self._live().n_layer

    @property
    def arch(self) -> str:
        """config.json model_type."""
        return self._live().arch

    # ---- lifetime

    def close(self) -> None:
        """Free the sequence now. Idempotent; later use raises ValueError."""
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.close()

    @property
    def closed(self) -> bool:
        """True after close()."""
        return self._ctx is None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._ctx is None:
            return f"<moeflux.Model {str(getattr(self, 'path', ''))!r} closed>"
        c = self._ctx
        return (f"<moeflux.Model {str(self.path)!r} arch={c.arch} layers={c.n_layer} "
                f"vocab={c.n_vocab} n_past={c.n_past}/{c.n_ctx}>")

    def __reduce__(self) -> Any:
        raise TypeError("cannot pickle moeflux.Model (save_state() gives picklable bytes)")

    def _live(self) -> "_core.Context":
        if self._ctx is None:
            raise ValueError("Model is closed")
        return self._ctx
