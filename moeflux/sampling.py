"""Token sampling over numpy logits: greedy, temperature, top-k, top-p, min-p, and a
repetition penalty, plus the logits-processor hook of ``Model.generate``.

Everything here is plain numpy on one float32 row ``[n_vocab]``; the engine hands over
logits and never calls back into this module. The order of filters follows common
practice (and mlx-lm's sampler): penalties and processors on raw logits, then
temperature, then top-k, top-p and min-p on the resulting distribution.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from .errors import SamplingError

# A logits processor sees the token ids so far (prompt + generated) and the logits row
# of the next position, and returns the row to use (it may modify it in place, but
# must return it). -inf masks a token; NaN, +inf, None or another shape are refused.
LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class SamplerSettings:
    """The knobs of one generation.

    Attributes:
        temperature: 0 picks the argmax (greedy); > 0 divides the logits.
        top_k: keep the k most likely tokens (0 = off).
        top_p: keep the smallest set whose probability reaches p (1.0 = off).
        min_p: drop tokens below min_p times the top probability (0 = off).
        repetition_penalty: > 1 discourages tokens already in the context (1 = off).
        repetition_context: how many recent tokens the penalty looks at.
        seed: seed of the random generator (None = from the OS).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context: int = 64
    seed: Optional[int] = None
    processors: Sequence[LogitsProcessor] = field(default_factory=tuple)

    def check(self) -> None:
        """Raise SamplingError when a field is out of range or of the wrong type."""
        temperature = _real("temperature", self.temperature)
        if not np.isfinite(temperature) or temperature < 0:
            raise SamplingError(f"temperature must be >= 0, got {self.temperature}")
        if _integer("top_k", self.top_k) < 0:
            raise SamplingError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < _real("top_p", self.top_p) <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= _real("min_p", self.min_p) < 1.0:
            raise SamplingError(f"min_p must be in [0, 1), got {self.min_p}")
        penalty = _real("repetition_penalty", self.repetition_penalty)
        if not np.isfinite(penalty) or penalty <= 0:
            raise SamplingError(
                f"repetition_penalty must be finite and > 0, got {self.repetition_penalty}")
        if _integer("repetition_context", self.repetition_context) < 1:
            raise SamplingError(
                f"repetition_context must be >= 1, got {self.repetition_context}")
        if self.seed is not None and _integer("seed", self.seed) < 0:
            raise SamplingError(f"seed must be >= 0 or None, got {self.seed}")
        for proc in self.processors:
            if not callable(proc):
                raise SamplingError(f"logits processors must be callables "
                                    f"(ids, logits) -> logits, got {proc!r}")


def _real(name: str, value: object) -> float:
    """A float parameter: any real number but a bool (a string is refused, not parsed)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                     np.floating)):
        raise SamplingError(f"{name} must be a number, got {value!r}")
    return float(value)


def _integer(name: str, value: object) -> int:
    """An int parameter: 2.5 is refused, not rounded."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise SamplingError(f"{name} must be an int, got {value!r}")
    return int(value)


def check_processor_row(proc: object, out: object, n_vocab: int) -> np.ndarray:
    """The row a logits processor returned, as float32 [n_vocab], or SamplingError:
    None (return the row, even when modified in place), another shape, NaN or +inf
    anywhere, or no finite entry left (-inf alone is allowed: it masks a token)."""
    if out is None:
        raise SamplingError(f"logits processor {proc!r} returned None; it must return "
                            "the logits row (modified in place or new)")
    try:
        row = np.asarray(out, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise SamplingError(f"logits processor {proc!r} returned {type(out).__name__}, "
                            f"not a float row: {exc}") from None
    if row.shape != (n_vocab,):
        raise SamplingError(f"logits processor {proc!r} returned shape {row.shape}, "
                            f"expected ({n_vocab},)")
    if np.isnan(row).any() or np.isposinf(row).any():
        raise SamplingError(f"logits processor {proc!r} returned NaN or +inf")
    if not np.isfinite(row).any():
        raise SamplingError(f"logits processor {proc!r} masked every token (-inf)")
    return row


def apply_repetition_penalty(logits: np.ndarray, context: np.ndarray,
                             penalty: float) -> np.ndarray:
    """Penalise the tokens of `context` in `logits` (in place) and return it.

    A positive logit is divided by `penalty`, a negative one multiplied, so the token
    always becomes less likely for penalty > 1 (the CTRL paper's rule).
    """
    if penalty == 1.0 or context.size == 0:
        return logits
    ids = np.unique(context)
    sel = logits[ids]
    logits[ids] = np.where(sel > 0, sel / penalty, sel * penalty)
    return logits


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax of a row in float64 (stable: shifted by the max)."""
    z = x.astype(np.float64) - np.max(x)
    e = np.exp(z)
    return e / e.sum()


def filter_probs(p: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Zero the probabilities top-k / top-p / min-p exclude and renormalise.

    The most likely token always survives, so the result is a distribution.
    """
    keep = np.ones(p.shape, dtype=bool)
    order = None
    if top_k and top_k < p.size:
        order = np.argsort(-p, kind="stable")
        keep[order[top_k:]] = False
    if top_p < 1.0:
        if order is None:
            order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        # Keep every token whose preceding mass is below top_p: the first one always.
        n_keep = int(np.searchsorted(cum, top_p, side="left")) + 1
        keep[order[n_keep:]] = False
    if min_p > 0.0:
        keep &= p >= min_p * p.max()
    keep[int(np.argmax(p))] = True
    q = np.where(keep, p, 0.0)
    return q / q.sum()


class Sampler:
    """Picks next tokens from logits rows under fixed SamplerSettings.

    Holds its own numpy random Generator, so two samplers with the same seed draw the
    same sequence whatever else runs in the process.
    """

    def __init__(self, settings: SamplerSettings) -> None:
        settings.check()
        self.settings = settings
        self.rng = np.random.default_rng(None if settings.seed is None
                                         else int(settings.seed))

    def __call__(self, logits: np.ndarray, tokens: Sequence[int]) -> int:
        """Choose the next token.

        Args:
            logits: float row [n_vocab] of the next position (not modified).
            tokens: the ids so far (prompt + generated), for penalties and processors.

        Returns:
            The chosen token id.
        """
        s = self.settings
        row = np.array(logits, dtype=np.float32, copy=True)
        ids = np.asarray(tokens, dtype=np.int64)
        if s.repetition_penalty != 1.0:
            apply_repetition_penalty(row, ids[-s.repetition_context:],
                                     s.repetition_penalty)
        for proc in s.processors:
            row = check_processor_row(proc, proc(ids, row), logits.shape[-1])
        if s.temperature == 0.0:
            return int(np.argmax(row))
        p = softmax(row / np.float32(s.temperature))
        p = filter_probs(p, s.top_k, s.top_p, s.min_p)
        return int(self.rng.choice(p.size, p=p))
