"""The CPU ops gpt-oss needs, against MLX itself (float32, CPU), one op at a time
(tests/test_kernels.py's method and tolerance):

* MXFP4 weights (MLX ``mode="mxfp4"``, the experts of mlx-community's gpt-oss):
  matmul, matmul_t, matmul_heads and embed against ``mx.dequantize`` and
  ``mx.quantized_matmul`` of the same codes, under every kernel set;
* attention with sinks and a sliding window (``attention_ext``) against
  ``mx.fast.scaled_dot_product_attention(..., sinks=...)`` with mlx-lm's own
  windowed causal mask, and decode steps against what mlx-lm's ``RotatingKVCache``
  hands its attention; the cache also as a ring buffer;
* the clamped SwiGLU against mlx-lm's ``swiglu_oai``.
"""
from __future__ import annotations

from typing import Any, Iterator

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.activations import swiglu_oai
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import RotatingKVCache

import _kernsets
from moeflux import _diag

mx.set_default_device(mx.cpu)

# float32 rounding level, relative to the largest reference magnitude (test_kernels.py).
RTOL = 1e-5


def assert_close(got: np.ndarray, ref: Any, rtol: float = RTOL) -> None:
    """|got - ref| <= rtol * max|ref| everywhere."""
    ref = np.asarray(ref, dtype=np.float32)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    scale = float(np.abs(ref).max()) or 1.0
    err = float(np.abs(got.astype(np.float64) - ref).max())
    assert err <= rtol * scale, f"max abs err {err:.3g} > {rtol} * scale {scale:.3g}"


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def kernel_sets() -> Iterator[str]:
    """Every kernel set this build and CPU run, each counted once its body passed."""
    sets = _kernsets.available()
    assert "scalar" in sets, sets
    for name in sets:
        yield name
        _kernsets.note(name)


# ---------------------------------------------------------------------------
# MXFP4
# ---------------------------------------------------------------------------

def mxfp4(n_out: int, n_in: int, seed: int, spread: float = 1.0) -> dict[str, Any]:
    """Random weights quantized by mlx in mode mxfp4: the diag args, the f32
    dequantized W and the raw arrays. spread widens the row magnitudes (so scales
    range over many exponents)."""
    r = rng(seed)
    w = r.standard_normal((n_out, n_in)).astype(np.float32)
    w *= np.exp(r.uniform(-spread, spread, (n_out, 1))).astype(np.float32) * 0.05
    wq, s = mx.quantize(mx.array(w), group_size=32, bits=4, mode="mxfp4")
    assert wq.dtype == mx.uint32 and s.dtype == mx.uint8, (wq.dtype, s.dtype)
    deq = mx.dequantize(wq, s, None, group_size=32, bits=4, mode="mxfp4", dtype=mx.float32)
    return {"args": dict(w=np.array(wq), wdtype="MXFP4", scales=np.array(s)),
            "deq": deq, "wq": wq, "s": s}


