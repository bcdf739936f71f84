"""moeflux: a streaming-experts Mixture-of-Experts inference engine.

``moeflux.Model(path)`` loads a model directory prepared by ``python -m moeflux.prep
convert`` and evaluates tokens into numpy logits, reading only the experts the router
picks from disk.
"""
from .errors import (AbortedError, ArgumentError, BackendError, ChecksumError,
                     FormatError, GenerationError, MoefluxError, MoefluxIOError,
                     MoefluxMemoryError, NumericError, SamplingError, ShapeError,
                     StateError, SynthError, TokenizerError, UnsupportedError)
from .model import Model
from ._core import backends

__version__ = "0.1.0"

__all__ = [
    "Model", "MoefluxError", "MoefluxIOError", "FormatError", "ShapeError", "ChecksumError",
    "ArgumentError", "MoefluxMemoryError", "StateError", "UnsupportedError",
    "BackendError", "AbortedError", "NumericError", "TokenizerError", "GenerationError",
    "SamplingError", "SynthError", "__version__",
]
