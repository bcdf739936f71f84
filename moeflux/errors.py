"""Exceptions raised by moeflux. Every one subclasses :class:`MoefluxError`; each also
subclasses the builtin a caller would naturally catch (``OSError`` for a missing or
short file, ``ValueError`` for malformed content or a bad argument, ``MemoryError``).
The C binding maps each core status code to exactly one class here."""
from __future__ import annotations


class MoefluxError(Exception):
    """Base class of every moeflux error."""


class MoefluxIOError(MoefluxError, OSError):
    """A file could not be opened, read or mapped, or is shorter than it must be."""


class FormatError(MoefluxError, ValueError):
    """A file's content is malformed or of an unsupported kind (bad JSON, unknown
    model_type, non-affine quantization)."""


class ShapeError(FormatError):
    """A tensor's shape or dtype disagrees with config.json."""


class ChecksumError(FormatError):
    """``Model(path, verify=True)`` found a file whose sha256 differs from the one
    moeflux.json records (damaged, or changed since conversion). ``file`` is its path,
    ``expected`` and ``actual`` the two sums ("sha256:<hex>"; ``actual`` "missing"
    for a listed file that is not there). Nothing was opened."""

    def __init__(self, message: str, file: str = "", expected: str = "",
                 actual: str = "") -> None:
        super().__init__(message)
        self.file, self.expected, self.actual = file, expected, actual


class ArgumentError(MoefluxError, ValueError):
    """A bad argument: a token outside the vocabulary, a sequence longer than n_ctx."""


class MoefluxMemoryError(MoefluxError, MemoryError):
    """An allocation failed."""


class StateError(MoefluxError):
    """The request does not fit the context's state (a snapshot of another model, a
    truncation that cannot be exact)."""


class UnsupportedError(MoefluxError):
    """Valid input that this build does not support."""


class BackendError(MoefluxError):
    """The compute backend failed or is not available."""


class NumericError(MoefluxError, ArithmeticError):
    """NaN or infinity appeared in the computation, which means damaged weights or
    experts (the message names the first layer whose output held them); the sequence
    is as it was before the call. ``python -m moeflux.prep verify`` finds the damage."""


class AbortedError(MoefluxError):
    """An evaluation was stopped by ``abort()`` from another thread; the sequence is as
    it was before the call."""


class TokenizerError(MoefluxError):
    """The tokenizer or chat template is missing, unreadable or fails."""


class GenerationError(MoefluxError, ValueError):
    """A generation request that cannot be served (empty prompt, prompt too long, a
    generator superseded by a later generate() on the same Model)."""


class SamplingError(MoefluxError, ValueError):
    """A sampling parameter is out of range or of the wrong type, or a logits
    processor returned an unusable row."""


class SynthError(MoefluxError, ValueError):
    """A synthetic checkpoint request that cannot be met."""


__all__ = [
    "MoefluxError", "MoefluxIOError", "FormatError", "ShapeError", "ChecksumError",
    "ArgumentError",
    "MoefluxMemoryError", "StateError", "UnsupportedError", "BackendError", "AbortedError",
    "NumericError", "TokenizerError", "GenerationError", "SamplingError", "SynthError",
]
