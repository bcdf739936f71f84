"""Model features layered on the core `Model`: state snapshots and sequence control,
tokenizer and chat template, generation, and model facts. `moeflux.model.Model`
inherits from `ModelFeatures`, so these read as ordinary methods of Model.

The methods use what the core Model provides: ``self._ctx`` (the ``_core.Context``),
``self.path`` (the model directory) and ``self.config`` (config.json as a dict).
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from . import generate as _generate
from .errors import ArgumentError, MoefluxError, MoefluxIOError
from .sampling import LogitsProcessor
from .tokenizer import StreamingDetokenizer, Tokenizer

BufferLike = Union[bytes, bytearray, memoryview, np.ndarray]


class ModelFeatures:
    """Mixin of the higher-level Model methods (snapshots, tokenizer, generation)."""

    __slots__ = ()

    # Provided by moeflux.model.Model (declared here for readers and type checkers).
    path: Path
    config: dict
    _ctx: Any

    # ---- per-instance cache (the tokenizer is loaded once, on first use)

    def _feature_cache(self) -> dict:
        return self.__dict__.setdefault("_features_cache", {})

    def _core(self) -> Any:
        """The live _core.Context (ValueError "Model is closed" after close())."""
        live = getattr(self, "_live", None)
        return live() if live is not None else self._ctx

    # ---- sequence state

    def save_state(self, path: Union[None, str, os.PathLike] = None) -> bytes:
        """Snapshot the sequence state (KV caches, linear-attention state, position).

        Args:
            path: if given, also write the snapshot there atomically (a temporary
                file in the same directory, fsync'd, then renamed over `path`).

        Returns:
            The snapshot as bytes (picklable; pass it to load_state on any Model of
            the same model directory whose n_ctx holds the sequence).
        """
        data = self._core().save_state()
        if path is not None:
            _write_atomic(Path(path), data)
        return data

    def load_state(self, state: Union[BufferLike, str, os.PathLike]) -> None:
        """Restore a snapshot made by save_state (bytes-like, or a file path).

        The whole snapshot is validated before anything changes: on any error the
        sequence is as it was. After loading, evaluation continues exactly as if
        the snapshotted tokens had just been evaluated.

        Raises:
            StateError (another model, or longer than n_ctx), FormatError (truncated
            or corrupted), UnsupportedError (newer format), OSError (path).
        """
        if isinstance(state, (str, os.PathLike)):
            # Mapped, not read: a snapshot of a long sequence can be gigabytes, and
            # the engine only reads it once (to check, then to upload).
            with open(state, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    self._core().load_state(b"")   # refused with a FormatError
                    return
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                    self._core().load_state(mm)
        else:
            self._core().load_state(state)
        # A snapshot holds the state, not the ids: those positions are unknown.
        self.__dict__["_tokens"] = [-1] * int(self._core().n_past)
        self.__dict__["_ends"] = []

    def truncate(self, n: int) -> None:
        """Shorten the sequence to its first `n` tokens.

        Exact for attention-only models. For models with linear attention it is
        exact when a checkpoint at `n` is held (the last few evaluation end points
        are kept automatically; 0 always works); otherwise StateError is raised and
        the sequence is unchanged: re-evaluate, or load a snapshot saved at `n`.

        Raises:
            ArgumentError: `n` is not an int or outside [0, n_past].
        """
        if not isinstance(n, (int, np.integer)) or isinstance(n, (bool, np.bool_)):
            raise ArgumentError(f"truncate: n must be an int, got {n!r}")
        self._core().truncate(int(n))
        toks = self.__dict__.get("_tokens")
        if toks is not None:
            self.__dict__["_tokens"] = toks[:int(n)]
            self.__dict__["_ends"] = [e for e in self.__dict__.get("_ends", []) if e <= n]

    def set_checkpoints(self, n: int) -> None:
        """How many automatic checkpoints of linear-attention state are kept so that
        truncate stays exact (hybrid models only; each is a host copy of that state,
        taken after every eval): 0 = default (the 8 most recent evaluation end
        points, at most 1 GiB together), -1 = none (no copy per eval), else n <= 64.
        Drops the checkpoints held so far. Each copy is the whole recurrent state
        (2 MB per GatedDeltaNet layer at Qwen3.6-35B-A3B shapes), made after every
        call, single tokens included: about 5 % of decode time on the CPU, so a run
        that never truncates may turn them off.
        """
        self._core().set_checkpoints(int(n))

    @property
    def state_size(self) -> int:
        """Bytes a snapshot of the current sequence takes."""
        return int(self._core().state_size())

    # ---- model facts

    @property
    def vocab_size(self) -> int:
        """Rows of the output layer (config vocab_size)."""
        return int(self._core().n_vocab)

    @property
    def architecture(self) -> str:
        """config.json model_type ("qwen3_5_moe", "qwen3_next", ...)."""
        return str(self._core().arch)

    @property
    def expert_bytes_per_token(self) -> int:
        """Bytes of routed-expert data read per token when nothing is cached."""
        return int(self._core().expert_bytes_per_token)

    @property
    def bos_token_id(self) -> Optional[int]:
        """Beginning-of-sequence id from config.json, or None."""
        bos = int(self._core().bos)
        return bos if bos >= 0 else None

    @property
    def eos_token_id(self) -> Optional[int]:
        """The (first) end-of-sequence id from config.json, or None."""
        eos = int(self._core().eos)
        return eos if eos >= 0 else None

    @property
    def eos_token_ids(self) -> frozenset:
        """Every id that ends generation: config.json, generation_config.json and the
        tokenizer's eos_token (models often list several)."""
        cache = self._feature_cache()
        if "eos" not in cache:
            ids = set()
            if self.eos_token_id is not None:
                ids.add(self.eos_token_id)
            ids.update(_ids_of(_config_value(self.config, "eos_token_id")))
            gen = Path(self.path) / "generation_config.json"
            if gen.is_file():
                try:
                    ids.update(_ids_of(json.loads(gen.read_text()).get("eos_token_id")))
                except (OSError, ValueError, AttributeError):
                    pass   # a broken optional file only loses extra stop ids
            try:
                tok = self.tokenizer
                eos_id = tok.token_to_id(tok.eos_token) if tok.eos_token else None
                if eos_id is not None:
                    ids.add(int(eos_id))
            except MoefluxError:
                pass   # no tokenizer: the config's ids are all there is
            cache["eos"] = frozenset(ids)
        return cache["eos"]

    # ---- tokenizer

    @property
    def tokenizer(self) -> Tokenizer:
        """The model directory's tokenizer (loaded on first use).

        Raises:
            TokenizerError: no tokenizer.json or the `tokenizers` package is missing.
        """
        cache = self._feature_cache()
        if "tokenizer" not in cache:
            cache["tokenizer"] = Tokenizer(self.path)
        return cache["tokenizer"]

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def detokenize(self, ids: Union[Sequence[int], np.ndarray],
                   skip_special_tokens: bool = False) -> str:
        """Text of token ids."""
        return self.tokenizer.decode(np.asarray(ids).reshape(-1).tolist(),
                                     skip_special_tokens=skip_special_tokens)

    def streaming_detokenizer(self, skip_special_tokens: bool = False
                              ) -> StreamingDetokenizer:
        """A detokenizer fed one id at a time that emits whole characters only."""
        return self.tokenizer.streaming(skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True,
                            tokenize: bool = False, **extra: Any
                            ) -> Union[str, list[int]]:
        """Render chat `messages` with the model's chat template.

        Args:
            messages: [{"role": "user", "content": "..."}, ...].
            add_generation_prompt: end with the opening of the assistant's turn.
            tokenize: return token ids instead of text.
            extra: more template variables.

        Raises:
            TokenizerError: no template, or jinja2 is not installed.
        """
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt,
                                                  **extra)
        return self.tokenize(text, add_special_tokens=False) if tokenize else text

    # ---- generation

    def generate(self, prompt: Union[str, Sequence[int], np.ndarray], *,
                 max_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, seed: Optional[int] = None,
                 stop: Union[None, str, Sequence[str]] = None,
                 logits_processors: Sequence[LogitsProcessor] = (),
                 reset: bool = True, add_special_tokens: bool = True,
                 logprobs: bool = False, top_logprobs: int = 0,
                 progress: Union[None, bool, Callable[[int, int], None]] = None
                 ) -> Iterator[_generate.GenerationStep]:
        """Generate tokens, yielding a GenerationStep (token id, text piece,
        finish_reason, speeds) as each comes.

        Args:
            prompt: text or token ids.
            max_tokens: the most tokens to generate.
            temperature: 0 = greedy argmax (default); > 0 samples.
            top_k, top_p, min_p: filters of the sampled distribution (off by default).
            repetition_penalty: > 1 discourages recent tokens (1 = off).
            seed: random seed for sampling (None = from the OS).
            stop: string(s) that end generation (excluded from the text).
            logits_processors: callables (ids, logits) -> logits before sampling;
                each must return a float row of n_vocab (-inf masks a token).
            reset: the prompt is the whole sequence (default): the longest prefix
                the sequence already shares with it is kept and only the rest is
                evaluated. False appends the prompt to the current sequence (e.g.
                after load_state).
            add_special_tokens: tokenizer flag for a text prompt.
            logprobs: fill each step's ``logprob`` (log-probability of the token
                under the raw logits).
            top_logprobs: fill each step's ``top_logprobs`` with that many
                (id, logprob) pairs.
            progress: ``progress(done, total)`` during the prompt evaluation, or
                True for a ``tqdm.auto`` bar (see Model.eval).

        Arguments are checked at the call (GenerationError, SamplingError). A later
        generate() on this Model invalidates an unfinished earlier generator: it
        raises GenerationError when resumed.

        Example:
            >>> for step in model.generate("Hello", max_tokens=8):
            ...     print(step.text, end="")
        """
        return _generate.stream_generate(
            self, prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
            stop=stop, logits_processors=logits_processors, reset=reset,
            add_special_tokens=add_special_tokens, logprobs=logprobs,
            top_logprobs=top_logprobs, progress=progress)

    def generate_text(self, prompt: Union[str, Sequence[int], np.ndarray],
                      **kwargs: Any) -> str:
        """Generate and return the whole text (arguments as generate)."""
        return "".join(step.text for step in self.generate(prompt, **kwargs))


def _config_value(config: Mapping[str, Any], key: str) -> Any:
    """A key of config.json, looking into text_config (Qwen3.5 nests the LM config)."""
    if key in config:
        return config[key]
    text = config.get("text_config")
    return text.get(key) if isinstance(text, Mapping) else None


def _ids_of(value: Any) -> list[int]:
    """Token ids from an int, a list of ints or None."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a reader sees the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp",
                               dir=str(path.parent or Path(".")))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, MoefluxIOError):
            # ENOSPC / EIO from write or fsync name no file: say which one failed.
            raise MoefluxIOError(exc.errno or errno.EIO, f"{path}: cannot write the "
                                 f"snapshot ({exc.strerror or exc}); the file is as it "
                                 "was") from exc
        raise
    # The rename itself is durable only once the directory entry is on disk.
    try:
        dfd = os.open(str(path.parent), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
