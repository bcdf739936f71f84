"""The old-form DeepSeek oracle (test_deepseek.faithful_kvb_model) checked against
mlx-lm itself.

For files that store one ``kv_b_proj``, test_deepseek does not use mlx-lm's logits
directly: mlx-lm's ``sanitize`` dequantizes kv_b_proj (to bf16) and quantizes its two
halves again, embed_q = W_UK^T per head and unembed_out = W_UV per head, with the
file's bits and group size along their own last axes; the suite's oracle instead holds
the stored kv_b_proj exactly dequantized in f32. That oracle is itself code the suite
wrote, so here it is held against mlx-lm's own weights and logits at 8 bits, where
mlx-lm's second rounding is small:

- weights, each half separately: every element of the oracle's embed_q / unembed_out
  is within the error mlx-lm's requantization can make in that element's group (of
  range R and largest magnitude A, in the oracle's values): half a code step, R / 255
  / 2 (1 % more: mlx may widen the step so an edge value is exact), plus bf16
  roundings of relative size u = 2^-8 each: the scale times the code (u R) and the
  bias (u A) as stored, and in sanitize's dequantization to bf16 the product s q
  (u R) and the value itself (u A). So |diff| <= 1.01 R / 510 + u (2 R + 2 A). The
  worst seen is about 0.6 of that. And the requantization is real: the two differ.
- everything else: the oracle given mlx-lm's requantized halves reproduces mlx-lm's
  own prefill and decode logits within the CPU tier, so the halves are the oracle's
  only difference from mlx-lm.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_model

from _helpers import RTOL_CPU, continuation, converted  # noqa: F401 (fixture)
from reference import reference_decode, reference_logits
from test_deepseek import _FAITHFUL, _mlx_decode, _mlx_logits, faithful_kvb_model

ARCH = "deepseek_v3"
PROMPT = [1, 5, 77, 300, 12, 9, 411, 42, 8, 100, 250, 3]
# 8-bit kv_b_proj at two group sizes (and both q forms).
CASES: list[tuple[str, dict[str, Any]]] = [
    ("8bit-gs64", {"mla_form": "kv_b_proj", "bits": 8}),
    ("8bit-gs32-q-proj", {"mla_form": "kv_b_proj", "q_lora_rank": None,
                          "group_size": 32, "bits": 8, "first_k_dense_replace": 0}),
]
# Per group of range R and largest magnitude A: 8-bit half step plus four bf16
# roundings (module docstring): 1.01 R / 510 + U (2 R + 2 A).
BF16_U = 2.0 ** -8


def requant_bound(rng: np.ndarray, amax: np.ndarray) -> np.ndarray:
    return 1.01 * rng / 510 + BF16_U * (2 * rng + 2 * amax)


def forget_faithful(ckpt: Path) -> None:
    """Drops the cached oracle of ``ckpt`` (after its weights were swapped here)."""
    _FAITHFUL.pop(ckpt, None)


def _mlx_halves(ckpt: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """mlx-lm's own (embed_q, unembed_out) weights per layer, dequantized in f32."""
    mx.set_default_device(mx.cpu)
    model, _ = load_model(ckpt, strict=True)
    out = []
    for layer in model.model.layers:
        pair = []
        for mod in (layer.self_attn.embed_q, layer.self_attn.unembed_out):
            assert hasattr(mod, "scales"), "mlx-lm left an 8-bit half unquantized"
            w = mx.dequantize(mod.weight, mod.scales.astype(mx.float32),
                              mod.biases.astype(mx.float32), group_size=mod.group_size,
                              bits=mod.bits)
            pair.append(np.array(w.astype(mx.float32)))
        out.append((pair[0], pair[1]))
    return out


