"""A whole gpt-oss decoder layer out of moeflux's CPU ops, against mlx-lm's own
``TransformerBlock`` of the synthetic checkpoint (tests/gptoss_synth.py), for a
sliding-window layer and a full-attention layer over a prompt longer than the window.

No model file exists yet; this shows the groundwork ops compose to mlx-lm's layer
(rmsnorm, 8-bit affine projections plus their biases, YaRN rope, attention_ext with
sinks and the window, MXFP4 experts plus biases, the clamped SwiGLU, top-k then
softmax routing), and pins the semantics the model file must follow. Only the glue
the model file will own is numpy here: adding the linear biases, the residual adds, and
the top-k / softmax / weighted sum of the routing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

import gptoss_synth as gs
from _helpers import RTOL_CPU
from moeflux import _diag

mx.set_default_device(mx.cpu)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gs.write_gptoss_checkpoint(tmp_path_factory.mktemp("gptoss_layer") / "ckpt")


@pytest.fixture(scope="module")
def model(ckpt: Path) -> Any:
    from mlx_lm.utils import load_model

    m, _ = load_model(ckpt, strict=True)
    m.set_dtype(mx.float32)
    return m


def np32(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)) if a.dtype != mx.uint32 and a.dtype != mx.uint8 \
        else np.array(a)


def linear(lin: Any, x: np.ndarray) -> np.ndarray:
    """x @ W^T + b for an mlx-lm QuantizedLinear (affine) through moeflux's matmul."""
    n_out = lin.weight.shape[0]
    n_in = lin.weight.shape[1] * 32 // lin.bits
    out = np.empty((x.shape[0], n_out), np.float32)
    _diag.matmul("matmul", out, w=np.array(lin.weight), x=np.ascontiguousarray(x),
                 n_out=n_out, n_in=n_in, n_tok=x.shape[0], scales=np32(lin.scales),
                 biases=np32(lin.biases), sdtype="F32", bits=lin.bits,
                 group_size=lin.group_size, n_threads=2)
    return out + np32(lin.bias) if "bias" in lin else out


def expert_linear(sw: Any, e: int, x: np.ndarray) -> np.ndarray:
    """x @ W_e^T + b_e for expert e of an mlx-lm QuantizedSwitchLinear in mode mxfp4."""
    assert sw.mode == "mxfp4"
    w, s = np.array(sw.weight[e]), np.array(sw.scales[e])
    n_out, n_in = w.shape[0], w.shape[1] * 8
    out = np.empty((x.shape[0], n_out), np.float32)
    _diag.matmul("matmul", out, w=w, x=np.ascontiguousarray(x), n_out=n_out, n_in=n_in,
                 n_tok=x.shape[0], wdtype="MXFP4", scales=s, n_threads=2)
    return out + np32(sw.bias[e])


def rmsnorm(norm: Any, x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    _diag.rmsnorm(out, np.ascontiguousarray(x), x.shape[0], x.shape[1], norm.eps,
                  g=np32(norm.weight), n_threads=2)
    return out


def rope(rope_mod: Any, x: np.ndarray) -> np.ndarray:
    """mlx-lm's YarnRoPE (non-traditional) on x [T, H, D] at positions 0..T-1."""
    n_tok, n_head, d = x.shape
    got = np.ascontiguousarray(x).copy()
    inv_freq = (np.float32(1.0) / np.array(rope_mod._freqs)).astype(np.float32)
    _diag.rope(got, n_tok, n_head, n_head * d, d, rope_mod.dims, inv_freq, 0, False,
               mscale=rope_mod.mscale, n_threads=2)
    return got


def attention(attn: Any, h: np.ndarray, window: int) -> np.ndarray:
    n_tok, d = h.shape[0], attn.head_dim
    n_head, n_kv = attn.num_attention_heads, attn.num_key_value_heads
    q = rope(attn.rope, linear(attn.q_proj, h).reshape(n_tok, n_head, d))
    k = rope(attn.rope, linear(attn.k_proj, h).reshape(n_tok, n_kv, d))
    v = linear(attn.v_proj, h)
    cache = np.concatenate([k.reshape(n_tok, -1), v], axis=1)   # rows [k heads | v heads]
    out = np.empty((n_tok, n_head, d), np.float32)
    _diag.attention(out, q, cache, n_tok, n_head, n_kv, d, d, 2 * n_kv * d, 2 * n_kv * d, 0,
                    attn.sm_scale, v_off=n_kv * d, sinks=np32(attn.sinks), window=window,
                    n_threads=2)
    return linear(attn.o_proj, out.reshape(n_tok, -1))


def moe(mlp: Any, h: np.ndarray) -> np.ndarray:
    logits = linear(mlp.router, h)
    k = mlp.num_experts_per_tok
    y = np.zeros_like(h)
    ex = mlp.experts
    for t in range(h.shape[0]):
        top = np.argsort(-logits[t], kind="stable")[:k]
        w = np.exp(logits[t, top] - logits[t, top].max())
        w /= w.sum()
        for e, we in zip(top, w):
            row = h[t:t + 1]
            gate, up = expert_linear(ex.gate_proj, e, row), expert_linear(ex.up_proj, e, row)
            act = np.empty_like(gate)
            both = np.ascontiguousarray(np.concatenate([gate, up], axis=1))
            _diag.elementwise("swiglu_clamped", act, both, 1, gate.shape[1], both.shape[1],
                              b_off=gate.shape[1], alpha=ex.activation._alpha,
                              limit=ex.activation._limit)
            y[t] += we * expert_linear(ex.down_proj, e, act)[0]
    return y


@pytest.mark.parametrize("layer", [0, 1])
def test_layer_from_ops_matches_mlx_lm(ckpt: Path, model: Any, layer: int) -> None:
    from mlx_lm.models.base import create_causal_mask

    cfg = json.loads((ckpt / "config.json").read_text())
    kind = cfg["layer_types"][layer]
    window = cfg["sliding_window"] if kind == "sliding_attention" else 0
    n_tok = gs.PROMPT_LEN
    x = np.random.default_rng(layer).standard_normal((n_tok, cfg["hidden_size"]))
    x = x.astype(np.float32)
    block = model.model.layers[layer]
    mask = create_causal_mask(n_tok, 0, window_size=window or None)
    ref = np.array(block(mx.array(x[None]), mask, None))[0]

    h = x + attention(block.self_attn, rmsnorm(block.input_layernorm, x), window)
    got = h + moe(block.mlp, rmsnorm(block.post_attention_layernorm, h))
    scale = float(np.abs(ref).max())
    err = float(np.abs(got - ref).max())
    assert err <= RTOL_CPU * scale, f"{kind}: max err {err:.3g} vs scale {scale:.3g}"
    # The window is visible in this layer's output: a full-attention run differs.
    if window:
        full = x + attention(block.self_attn, rmsnorm(block.input_layernorm, x), 0)
        assert np.abs(full - h)[window:].max() > 1e-3 * scale
