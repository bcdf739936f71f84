"""The core :class:`Model`: one model directory and one sequence over it.

A thin typed layer over ``moeflux._core.Context``. Evaluation returns numpy float32
logits; errors are the classes of :mod:`moeflux.errors`. Generation, tokenizer and
snapshot methods come from :class:`moeflux.features.ModelFeatures`.
"""
from __future__ import annotations

import array
import errno
import json
import operator
import os
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Iterator, Optional, Sequence, Type, Union

import numpy as np

from . import _core
from .errors import (ArgumentError, ChecksumError, FormatError, MoefluxError,
                     MoefluxIOError, MoefluxMemoryError)
from .features import ModelFeatures

TokensLike = Union[int, Sequence[int], np.ndarray]
PathLike = Union[str, os.PathLike]


def _gpu_cache_kwargs(gpu_cache: Union[None, int, float]) -> dict:
    """ModelHandle keywords of Model's gpu_cache (see Model.__init__)."""
    if gpu_cache is None:
        return {}
    if isinstance(gpu_cache, bool) or not isinstance(gpu_cache, (int, float)):
        raise ArgumentError(f"gpu_cache must be None, a fraction (float in [0, 1]) or "
                            f"bytes (int >= 0), got {gpu_cache!r}")
    if isinstance(gpu_cache, int):
        if gpu_cache < 0:
            raise ArgumentError(f"gpu_cache bytes must be >= 0, got {gpu_cache}")
        return {"gpu_cache_bytes": gpu_cache}
    if not 0.0 <= gpu_cache <= 1.0:
        raise ArgumentError(f"gpu_cache fraction must be in [0, 1], got {gpu_cache}")
    return {"gpu_cache_fraction": float(gpu_cache)}


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
                 n_ctx: Optional[int] = None, *,
                 use_2bit: Union[None, bool, int] = None,
                 io_mode: Optional[str] = None, io_threads: Optional[int] = None,
                 expert_cache_bytes: int = 0, prefetch: Optional[bool] = None,
                 verify: Union[bool, Callable[[int, int], None]] = False,
                 gpu_experts: Optional[str] = None,
                 gpu_cache: Union[None, int, float] = None) -> None:
        """Load `path` and create a sequence over it.

        Args:
            path: model directory (config.json, model_weights.{bin,json},
                packed_experts/), or a ``_core.ModelHandle`` to share a loaded model.
            threads: compute threads; None or 0 = all online cores (the CLI's
                ``--threads 0`` means the same).
            backend: "cpu" (default), "cuda", "metal" (macOS on Apple Silicon) or
                "auto": Metal where usable, else CUDA where a device answers, else
                the CPU (``moeflux.backends()`` lists what is usable; ``backend``
                says what was chosen).
            n_ctx: maximum sequence length; None = min(4096, max_position_embeddings).
            use_2bit: which expert set to read. None (default) chooses: the 4-bit
                packed_experts/ when present, else packed_experts_2bit/. True reads
                packed_experts_2bit/, False packed_experts/ (-1 is the same as None).
            io_mode: how experts are read: None = "auto" (mmap when the experts fit
                in 3/4 of RAM, else pread; when they stream to a GPU, mmap with the
                mappings page-locked for the device's copies when they take at most
                half the RAM, else pread into pinned slots) unless $MOEFLUX_IO says
                otherwise;
                "pread", "mmap" or "direct" (O_DIRECT; pread where refused). Every
                mode gives bitwise the same logits; ``stats()`` names the mode in
                effect ("io_mode") and why ("io_fallback").
            io_threads: expert I/O threads of this sequence; None = 8.
            expert_cache_bytes: in-process RAM cache of experts (LFRU); 0 = none.
            prefetch: during decode, read each layer's previous-token experts ahead;
                None = default (off).
            verify: before opening anything, check every file moeflux.json lists
                (the expert set not in use aside) against its recorded sha256; this
                reads the whole model once. True draws a ``tqdm.auto`` bar in bytes;
                a callable is called as ``verify(done_bytes, total_bytes)`` instead.
                False (default) checks nothing and costs nothing.
            gpu_experts: where routed experts live: None = "auto" (on a backend with
                its own memory, all of them in it when they fit, else streamed),
                "resident" (copied into backend memory at load; decode routes on the
                device) or "stream" (read per token). ``stats()["io_fallback"]`` says
                "experts resident in ... memory" when they are.
            gpu_cache: the device expert cache when experts stream to a backend with
                its own memory (CUDA): routed experts kept in device memory (LFRU), so
                a repeat is neither read nor copied. None (default) = as many experts
                as fit in 85% of the device's free memory less 2 GiB; a float in
                [0, 1] = that fraction of the model's routed experts; an int = bytes
                (rounded down to whole experts); 0 = none (every expert copied).
                Ignored on the CPU and Metal (their device reads the expert slots)
                and when the experts are resident. ``stats()`` counts
                ``gpu_cache_hits``, ``gpu_cache_misses``, ``gpu_bytes_uploaded``.

        Raises:
            ChecksumError: verify found a file that differs from its recorded sum
                (the message names the file, expected and actual sums).
            MoefluxIOError: a missing or short file (the message names it).
            FormatError: malformed JSON, unknown model_type, unsupported quantization.
            ShapeError: a tensor that does not fit config.json.
            UnsupportedError: an architecture this build does not implement.
            BackendError: an unknown or unavailable backend.
            ArgumentError: bad threads / n_ctx / use_2bit / gpu_cache.
        """
        self._ctx: Optional[_core.Context] = None
        self._handle: Any = None
        self._pid = os.getpid()
        n_threads, n_ctx_c = _threads_arg(threads), _n_ctx_arg(n_ctx)
        if not (verify is True or verify is False or verify is None or callable(verify)):
            raise ArgumentError(f"verify must be True, False or a callable, got "
                                f"{verify!r}")
        if isinstance(path, _core.ModelHandle):
            handle = path
        else:
            if gpu_experts not in (None, "auto", "resident", "stream"):
                raise ArgumentError(f"gpu_experts must be auto, resident, stream or None, "
                                    f"got {gpu_experts!r}")
            cache_kw = _gpu_cache_kwargs(gpu_cache)
            which = _expert_choice(path, use_2bit)
            if verify is not False and verify is not None:
                _verify_checksums(Path(os.fspath(path)), which, verify)
            handle = _core.ModelHandle(os.fspath(path), backend=backend, use_2bit=which,
                                       gpu_experts=gpu_experts, **cache_kw)
        self._handle = handle
        self._ctx = _core.Context(handle, n_threads=n_threads, n_ctx=n_ctx_c,
                                  **_io_kwargs(io_mode, io_threads, expert_cache_bytes,
                                               prefetch))
        self._init_common(json.loads(handle.config_json), Path(handle.path))

    def _init_common(self, config: dict, path: Path) -> None:
        self.config = config
        self.path = path
        self._tokens: list[int] = []      # ids in the sequence (-1: unknown, e.g. loaded)
        self._ends: list[int] = []        # positions where an eval ended (checkpoints)
        self._gen_epoch = 0               # bumped by each generate(): see generate.py
        _LIVE.add(self)

    @classmethod
    def share(cls, other: "Model", threads: Optional[int] = None,
              n_ctx: Optional[int] = None, *, io_mode: Optional[str] = None,
              io_threads: Optional[int] = None, expert_cache_bytes: int = 0,
              prefetch: Optional[bool] = None) -> "Model":
        """A new, empty sequence over the model already loaded by `other` (no second
        load: the weights mapping and expert files are shared; `other` may be closed
        later without affecting it). The expert I/O options are as for ``Model()``
        and belong to the new sequence alone."""
        other._live()
        n_threads, n_ctx_c = _threads_arg(threads), _n_ctx_arg(n_ctx)
        m = cls.__new__(cls)
        m._ctx = None
        m._pid = os.getpid()
        m._handle = other._handle
        m._ctx = _core.Context(other._handle, n_threads=n_threads, n_ctx=n_ctx_c,
                               **_io_kwargs(io_mode, io_threads, expert_cache_bytes,
                                            prefetch))
        m._init_common(json.loads(other._handle.config_json), other.path)
        return m

    # ---- evaluation

    def eval(self, tokens: TokensLike, all_logits: bool = False, *,
             progress: Union[None, bool, Callable[[int, int], None]] = None
             ) -> np.ndarray:
        """Evaluate `tokens` after the current position.

        Args:
            tokens: token ids: an int, a sequence of ints, or an integer numpy array
                (always copied before use, so the caller may change it meanwhile).
            all_logits: return the logits of every position instead of the last.
            progress: called as ``progress(done, total)`` (token counts) while a
                long prompt is evaluated: the tokens then go in pieces of
                ``PROGRESS_CHUNK`` (the engine's 512-token prefill group, so each
                piece reads every expert once and the result is bitwise the same as
                in one call; at most 4 larger pieces, multiples of it, when the
                sequence is not empty), and once more at the end.
                True draws a ``tqdm.auto`` bar (a widget in Jupyter) instead.

        Returns:
            float32 array [n_vocab], or [n_tokens, n_vocab] when all_logits.

        Raises:
            ArgumentError: an id outside [0, n_vocab), no tokens, or the sequence
                would pass n_ctx. The sequence is unchanged on any error.
            MoefluxMemoryError: all_logits asked for a result larger than the
                memory available now (refused before anything is allocated).
            KeyboardInterrupt: Ctrl-C; the sequence is unchanged.
        """
        if progress is True:
            from .clitools import eval_progress
            bar, close = eval_progress("prompt")
            try:
                return self.eval(tokens, all_logits, progress=bar)
            finally:
                close()
        if progress is False:
            progress = None
        ctx = self._live()
        if isinstance(tokens, Iterator):
            tokens = list(tokens)   # read once, for the core and for self.tokens
        ids = _token_list(tokens)
        if ids is None:   # not plain ints: the core's checks and messages decide
            out = ctx.eval(tokens, all_logits)
            ids = _token_list_any(tokens)
            self._record(ids)
        else:
            if all_logits:
                _check_logits_fit(len(ids), ctx.n_vocab, ctx.n_past, ctx.n_ctx)
            if progress is not None and len(ids) > PROGRESS_CHUNK:
                return self._eval_chunked(ids, all_logits, progress)
            out = self._eval_recorded(ctx, ids, all_logits)
        if progress is not None:
            progress(len(ids), len(ids))
        return out

    def _eval_chunked(self, ids: list[int], all_logits: bool,
                      progress: Callable[[int, int], None]) -> np.ndarray:
        """eval in pieces (see _piece_size); on any error the sequence goes back to
        where it was by truncating to the start: position 0 always works, and a later
        start is an eval end point whose checkpoint a hybrid model still holds (the
        engine keeps the most recent ones; unless set_checkpoints(-1) turned them
        off, when the rollback raises StateError chained to the error)."""
        ctx = self._live()
        start = ctx.n_past
        step = _piece_size(len(ids), start)
        rows: list[np.ndarray] = []
        progress(0, len(ids))
        try:
            for i in range(0, len(ids), step):
                piece = ids[i:i + step]
                out = self._eval_recorded(ctx, piece, all_logits)
                rows.append(out)
                progress(i + len(piece), len(ids))
        except BaseException:
            if ctx.n_past != start:
                self.truncate(start)
            raise
        return np.concatenate(rows, axis=0) if all_logits else rows[-1]

    def _eval_recorded(self, ctx: Any, ids: list[int], all_logits: bool) -> np.ndarray:
        """ctx.eval, with self.tokens kept equal to the engine's sequence even when an
        exception comes after the engine committed (a signal handler run as the eval
        returns, whose eval could not be taken back)."""
        start = ctx.n_past
        try:
            out = ctx.eval(ids, all_logits)
        except BaseException:
            if ctx.n_past == start + len(ids):
                self._record(ids)
            raise
        self._record(ids)
        return out

    def _record(self, ids: list[int]) -> None:
        self._tokens.extend(ids)
        self._ends = (self._ends + [len(self._tokens)])[-_ENDS_KEPT:]

    @property
    def tokens(self) -> list[int]:
        """The token ids of the sequence so far (a copy; len == n_past). Positions
        restored by load_state hold -1: a snapshot keeps the state, not the ids."""
        self._live()
        return list(self._tokens)

    def reset(self) -> None:
        """Forget the sequence: position 0, state equal to a fresh Model's."""
        self._live().reset()
        self._tokens, self._ends = [], []

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
        in effect) and ``io_fallback`` (how it was chosen, any fallback and why).
        The device expert cache (streaming on CUDA, ``gpu_cache``):
        ``gpu_cache_hits`` (experts a device slot held: no read, no copy),
        ``gpu_cache_misses`` (experts read and copied), ``gpu_bytes_uploaded`` (bytes
        copied host -> device, over PCIe on a discrete GPU) and ``gpu_copy_wait_s``
        (host seconds blocked until staging slots of landed experts could be reused;
        the device's own waits for copies are not host time); all 0 without it."""
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

    @property
    def backend(self) -> str:
        """The compute backend in use: "cpu", "cuda" or "metal" (what "auto" chose)."""
        self._live()
        return self._handle.backend

    # ---- lifetime

    def close(self) -> None:
        """Free the sequence now, and the loaded model (weights mapping, expert
        files) too unless another Model shares it. Idempotent; later use raises
        ValueError."""
        ctx, self._ctx = self._ctx, None
        self._handle = None
        if ctx is not None and not getattr(self, "_forked", False):
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
        if getattr(self, "_forked", False) or getattr(self, "_pid", None) != os.getpid():
            raise MoefluxError(
                f"{self.path}: this Model was opened before fork() in the parent "
                "process; open it again in the child")
        if self._ctx is None:
            raise ValueError("Model is closed")
        return self._ctx


# ---- argument checks and helpers

# Tokens per eval when a progress callback is given: the engine's prefill group
# (MF_PREFILL_GROUP_TOK in csrc/models/decoder.h). An eval runs layer-major over groups
# of that many tokens, each MoE layer once per group; pieces cut at group boundaries
# see the same groups as one call (the same logits, bit for bit, and no expert re-read).
PROGRESS_CHUNK = 512
_ENDS_KEPT = 8         # eval end points remembered (the engine's default checkpoints)

# Every Model alive in this process, so that a fork() child can disown them (below).
_LIVE: "weakref.WeakSet[Model]" = weakref.WeakSet()


# Pieces after a start > 0, so that the start's checkpoint is still among those a
# hybrid model keeps (8 by default, fewer when 1 GiB of them is reached first).
_MAX_PIECES_AFTER_START = 4


def _piece_size(n: int, start: int) -> int:
    """Tokens per piece of a chunked eval: PROGRESS_CHUNK, or after a start > 0 as
    many as keep the piece count at _MAX_PIECES_AFTER_START (multiples of
    PROGRESS_CHUNK, the engine's prefill group, so the logits are the same as in one
    call)."""
    if start == 0:
        return PROGRESS_CHUNK
    per = -(-n // _MAX_PIECES_AFTER_START)
    return -(-per // PROGRESS_CHUNK) * PROGRESS_CHUNK


def _after_fork_in_child() -> None:
    """In a fork() child the engine's worker threads are gone and a lock may be held
    by a thread that no longer exists: touching a Model opened in the parent could
    hang. Each one is marked unusable (every use raises MoefluxError) and its C
    objects are disowned, never freed here (they are the parent's memory)."""
    for m in list(_LIVE):
        m._forked = True
        for obj in (m._ctx, m._handle):
            if obj is not None:
                obj._disown()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _threads_arg(threads: Any) -> int:
    """threads for the core: None and 0 both mean all online cores."""
    if threads is None:
        return 0
    if not _is_int(threads) or threads < 0:
        raise ArgumentError(f"threads must be an int >= 0 or None (0 and None: all "
                            f"cores), got {threads!r}")
    return int(threads)


def _n_ctx_arg(n_ctx: Any) -> int:
    if n_ctx is None:
        return 0
    if not _is_int(n_ctx) or n_ctx < 1:
        raise ArgumentError(f"n_ctx must be an int >= 1 or None, got {n_ctx!r}")
    return int(n_ctx)


def _verify_progress(verify: Any, total: int
                     ) -> tuple[Callable[[int], None], Callable[[], None]]:
    """(tick(n bytes), close) for Model(verify=...): a tqdm.auto bar for True, the
    caller's verify(done, total) for a callable."""
    if callable(verify):
        done = [0]

        def tick(n: int) -> None:
            done[0] += n
            verify(done[0], total)
        return tick, lambda: None
    from .clitools import progress_bar
    bar = progress_bar(total, "verify", unit="B", unit_scale=True, unit_divisor=1024,
                       leave=False)
    if bar is None:
        return lambda n: None, lambda: None
    return bar.update, bar.close


def _verify_checksums(path: Path, use_2bit: int, verify: Any) -> None:
    """Model(verify=...): every file moeflux.json lists, except the expert set not in
    use, hashed and compared with its recorded sum before the model is opened."""
    from moeflux.prep import checksums
    man = path / checksums.MANIFEST_NAME
    try:
        info = checksums.load_manifest(path)
    except OSError as exc:
        raise MoefluxIOError(exc.errno or errno.EIO, f"{man}: cannot read ("
                             f"{exc.strerror or exc}); verify=True checks the sums "
                             "that prep convert records there") from None
    except ValueError as exc:
        raise FormatError(f"{man}: not JSON ({exc})") from None
    expert_dir = checksums.EXPERT_DIRS[use_2bit]
    entries = checksums.skip_other_experts(checksums.listed(info), expert_dir)
    if not entries:
        raise FormatError(f"{man}: no \"checksums\" recorded, so verify=True has "
                          "nothing to check against")
    tick, close = _verify_progress(verify, checksums.total_bytes(path, entries))
    try:
        for rel, want, got in checksums.check(path, entries, tick):
            _raise_checksum(path / rel, want, got)
    finally:
        close()


def _raise_checksum(file: Path, want: str, got: str) -> None:
    if got == "missing":
        raise MoefluxIOError(errno.ENOENT, f"{file}: missing (listed in moeflux.json "
                             f"with {want})")
    if got == "unknown algorithm":
        raise FormatError(f"{file}: moeflux.json records {want!r}, an unknown checksum "
                          "algorithm (expected sha256:<hex>)")
    raise ChecksumError(f"{file}: checksum mismatch: moeflux.json records {want}, the "
                        f"file has {got} (damaged or changed since conversion; nothing "
                        "was opened)", str(file), want, got)


def _expert_choice(path: Any, use_2bit: Any) -> int:
    """use_2bit for the core, after checking the chosen expert directory: 0 reads
    packed_experts/, 1 packed_experts_2bit/."""
    if use_2bit is None or (_is_int(use_2bit) and use_2bit == -1):
        want = None
    elif isinstance(use_2bit, (bool, np.bool_)) or (_is_int(use_2bit) and use_2bit in (0, 1)):
        want = bool(use_2bit)
    else:
        raise ArgumentError(f"use_2bit must be None, True or False, got {use_2bit!r}")
    base = Path(os.fspath(path))
    d4, d2 = base / "packed_experts", base / "packed_experts_2bit"
    for d in (d4, d2):
        if d.exists() and not d.is_dir():
            raise MoefluxIOError(errno.ENOTDIR, f"{d}: is not a directory (expected "
                                 "the per-layer expert files and layout.json)")
    if want is None:
        return 1 if (d2.is_dir() and not d4.is_dir()) else 0
    chosen, other = (d2, d4) if want else (d4, d2)
    if not chosen.is_dir() and other.is_dir():
        flag = "use_2bit=False / --expert-bits 4" if want else \
            "use_2bit=True / --expert-bits 2"
        raise MoefluxIOError(errno.ENOENT, f"{chosen}: missing; this model directory "
                             f"has {other.name}/ instead ({flag})")
    return int(want)


def _token_list(tokens: Any) -> Optional[list[int]]:
    """The ids of `tokens` as a list when they are ints (validated by the core);
    None for anything else, which the core refuses with its own message."""
    if _is_int(tokens):
        return [int(tokens)]
    if isinstance(tokens, np.ndarray):
        if tokens.ndim == 1 and np.issubdtype(tokens.dtype, np.integer):
            return [int(t) for t in tokens]
        return None
    if isinstance(tokens, (list, tuple)) and all(_is_int(t) for t in tokens):
        return [int(t) for t in tokens]
    if isinstance(tokens, range) or (isinstance(tokens, array.array) and
                                     tokens.typecode in "bBhHiIlLqQ"):
        return [int(t) for t in tokens]
    return None


def _token_list_any(tokens: Any) -> list[int]:
    """After the core accepted `tokens`: their ids (any sequence of index-likes)."""
    if hasattr(tokens, "__index__"):
        return [operator.index(tokens)]
    return [operator.index(t) for t in tokens]


def _mem_available() -> Optional[int]:
    """Bytes of memory available now (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _check_logits_fit(n: int, n_vocab: int, n_past: int, n_ctx: int) -> None:
    """Refuse an all_logits result that cannot fit in memory, before allocating."""
    if n == 0 or n_past + n > n_ctx:
        return   # the core refuses these with its own message
    need = n * n_vocab * 4
    avail = _mem_available()
    if avail is not None and need > avail:
        raise MoefluxMemoryError(
            f"eval(all_logits=True): {n} tokens x {n_vocab} logits need "
            f"{need / 2**30:.2f} GiB, but only {avail / 2**30:.2f} GiB of memory is "
            "available (evaluate in pieces, or without all_logits)")