def _check_half(name: str, ours: np.ndarray, theirs: np.ndarray, gs: int) -> float:
    """Elementwise bound per group of ``gs`` along the last axis; returns the worst
    |difference| as a fraction of its group's bound."""
    assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
    g_ours = ours.reshape(*ours.shape[:-1], -1, gs)
    diff = np.abs(theirs.reshape(g_ours.shape) - g_ours)
    rng = g_ours.max(-1, keepdims=True) - g_ours.min(-1, keepdims=True)
    bound = requant_bound(rng, np.abs(g_ours).max(-1, keepdims=True))
    worst = float((diff / np.where(bound > 0, bound, 1.0)).max())
    assert worst <= 1.0, f"{name}: off by {worst:.3f} of the requantization bound"
    assert diff.max() > 0, f"{name}: identical to mlx-lm: no requantization seen"
    return worst


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_oracle_halves_match_mlx_requantized(case: tuple[str, dict[str, Any]],
                                             converted: Callable[..., tuple[Path, Path]]
                                             ) -> None:
    ckpt, _ = converted(ARCH, **case[1])
    gs = json.loads((ckpt / "config.json").read_text())["quantization"]["group_size"]
    oracle = faithful_kvb_model(ckpt)
    for il, (wk, wv) in enumerate(_mlx_halves(ckpt)):
        attn = oracle.model.layers[il].self_attn
        _check_half(f"layer {il} embed_q", np.array(attn.embed_q.weight), wk, gs)
        _check_half(f"layer {il} unembed_out", np.array(attn.unembed_out.weight), wv, gs)


def test_bound_sees_a_wrong_split(converted: Callable[..., tuple[Path, Path]]) -> None:
    """The weight bound is tight enough to see a split one row off (W_UK taken from
    rows h*(nope+v)+1 ..): it fails on the shifted halves."""
    ckpt, _ = converted(ARCH, **CASES[0][1])
    cfg = json.loads((ckpt / "config.json").read_text())
    wk = _mlx_halves(ckpt)[0][0]
    good = np.array(faithful_kvb_model(ckpt).model.layers[0].self_attn.embed_q.weight)
    shifted = np.roll(good, 1, axis=-1)   # [H, kvl, nope]: nope index off by one
    with pytest.raises(AssertionError, match="off by"):
        _check_half("shifted", shifted, wk, cfg["quantization"]["group_size"])


def _with_halves(model: Any, halves: list[tuple[np.ndarray, np.ndarray]]) -> Any:
    """``model`` with each layer's embed_q / unembed_out weights set to ``halves``."""
    for il, (wk, wv) in enumerate(halves):
        attn = model.model.layers[il].self_attn
        attn.embed_q.weight = mx.array(wk)
        attn.unembed_out.weight = mx.array(wv)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_oracle_differs_from_mlx_only_in_the_halves(case: tuple[str, dict[str, Any]],
                                                    converted: Callable[..., tuple[Path,
                                                                                   Path]]
                                                    ) -> None:
    """Everything else is mlx-lm's: the oracle given mlx-lm's requantized halves
    (dequantized in f32) reproduces mlx-lm's own prefill and decode logits to float32
    rounding (the quantized matmul and the float one sum in another order). Logits
    of the oracle itself are NOT compared with mlx-lm's: on these tiny random models
    a 0.6 % weight change moves logits by 1-3 % and can flip an expert choice (seen:
    141 % at one position), so no logits bound would mean anything there."""
    ckpt, _ = converted(ARCH, **case[1])
    oracle = _with_halves(faithful_kvb_model(ckpt), _mlx_halves(ckpt))
    cont = continuation(512, 8, seed=13)
    try:
        for what, ours, theirs in (
                ("prefill", _mlx_logits(oracle, PROMPT), reference_logits(ckpt, PROMPT)),
                ("decode", _mlx_decode(oracle, PROMPT, cont),
                 reference_decode(ckpt, PROMPT, cont))):
            rel = np.abs(ours - theirs).max(-1) / np.abs(theirs).max(-1)
            assert rel.max() <= RTOL_CPU, f"{what}: {rel.max():.2e} > {RTOL_CPU}"
            assert (ours.argmax(-1) == theirs.argmax(-1)).all(), what
    finally:
        forget_faithful(ckpt)
