"""The oracle: mlx-lm's own forward pass over a checkpoint directory.

Tests compare moeflux against these logits. Everything here is mlx / mlx-lm on the
CPU in float32 (model-math §1.7: bf16 quantized matmuls on Linux CPU round every
partial sum to bf16, so the reference would be noisier than the thing under test).
Nothing here touches moeflux's C code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

_MODELS: dict[Path, Any] = {}


def _mx() -> Any:
    import mlx.core as mx

    mx.set_default_device(mx.cpu)
    return mx


def load_reference(ckpt_dir: str | Path) -> Any:
    """mlx-lm model of ``ckpt_dir`` (strict load, cast to float32); cached per path."""
    path = Path(ckpt_dir).resolve()
    model = _MODELS.get(path)
    if model is None:
        mx = _mx()
        from mlx_lm.utils import load_model

        model, _ = load_model(path, strict=True)
        model.set_dtype(mx.float32)
        mx.eval(model.parameters())
        _MODELS[path] = model
    return model


def forget_reference(ckpt_dir: str | Path) -> None:
    """Drop the cached model of ``ckpt_dir`` (after rewriting it in place)."""
    _MODELS.pop(Path(ckpt_dir).resolve(), None)


def reference_logits(ckpt_dir: str | Path, tokens: list[int]) -> np.ndarray:
    """Logits [L, V] float32 of one causal prefill of ``tokens`` without a cache."""
    if not tokens:
        raise ValueError("reference_logits: empty token list")
    mx = _mx()
    model = load_reference(ckpt_dir)
    logits = model(mx.array([list(tokens)], dtype=mx.int32))
    mx.eval(logits)
    return np.array(logits[0].astype(mx.float32))


def reference_decode(ckpt_dir: str | Path, prompt: list[int],
                     continuation: list[int]) -> np.ndarray:
    """Logits [len(continuation) + 1, V] float32 of incremental decoding.

    Row 0: last position after prefilling ``prompt`` into a fresh prompt cache
    (make_prompt_cache). Row i: after feeding ``continuation[i-1]`` alone with the
    cache. This exercises mlx-lm's cached paths (GDN conv/recurrent state, KV cache,
    DeepSeek's absorbed L == 1 MLA).
    """
    if not prompt:
        raise ValueError("reference_decode: empty prompt")
    mx = _mx()
    from mlx_lm.models.cache import make_prompt_cache

    model = load_reference(ckpt_dir)
    cache = make_prompt_cache(model)
    rows = []
    logits = model(mx.array([list(prompt)], dtype=mx.int32), cache=cache)
    rows.append(logits[0, -1].astype(mx.float32))
    mx.eval(rows[-1])
    for tok in continuation:
        logits = model(mx.array([[int(tok)]], dtype=mx.int32), cache=cache)
        rows.append(logits[0, -1].astype(mx.float32))
        mx.eval(rows[-1])
    return np.stack([np.array(r) for r in rows])
