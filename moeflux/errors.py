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


__all__ = [
    "MoefluxError", "MoefluxIOError", "FormatError", "ShapeError", "ArgumentError",
    "MoefluxMemoryError", "StateError", "UnsupportedError", "BackendError", "AbortedError",
    "NumericError",
]