def test_mxfp4_format_is_what_the_kernels_read() -> None:
    # The layout the kernels assume, from mlx itself: codes LSB-first, 8 per uint32,
    # the E2M1 table, one scale byte 2^(e - 127) per 32 columns, no biases.
    e2m1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    codes = np.arange(32, dtype=np.uint32) % 16
    packed = np.zeros((3, 4), np.uint32)
    for c in range(32):
        packed[:, c // 8] |= codes[c] << (4 * (c % 8))
    e = np.array([[127], [120], [0]], np.uint8)
    d = np.array(mx.dequantize(mx.array(packed), mx.array(e), None, group_size=32, bits=4,
                               mode="mxfp4", dtype=mx.float32))
    for i, ei in enumerate(e[:, 0]):
        want = np.array([e2m1[c] for c in codes], np.float32) * np.float32(2.0 ** (int(ei) - 127))
        np.testing.assert_array_equal(d[i], want)


@pytest.mark.parametrize("n_tok", [1, 2, 4, 5, 17])
def test_mxfp4_matmul(n_tok: int) -> None:
    n_out, n_in = 96, 32 * 27
    q = mxfp4(n_out, n_in, 3 + n_tok, spread=3.0)
    x = rng(n_tok).standard_normal((n_tok, n_in)).astype(np.float32)
    ref = np.array(mx.array(x) @ q["deq"].T)
    qmm = np.array(mx.quantized_matmul(mx.array(x), q["wq"], q["s"], None, transpose=True,
                                       group_size=32, bits=4, mode="mxfp4"))
    for kernels in kernel_sets():
        out = np.empty((n_tok, n_out), np.float32)
        _diag.matmul("matmul", out, x=x, n_out=n_out, n_in=n_in, n_tok=n_tok, n_threads=2,
                     kernels=kernels, **q["args"])
        assert_close(out, ref)
        assert_close(out, qmm)


def test_mxfp4_matmul_t_and_embed() -> None:
    n_out, n_in = 64, 32 * 10
    q = mxfp4(n_out, n_in, 9)
    tokens = np.array([0, 63, 7, 7], np.int32)
    for kernels in kernel_sets():
        for n_tok in (1, 3):
            x = rng(n_tok).standard_normal((n_tok, n_out)).astype(np.float32)
            out = np.empty((n_tok, n_in), np.float32)
            _diag.matmul("matmul_t", out, x=x, n_out=n_out, n_in=n_in, n_tok=n_tok,
                         n_threads=2, kernels=kernels, **q["args"])
            assert_close(out, np.array(mx.array(x) @ q["deq"]))
        emb = np.empty((len(tokens), n_in), np.float32)
        _diag.matmul("embed", emb, x=tokens, n_out=n_out, n_in=n_in, n_tok=len(tokens),
                     n_threads=2, kernels=kernels, **q["args"])
        # Exact: every dequantized MXFP4 value is exact in f32 on both sides.
        np.testing.assert_array_equal(emb, np.array(q["deq"][mx.array(tokens)]))


def test_mxfp4_matmul_heads() -> None:
    # Stacked [H, n_out, n_in] experts-like layout, one product per head.
    H, n_out, n_in, n_tok = 3, 40, 32 * 4, 2
    q = mxfp4(H * n_out, n_in, 12)
    x = rng(2).standard_normal((n_tok, H, n_in)).astype(np.float32)
    ref = np.stack([np.array(mx.array(x[:, h]) @ q["deq"][h * n_out:(h + 1) * n_out].T)
                    for h in range(H)], axis=1)
    for kernels in kernel_sets():
        out = np.empty((n_tok, H, n_out), np.float32)
        _diag.matmul_heads(out, x=x.reshape(-1), n_out=n_out, n_in=n_in, n_tok=n_tok,
                           n_head=H, w_head_rows=n_out, transposed=False,
                           y_tok_stride=H * n_out, y_head_stride=n_out,
                           x_tok_stride=H * n_in, x_head_stride=n_in, n_threads=2,
                           kernels=kernels, **q["args"])
        assert_close(out, ref)


def test_mxfp4_rejects_bad_shapes() -> None:
    q = mxfp4(8, 64, 1)
    with pytest.raises(ValueError):   # n_in not a multiple of 32
        _diag.matmul("matmul", np.empty((1, 8), np.float32), x=np.zeros((1, 48), np.float32),
                     n_out=8, n_in=48, n_tok=1, **q["args"])
    with pytest.raises(ValueError):   # scales too short
        args = dict(q["args"], scales=q["args"]["scales"][:4])
        _diag.matmul("matmul", np.empty((1, 8), np.float32), x=np.zeros((1, 64), np.float32),
                     n_out=8, n_in=64, n_tok=1, **args)


# ---------------------------------------------------------------------------
# attention with sinks and a sliding window
# ---------------------------------------------------------------------------

def sdpa_ref(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos0: int, scale: float,
             window: int, sinks: np.ndarray | None) -> np.ndarray:
    """mlx SDPA with mlx-lm's causal mask (windowed as its sliding layers make it) and
    sinks; q [T, H, dk], k [S, Hkv, dk], v [S, Hkv, dv]."""
    n_tok = q.shape[0]
    mask = create_causal_mask(n_tok, pos0, window_size=window or None)
    out = mx.fast.scaled_dot_product_attention(
        mx.array(q.transpose(1, 0, 2)[None]), mx.array(k.transpose(1, 0, 2)[None]),
        mx.array(v.transpose(1, 0, 2)[None]), scale=scale, mask=mask,
        sinks=None if sinks is None else mx.array(sinks))
    return np.array(out)[0].transpose(1, 0, 2)


def run_attention(q: np.ndarray, cache: np.ndarray, n_kv: int, d: int, pos0: int,
                  scale: float, kernels: str, sinks: np.ndarray | None = None,
                  window: int = 0, ring: int = 0, n_threads: int = 2) -> np.ndarray:
    """attention_ext through _diag on cache rows [k heads | v heads]."""
    n_tok, n_head, _ = q.shape
    out = np.empty((n_tok, n_head, d), np.float32)
    stride = 2 * n_kv * d
    _diag.attention(out, q, cache, n_tok, n_head, n_kv, d, d, stride, stride, pos0, scale,
                    v_off=n_kv * d, n_threads=n_threads, kernels=kernels, sinks=sinks,
                    window=window, ring=ring)
    return out


def to_ring(cache: np.ndarray, ring: int) -> np.ndarray:
    """The rows of a linear cache placed at row p % ring (later positions win)."""
    out = np.full((ring, cache.shape[1]), np.nan, np.float32)
    for p in range(cache.shape[0]):
        out[p % ring] = cache[p]
    return out


@pytest.mark.parametrize("n_tok,pos0", [(1, 0), (1, 300), (7, 0), (9, 150), (40, 100)])
@pytest.mark.parametrize("window", [0, 1, 16, 128])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_attention_sinks_window(n_tok: int, pos0: int, window: int, with_sinks: bool) -> None:
    n_head, n_kv, d = 8, 2, 32
    n_pos = pos0 + n_tok
    r = rng(n_tok * 1000 + pos0 + window)
    q = r.standard_normal((n_tok, n_head, d)).astype(np.float32)
    cache = r.standard_normal((n_pos, 2 * n_kv * d)).astype(np.float32) * 2
    k = cache[:, :n_kv * d].reshape(n_pos, n_kv, d)
    v = cache[:, n_kv * d:].reshape(n_pos, n_kv, d)
    # Sinks large enough to matter against the scores (gpt-oss's are O(1) logits).
    sinks = r.standard_normal(n_head).astype(np.float32) * 3 if with_sinks else None
    scale = d ** -0.5
    ref = sdpa_ref(q, k, v, pos0, scale, window, sinks)
    ring = window + n_tok - 1 if window else 0
    for kernels in kernel_sets():
        got = run_attention(q, cache, n_kv, d, pos0, scale, kernels, sinks, window)
        assert_close(got, ref)
        if ring:
            got_ring = run_attention(q, to_ring(cache, ring), n_kv, d, pos0, scale, kernels,
                                     sinks, window, ring)
            np.testing.assert_array_equal(got_ring, got)
        other = run_attention(q, cache, n_kv, d, pos0, scale, kernels, sinks, window,
                              n_threads=3)
        np.testing.assert_array_equal(other, got)


def test_attention_diag_rejects_a_ring_too_small() -> None:
    # The op's precondition (backend.h, struct mf_attn_ext), enforced by the diag entry.
    q = np.zeros((3, 2, 8), np.float32)
    cache = np.zeros((16, 2 * 8), np.float32)
    for window, ring in ((8, 9), (0, 12)):   # needs 8 + 3 - 1 = 10; pos0 + n_tok = 13
        with pytest.raises(ValueError):
            run_attention(q, cache, 1, 8, 10, 0.5, "scalar", window=window, ring=ring)
    run_attention(q, cache, 1, 8, 10, 0.5, "scalar", window=8, ring=10)
    _kernsets.note("scalar")


def test_attention_bf16_sinks() -> None:
    # Sinks as a checkpoint stores them (bf16), widened exactly.
    n_head, n_kv, d, n_tok, pos0 = 4, 4, 16, 3, 20
    r = rng(4)
    q = r.standard_normal((n_tok, n_head, d)).astype(np.float32)
    cache = r.standard_normal((pos0 + n_tok, 2 * n_kv * d)).astype(np.float32)
    sinks = mx.array(r.standard_normal(n_head).astype(np.float32) * 2).astype(mx.bfloat16)
    k = cache[:, :n_kv * d].reshape(-1, n_kv, d)
    v = cache[:, n_kv * d:].reshape(-1, n_kv, d)
    ref = sdpa_ref(q, k, v, pos0, 0.25, 8, np.array(sinks.astype(mx.float32)))
    out = np.empty((n_tok, n_head, d), np.float32)
    _diag.attention(out, q, cache, n_tok, n_head, n_kv, d, d, 2 * n_kv * d, 2 * n_kv * d,
                    pos0, 0.25, v_off=n_kv * d, sinks=np.array(sinks.view(mx.uint16)),
                    sinks_dtype="BF16", window=8)
    assert_close(out, ref)


def test_attention_decode_matches_rotating_cache() -> None:
    # Decode as mlx-lm runs a sliding layer: a prompt through RotatingKVCache(window),
    # then one token at a time with no mask over what the cache hands back (gpt_oss.py
    # with its make_cache). The op sees the whole linear history with `window`.
    n_head, n_kv, d, window, n_prompt, n_steps = 4, 2, 16, 8, 11, 14
    r = rng(8)
    n_pos = n_prompt + n_steps
    q = r.standard_normal((n_pos, n_head, d)).astype(np.float32)
    kk = r.standard_normal((n_pos, n_kv, d)).astype(np.float32)
    vv = r.standard_normal((n_pos, n_kv, d)).astype(np.float32)
    sinks = r.standard_normal(n_head).astype(np.float32)
    cache = np.concatenate([kk.reshape(n_pos, -1), vv.reshape(n_pos, -1)], axis=1)
    rc = RotatingKVCache(max_size=window)
    bhsd = lambda a: mx.array(a.transpose(1, 0, 2)[None])   # noqa: E731
    mask = rc.make_mask(n_prompt, window_size=window)
    ks, vs = rc.update_and_fetch(bhsd(kk[:n_prompt]), bhsd(vv[:n_prompt]))
    refs = [mx.fast.scaled_dot_product_attention(bhsd(q[:n_prompt]), ks, vs, scale=0.3,
                                                 mask=mask, sinks=mx.array(sinks))]
    for p in range(n_prompt, n_pos):
        ks, vs = rc.update_and_fetch(bhsd(kk[p:p + 1]), bhsd(vv[p:p + 1]))
        assert ks.shape[2] == min(p + 1, window)
        refs.append(mx.fast.scaled_dot_product_attention(
            bhsd(q[p:p + 1]), ks, vs, scale=0.3, mask=rc.make_mask(1, window_size=window),
            sinks=mx.array(sinks)))
    ref = np.concatenate([np.array(o)[0].transpose(1, 0, 2) for o in refs], axis=0)
    for kernels in kernel_sets():
        got = [run_attention(q[:n_prompt], cache[:n_prompt], n_kv, d, 0, 0.3, kernels,
                             sinks, window)]
        for p in range(n_prompt, n_pos):
            got.append(run_attention(q[p:p + 1], cache[:p + 1], n_kv, d, p, 0.3, kernels,
                                     sinks, window))
            # The same step on a ring of exactly `window` rows.
            ringed = run_attention(q[p:p + 1], to_ring(cache[:p + 1], window), n_kv, d, p,
                                   0.3, kernels, sinks, window, window)
            np.testing.assert_array_equal(ringed, got[-1])
        assert_close(np.concatenate(got, axis=0), ref)


# ---------------------------------------------------------------------------
# clamped SwiGLU
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("alpha,limit", [(1.702, 7.0), (1.0, 2.5)])
def test_swiglu_clamped(alpha: float, limit: float) -> None:
    n_rows, n_ff = 5, 300
    # gate | up halves of one row, values well past +-limit on both sides.
    gu = (rng(3).standard_normal((n_rows, 2 * n_ff)) * 6).astype(np.float32)
    ref = swiglu_oai(mx.array(gu[:, :n_ff]), mx.array(gu[:, n_ff:]), alpha=alpha,
                     limit=limit)
    y = np.empty((n_rows, n_ff), np.float32)
    _diag.elementwise("swiglu_clamped", y, gu, n_rows, n_ff, 2 * n_ff, b_off=n_ff,
                      alpha=alpha, limit=limit)
    assert_close(y, np.array(ref))
