"""CPU backend ops against MLX itself (float32, CPU), one op at a time.

Each test builds inputs with numpy/mlx, runs the op through a `moeflux._diag.*`
function (a temporary CPU exec) and compares with the mlx computation the models use:
`mx.quantize`/`mx.dequantize`/`mx.quantized_matmul` for matmul, `mx.fast.rms_norm`,
`mx.fast.rope`, `mx.fast.scaled_dot_product_attention`, `mx.conv1d` and mlx-lm's
gated-delta functions. Tolerances are at the float32 rounding level, relative to the
output's scale. Thread-count independence is checked bitwise.

Every op that goes through a CPU kernel set (the matmul family, attention, the
GatedDeltaNet recurrence) runs under each set this build and CPU have, forced per call
(``kernels=``), and each set is counted (tests/_kernsets.py): the run prints the sets
it exercised and fails when one named in MOEFLUX_REQUIRE_KERNELS was not.
"""
from __future__ import annotations

import math
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import gated_delta as gd
from mlx_lm.models.activations import swiglu as mlx_swiglu
from mlx_lm.models.qwen3_next import Qwen3NextRMSNormGated

import _kernsets
from _helpers import CPU_ARCHS, FWD_PROMPT, continuation, converted
from _helpers import assert_close as assert_logits_close
from moeflux import _diag
from reference import reference_decode, reference_logits

__all__ = ["converted"]  # the fixture is used by name

mx.set_default_device(mx.cpu)

# float32 rounding level, relative to the largest reference magnitude.
RTOL = 1e-5


def to_np(a: mx.array) -> np.ndarray:
    """An mlx array as numpy float32 (bf16 upcast exactly)."""
    if a.dtype in (mx.bfloat16, mx.float16):
        a = a.astype(mx.float32)
    return np.array(a)


def raw(a: mx.array) -> tuple[np.ndarray, str]:
    """The raw bytes of a float mlx array as numpy plus its safetensors dtype name."""
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16)), "BF16"
    if a.dtype == mx.float16:
        return np.array(a.view(mx.uint16)), "F16"
    return np.array(a.astype(mx.float32)), "F32"


def assert_close(got: np.ndarray, ref: np.ndarray, rtol: float = RTOL) -> None:
    """|got - ref| <= rtol * max|ref| everywhere, with a useful message."""
    ref = np.asarray(ref, dtype=np.float32)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    scale = float(np.abs(ref).max()) or 1.0
    err = float(np.abs(got.astype(np.float64) - ref).max())
    assert err <= rtol * scale, f"max abs err {err:.3g} > {rtol} * scale {scale:.3g}"


def rng(seed: int) -> np.random.Generator:
    """A numpy generator per test (deterministic)."""
    return np.random.default_rng(seed)


def kernel_sets() -> Iterator[str]:
    """Every kernel set this build and CPU run, best first; each is counted as
    exercised once the loop body that used it has completed (an assertion failing in
    the body leaves it uncounted)."""
    sets = _kernsets.available()
    assert "scalar" in sets, sets
    for name in sets:
        yield name
        _kernsets.note(name)


# ---------------------------------------------------------------------------
# matmul / matmul_t / embed
# ---------------------------------------------------------------------------

def quantized(n_out: int, n_in: int, bits: int, gs: int, sdtype: Any,
              seed: int) -> dict[str, Any]:
    """Random weights quantized by mlx; returns the diag args and the f32 dequantized W."""
    w = mx.array(rng(seed).standard_normal((n_out, n_in)).astype(np.float32) * 0.1)
    w = w.astype(sdtype)
    wq, s, b = mx.quantize(w, group_size=gs, bits=bits)
    s_np, sdt = raw(s)
    b_np, _ = raw(b)
    deq = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=gs,
                        bits=bits)
    return {"args": dict(w=np.array(wq), wdtype="U32", scales=s_np, biases=b_np,
                         sdtype=sdt, bits=bits, group_size=gs),
            "deq": deq, "wq": wq, "s": s.astype(mx.float32), "b": b.astype(mx.float32)}


def run_matmul(op: str, q: dict[str, Any], x: np.ndarray, n_out: int, n_in: int,
               n_threads: int = 2, kernels: str | None = None) -> np.ndarray:
    """Run one matmul-family op through _diag.matmul and return its output."""
    n_tok = x.shape[0]
    out = np.empty((n_tok, n_out if op == "matmul" else n_in), np.float32)
    _diag.matmul(op, out, x=np.ascontiguousarray(x), n_out=n_out, n_in=n_in,
                       n_tok=n_tok, n_threads=n_threads, kernels=kernels, **q["args"])
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_matmul_quantized(bits: int, gs: int) -> None:
    n_out, n_in = 96, 768
    q = quantized(n_out, n_in, bits, gs, mx.bfloat16 if gs != 64 else mx.float32, bits * gs)
    for n_tok in (1, 5):
        x = rng(n_tok).standard_normal((n_tok, n_in)).astype(np.float32)
        ref = mx.array(x) @ q["deq"].T
        qmm = mx.quantized_matmul(mx.array(x), q["wq"], q["s"], q["b"], transpose=True,
                                  group_size=gs, bits=bits)
        for kernels in kernel_sets():
            got = run_matmul("matmul", q, x, n_out, n_in, kernels=kernels)
            assert_close(got, to_np(ref))
            assert_close(got, to_np(qmm))


@pytest.mark.parametrize("sdtype", [mx.bfloat16, mx.float16, mx.float32])
def test_matmul_scale_dtypes(sdtype: Any) -> None:
    n_out, n_in = 40, 512
    q = quantized(n_out, n_in, 4, 64, sdtype, 7)
    x = rng(1).standard_normal((3, n_in)).astype(np.float32)
    for kernels in kernel_sets():
        got = run_matmul("matmul", q, x, n_out, n_in, kernels=kernels)
        assert_close(got, to_np(mx.array(x) @ q["deq"].T))


@pytest.mark.parametrize("wdtype", [mx.float32, mx.bfloat16, mx.float16])
def test_matmul_float_weights(wdtype: Any) -> None:
    n_out, n_in = 33, 300   # odd sizes: float weights have no group constraint
    w = mx.array(rng(3).standard_normal((n_out, n_in)).astype(np.float32)).astype(wdtype)
    w_np, wdt = raw(w)
    for n_tok in (1, 4):
        x = rng(n_tok).standard_normal((n_tok, n_in)).astype(np.float32)
        for kernels in kernel_sets():
            out = np.empty((n_tok, n_out), np.float32)
            _diag.matmul("matmul", out, w_np, x, n_out, n_in, n_tok, wdtype=wdt,
                               n_threads=2, kernels=kernels)
            assert_close(out, to_np(mx.array(x) @ w.astype(mx.float32).T))


@pytest.mark.parametrize("bits,gs", [(4, 64), (3, 32), (8, 128), (6, 64)])
def test_matmul_t(bits: int, gs: int) -> None:
    # MLA absorption with an old-form kv_b_proj: q~ = q_nope @ W_UK, W [n_out, n_in].
    n_out, n_in = 64, 640
    q = quantized(n_out, n_in, bits, gs, mx.bfloat16, 11 * bits)
    w = mx.array(rng(5).standard_normal((n_out, 200)).astype(np.float32)).astype(mx.bfloat16)
    w_np, wdt = raw(w)
    xw = rng(9).standard_normal((2, n_out)).astype(np.float32)
    for kernels in kernel_sets():
        for n_tok in (1, 3):
            x = rng(n_tok).standard_normal((n_tok, n_out)).astype(np.float32)
            got = run_matmul("matmul_t", q, x, n_out, n_in, kernels=kernels)
            assert_close(got, to_np(mx.array(x) @ q["deq"]))
        out = np.empty((2, 200), np.float32)
        _diag.matmul("matmul_t", out, w_np, xw, n_out, 200, 2, wdtype=wdt,
                           n_threads=2, kernels=kernels)
        assert_close(out, to_np(mx.array(xw) @ w.astype(mx.float32)))


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_embed(bits: int) -> None:
    n_vocab, hid = 50, 256
    q = quantized(n_vocab, hid, bits, 64, mx.bfloat16, bits)
    tokens = np.array([0, 49, 7, 7, 23], np.int32)
    for kernels in kernel_sets():
        out = np.empty((len(tokens), hid), np.float32)
        _diag.matmul("embed", out, x=tokens, n_out=n_vocab, n_in=hid,
                           n_tok=len(tokens), n_threads=2, kernels=kernels, **q["args"])
        # Exact: dequantization is one s*q+b per element in f32 on both sides.
        np.testing.assert_array_equal(out, to_np(q["deq"][mx.array(tokens)]))


def test_matmul_thread_independence() -> None:
    n_out, n_in = 301, 1024
    q = quantized(n_out, n_in, 4, 64, mx.bfloat16, 1)
    for kernels in kernel_sets():
        for n_tok in (1, 6):
            x = rng(2).standard_normal((n_tok, n_in)).astype(np.float32)
            outs = [run_matmul("matmul", q, x, n_out, n_in, n_threads=t, kernels=kernels)
                    for t in (1, 2, 3, 5)]
            for o in outs[1:]:
                np.testing.assert_array_equal(o, outs[0])
            xt = x[:, :n_out].copy()
            outs = [run_matmul("matmul_t", q, xt, n_out, n_in, n_threads=t, kernels=kernels)
                    for t in (1, 3)]
            np.testing.assert_array_equal(outs[1], outs[0])


def run_matmul_heads(q: dict[str, Any], x_flat: np.ndarray, out_len: int, n_out: int,
                     n_in: int, n_tok: int, n_head: int, head_rows: int, transposed: bool,
                     y_strides: tuple[int, int], x_strides: tuple[int, int],
                     n_threads: int = 2, kernels: str | None = None) -> np.ndarray:
    """Run matmul_heads through _diag.matmul_heads on a NaN-filled flat output."""
    out = np.full(out_len, np.nan, np.float32)
    _diag.matmul_heads(out, x=x_flat, n_out=n_out, n_in=n_in, n_tok=n_tok,
                             n_head=n_head, w_head_rows=head_rows, transposed=transposed,
                             y_tok_stride=y_strides[0], y_head_stride=y_strides[1],
                             x_tok_stride=x_strides[0], x_head_stride=x_strides[1],
                             n_threads=n_threads, kernels=kernels, **q["args"])
    return out


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bits,gs", [(4, 64), (3, 32), (8, 128)])
def test_matmul_heads(transposed: bool, bits: int, gs: int) -> None:
    # Heads inside one matrix at a row stride larger than a head (kv_b_proj's W_UK^h
    # blocks), strided slices of x read (q_nope of q[t, h, nope | rope]) and a strided
    # layout written (qfull[t, h, kv_lora | rope]) with its gaps untouched.
    H, n_out, n_in, head_rows = 5, 64, 256, 80
    q = quantized((H - 1) * head_rows + n_out, n_in, bits, gs, mx.bfloat16, 7 * bits)
    in_w, out_w = (n_out, n_in) if transposed else (n_in, n_out)
    xh, yh = in_w + 24, out_w + 8          # per-head row widths, wider than used
    for n_tok in (1, 3):
        x3 = rng(n_tok + bits).standard_normal((n_tok, H, xh)).astype(np.float32)
        off = 8                            # x starts inside the head row (q_pe after)
        x_flat = x3.reshape(-1)[off:].copy()
        ref = np.empty((n_tok, H, out_w), np.float32)
        for h in range(H):
            w_h = q["deq"][h * head_rows:h * head_rows + n_out]
            x_h = mx.array(x3[:, h, off:off + in_w])
            ref[:, h] = to_np(x_h @ w_h if transposed else x_h @ w_h.T)
        outs = []
        for kernels in kernel_sets():
            for n_threads in (1, 3):
                got = run_matmul_heads(q, x_flat, n_tok * H * yh, n_out, n_in, n_tok, H,
                                       head_rows, transposed, (H * yh, yh), (H * xh, xh),
                                       n_threads, kernels)
                got3 = got.reshape(n_tok, H, yh)
                assert_close(got3[:, :, :out_w], ref)
                assert np.isnan(got3[:, :, out_w:]).all(), "wrote outside the head rows"
                outs.append(got)
            # Bitwise the same for any thread count.
            np.testing.assert_array_equal(outs[-1], outs[-2])


def test_matmul_heads_shared_input_float() -> None:
    # x_head_stride 0: every head reads the same row (a per-head projection of one
    # input); a bf16 weight stacked [H, n_out, n_in] (w_head_rows = n_out).
    H, n_out, n_in, n_tok = 4, 24, 40, 2
    w = mx.array(rng(3).standard_normal((H * n_out, n_in)).astype(np.float32))
    w = w.astype(mx.bfloat16)
    w_np, wdt = raw(w)
    x = rng(4).standard_normal((n_tok, n_in)).astype(np.float32)
    out = np.empty((n_tok, H, n_out), np.float32)
    _diag.matmul_heads(out, w_np, x.reshape(-1), n_out, n_in, n_tok, H, n_out, False,
                             H * n_out, n_out, n_in, 0, wdtype=wdt, n_threads=2)
    ref = to_np(mx.array(x) @ w.astype(mx.float32).T).reshape(n_tok, H, n_out)
    assert_close(out, ref)


def test_matmul_rejects_short_buffers() -> None:
    q = quantized(16, 128, 4, 64, mx.float32, 1)
    x = np.zeros((1, 64), np.float32)   # n_in is 128
    with pytest.raises(ValueError):
        run_matmul("matmul", q, x.reshape(2, 32)[:1], 16, 128)


# ---------------------------------------------------------------------------
# norms
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("gdtype", [mx.float32, mx.bfloat16])
def test_rmsnorm(gdtype: Any) -> None:
    n_rows, n = 7, 200
    x = rng(1).standard_normal((n_rows, n)).astype(np.float32) * 3
    g = mx.array(rng(2).standard_normal(n).astype(np.float32)).astype(gdtype)
    g_np, gdt = raw(g)
    ref = to_np(mx.fast.rms_norm(mx.array(x), g.astype(mx.float32), 1e-6))
    out = np.empty_like(x)
    _diag.rmsnorm(out, x, n_rows, n, 1e-6, g=g_np, gdtype=gdt, n_threads=2)
    assert_close(out, ref)
    # scale (DeepSeek-style q/k scaling folded in) and no weight (GDN q/k norm).
    _diag.rmsnorm(out, x, n_rows, n, 1e-6, g=g_np, gdtype=gdt, scale=0.25)
    assert_close(out, ref * 0.25)
    _diag.rmsnorm(out, x, n_rows, n, 1e-6)
    assert_close(out, to_np(mx.fast.rms_norm(mx.array(x), None, 1e-6)))
    # in place (y aliases x)
    y = x.copy()
    _diag.rmsnorm(y, y, n_rows, n, 1e-6, g=g_np, gdtype=gdt)
    assert_close(y, ref)


def test_rmsnorm_gated() -> None:
    n_rows, n = 6, 64
    x = rng(1).standard_normal((n_rows, n)).astype(np.float32)
    z = rng(2).standard_normal((n_rows, n)).astype(np.float32) * 4
    w = rng(3).standard_normal(n).astype(np.float32)
    mod = Qwen3NextRMSNormGated(n, eps=1e-6)
    mod.weight = mx.array(w)
    ref = to_np(mod(mx.array(x), mx.array(z)))
    out = np.empty_like(x)
    _diag.rmsnorm(out, x, n_rows, n, 1e-6, g=w, z=z, n_threads=2)
    assert_close(out, ref)


# ---------------------------------------------------------------------------
# rope
# ---------------------------------------------------------------------------

def rope_case(x: np.ndarray, n_rot: int, traditional: bool, pos0: int,
              freqs: np.ndarray, mscale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Rope x [n_tok, H, D] in moeflux and in mlx (as mlx-lm calls it) -> (got, ref)."""
    n_tok, n_heads, d = x.shape
    inv_freq = (np.float32(1.0) / freqs).astype(np.float32)
    got = x.copy()
    _diag.rope(got, n_tok, n_heads, n_heads * d, d, n_rot, inv_freq, pos0,
                     traditional, mscale=mscale, n_threads=2)
    xm = mx.array(x.transpose(1, 0, 2)[None])   # [1, H, T, D]: positions on axis -2
    if mscale != 1.0:
        xm = xm.at[..., :n_rot].multiply(mscale)   # mlx-lm YarnRoPE
    ref = mx.fast.rope(xm, n_rot, traditional=traditional, base=None, scale=1.0,
                       offset=pos0, freqs=mx.array(freqs))
    return got, to_np(ref)[0].transpose(1, 0, 2)


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("n_rot,pos0", [(64, 0), (32, 5), (16, 1000), (64, 3000)])
def test_rope(traditional: bool, n_rot: int, pos0: int) -> None:
    d = 64
    x = rng(pos0 + n_rot).standard_normal((5, 3, d)).astype(np.float32)
    freqs = (np.float32(10000.0) ** (np.arange(0, n_rot, 2, dtype=np.float32) / n_rot))
    got, ref = rope_case(x, n_rot, traditional, pos0, freqs.astype(np.float32))
    assert_close(got, ref)
    np.testing.assert_array_equal(got[..., n_rot:], x[..., n_rot:])   # pass-through


def test_rope_yarn() -> None:
    # DeepSeek-V3 style: YaRN frequencies, interleaved pairs, mscale on the rotated dims.
    from mlx_lm.models.rope_utils import YarnRoPE
    dims = 32
    rope = YarnRoPE(dims, traditional=True, max_position_embeddings=40 * 64, base=10000,
                    scaling_factor=40, original_max_position_embeddings=64, beta_fast=32,
                    beta_slow=1, mscale=1.0, mscale_all_dim=0.8)
    x = rng(4).standard_normal((4, 2, 48)).astype(np.float32)
    freqs = np.array(rope._freqs)
    got, ref = rope_case(x, dims, True, 777, freqs, mscale=rope.mscale)
    assert_close(got, ref)
    ref2 = to_np(rope(mx.array(x.transpose(1, 0, 2)[None]), offset=777))[0].transpose(1, 0, 2)
    assert_close(got, ref2)


# ---------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------

def attention_ref(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos0: int,
                  scale: float) -> np.ndarray:
    """mlx SDPA with an explicit causal mask; q [T, H, dk], k [S, Hkv, dk], v [S, Hkv, dv]."""
    n_tok, n_pos = q.shape[0], k.shape[0]
    mask = np.arange(n_pos)[None, :] <= (pos0 + np.arange(n_tok))[:, None]
    out = mx.fast.scaled_dot_product_attention(
        mx.array(q.transpose(1, 0, 2)[None]), mx.array(k.transpose(1, 0, 2)[None]),
        mx.array(v.transpose(1, 0, 2)[None]), scale=scale, mask=mx.array(mask))
    return to_np(out)[0].transpose(1, 0, 2)


@pytest.mark.parametrize("n_tok,pos0", [(1, 0), (1, 37), (6, 0), (4, 700)])
@pytest.mark.parametrize("n_head,n_kv_head", [(4, 4), (8, 2)])
def test_attention_gqa(n_tok: int, pos0: int, n_head: int, n_kv_head: int) -> None:
    dk = dv = 32
    n_pos = pos0 + n_tok
    r = rng(n_tok * 1000 + pos0)
    q = r.standard_normal((n_tok, n_head, dk)).astype(np.float32)
    # Cache rows of [k heads | v heads] (the layout strides allow).
    cache = r.standard_normal((n_pos, n_kv_head * (dk + dv))).astype(np.float32) * 2
    k = cache[:, :n_kv_head * dk].reshape(n_pos, n_kv_head, dk)
    v = cache[:, n_kv_head * dk:].reshape(n_pos, n_kv_head, dv)
    stride = n_kv_head * (dk + dv)
    scale = dk ** -0.5
    ref = attention_ref(q, k, v, pos0, scale)
    for kernels in kernel_sets():
        out = np.empty((n_tok, n_head, dv), np.float32)
        _diag.attention(out, q, cache, n_tok, n_head, n_kv_head, dk, dv, stride,
                              stride, pos0, scale, k_off=0, v_off=n_kv_head * dk,
                              n_threads=2, kernels=kernels)
        assert_close(out, ref)
        outs = []
        for nt in (1, 3):
            o = np.empty_like(out)
            _diag.attention(o, q, cache, n_tok, n_head, n_kv_head, dk, dv, stride,
                                  stride, pos0, scale, v_off=n_kv_head * dk, n_threads=nt,
                                  kernels=kernels)
            outs.append(o)
        np.testing.assert_array_equal(outs[0], outs[1])


def test_attention_mla_latent() -> None:
    # Absorbed MLA: one kv head; key = cache row [c(kv_lora) | k_pe(rope)], value = c.
    kv_lora, rope_d, n_head, n_tok, pos0 = 64, 16, 4, 3, 20
    n_pos = pos0 + n_tok
    r = rng(5)
    q = r.standard_normal((n_tok, n_head, kv_lora + rope_d)).astype(np.float32)
    cache = r.standard_normal((n_pos, kv_lora + rope_d)).astype(np.float32)
    scale = 0.135
    ref = attention_ref(q, cache[:, None, :], cache[:, None, :kv_lora].copy(), pos0, scale)
    for kernels in kernel_sets():
        out = np.empty((n_tok, n_head, kv_lora), np.float32)
        _diag.attention(out, q, cache, n_tok, n_head, 1, kv_lora + rope_d, kv_lora,
                              kv_lora + rope_d, kv_lora + rope_d, pos0, scale, n_threads=2,
                              kernels=kernels)
        assert_close(out, ref)


# ---------------------------------------------------------------------------
# GatedDeltaNet pieces
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n_tok", [1, 2, 7])
@pytest.mark.parametrize("wdtype", [mx.float32, mx.bfloat16])
def test_conv1d_silu(n_tok: int, wdtype: Any) -> None:
    C, K = 96, 4
    r = rng(n_tok)
    u = r.standard_normal((n_tok, C)).astype(np.float32)
    state = r.standard_normal((K - 1, C)).astype(np.float32)
    w = mx.array(r.standard_normal((C, K, 1)).astype(np.float32)).astype(wdtype)
    w_np, wdt = raw(w)
    full = np.concatenate([state, u], axis=0)   # [K-1+n_tok, C]
    ref = nn_silu(mx.conv1d(mx.array(full[None]), w.astype(mx.float32), groups=C))[0]
    y = np.empty((n_tok, C), np.float32)
    st = state.copy()
    _diag.conv1d_silu(y, st, u, w_np, n_tok, C, K, wdtype=wdt, n_threads=2)
    assert_close(y, to_np(ref))
    np.testing.assert_array_equal(st, full[-(K - 1):])


def test_conv1d_silu_from() -> None:
    # Out of place: history read from state_in (left as it was), advanced one written
    # to state, which starts as garbage.
    C, K, n_tok = 96, 4, 2
    r = rng(5)
    u = r.standard_normal((n_tok, C)).astype(np.float32)
    state_in = r.standard_normal((K - 1, C)).astype(np.float32)
    w = mx.array(r.standard_normal((C, K, 1)).astype(np.float32))
    w_np, wdt = raw(w)
    full = np.concatenate([state_in, u], axis=0)
    ref = nn_silu(mx.conv1d(mx.array(full[None]), w, groups=C))[0]
    y = np.empty((n_tok, C), np.float32)
    st = np.full((K - 1, C), np.nan, np.float32)
    keep = state_in.copy()
    _diag.conv1d_silu_from(y, st, state_in, u, w_np, n_tok, C, K, wdtype=wdt,
                                 n_threads=2)
    assert_close(y, to_np(ref))
    np.testing.assert_array_equal(st, full[-(K - 1):])
    np.testing.assert_array_equal(state_in, keep)


def nn_silu(x: mx.array) -> mx.array:
    """mlx.nn.silu."""
    import mlx.nn as nn
    return nn.silu(x)


@pytest.mark.parametrize("adtype", [mx.float32, mx.bfloat16])
def test_gdn_gates(adtype: Any) -> None:
    n_tok, nv, stride = 5, 6, 8
    r = rng(1)
    ab = r.standard_normal((n_tok, 2 * stride)).astype(np.float32) * 4
    ab[0, :nv] = [40.0, -40.0, 90.0, -90.0, 0.0, 15.0]   # softplus far out in both tails
    a, b = ab[:, :stride], ab[:, stride:]
    A_log_np = r.standard_normal(nv).astype(np.float32)
    A_log_np[2] = -6.0   # small decay rate: g stays visible where softplus(x) = x = 90
    A_log = mx.array(A_log_np).astype(adtype)
    dt = mx.array(r.standard_normal(nv).astype(np.float32)).astype(adtype)
    A_np, Adt = raw(A_log)
    dt_np, dtdt = raw(dt)
    g = np.empty((n_tok, nv), np.float32)
    beta = np.empty((n_tok, nv), np.float32)
    # b is the second half of each row of ab: a flat view starting at column `stride`.
    _diag.gdn_gates(g, beta, ab, ab.reshape(-1)[stride:], 2 * stride, A_np, dt_np,
                          n_tok, nv, A_dtype=Adt, dt_dtype=dtdt)
    g_ref = gd.compute_g(A_log.astype(mx.float32), mx.array(a[:, :nv]),
                         dt.astype(mx.float32))
    assert_close(g, to_np(g_ref))
    assert_close(beta, to_np(mx.sigmoid(mx.array(b[:, :nv]))))


@pytest.mark.parametrize("n_tok", [1, 4])
@pytest.mark.parametrize("nk,nv", [(2, 2), (2, 6)])
def test_gdn_recurrence(n_tok: int, nk: int, nv: int) -> None:
    dk, dv = 32, 16
    r = rng(n_tok * 10 + nv)
    key_dim = nk * dk
    stride = 2 * key_dim + nv * dv + 5   # padded rows, like a conv output with extras
    qkv = r.standard_normal((n_tok, stride)).astype(np.float32)
    q = mx.array(qkv[:, :key_dim].reshape(1, n_tok, nk, dk))
    k = mx.array(qkv[:, key_dim:2 * key_dim].reshape(1, n_tok, nk, dk))
    qn, kn = gd.normalize_qk(q, k, inv_scale=dk ** -0.5, eps=1e-6)
    qkv[:, :key_dim] = to_np(qn).reshape(n_tok, key_dim)
    qkv[:, key_dim:2 * key_dim] = to_np(kn).reshape(n_tok, key_dim)
    v = qkv[:, 2 * key_dim:2 * key_dim + nv * dv]
    g = r.uniform(0.5, 1.0, (n_tok, nv)).astype(np.float32)
    beta = r.uniform(0.0, 1.0, (n_tok, nv)).astype(np.float32)
    S0 = r.standard_normal((nv, dv, dk)).astype(np.float32) * 0.1
    y_ref, S_ref = gd.gated_delta_ops(
        mx.array(qkv[:, :key_dim].reshape(1, n_tok, nk, dk)),
        mx.array(qkv[:, key_dim:2 * key_dim].reshape(1, n_tok, nk, dk)),
        mx.array(v.reshape(1, n_tok, nv, dv)), mx.array(g[None]), mx.array(beta[None]),
        mx.array(S0[None]))
    for kernels in kernel_sets():
        outs = []
        for nt in (1, 3):
            o = np.empty((n_tok, nv, dv), np.float32)
            S = S0.copy()
            _diag.gdn_recurrence(o, S, qkv, stride, 0, key_dim, 2 * key_dim, g, beta,
                                       n_tok, nk, nv, dk, dv, n_threads=nt, kernels=kernels)
            assert_close(o, to_np(y_ref)[0])
            assert_close(S, to_np(S_ref)[0])
            outs.append((o, S))
        np.testing.assert_array_equal(outs[0][0], outs[1][0])
        np.testing.assert_array_equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("n_tok", [1, 4])
def test_gdn_recurrence_from(n_tok: int) -> None:
    # Out of place: S_in read (left as it was), S (garbage before) written; matches
    # mlx-lm and, bitwise, the in-place op on a copy.
    nk, nv, dk, dv = 2, 4, 32, 16
    r = rng(n_tok + 77)
    key_dim = nk * dk
    stride = 2 * key_dim + nv * dv
    qkv = r.standard_normal((n_tok, stride)).astype(np.float32)
    q = mx.array(qkv[:, :key_dim].reshape(1, n_tok, nk, dk))
    k = mx.array(qkv[:, key_dim:2 * key_dim].reshape(1, n_tok, nk, dk))
    qn, kn = gd.normalize_qk(q, k, inv_scale=dk ** -0.5, eps=1e-6)
    qkv[:, :key_dim] = to_np(qn).reshape(n_tok, key_dim)
    qkv[:, key_dim:2 * key_dim] = to_np(kn).reshape(n_tok, key_dim)
    v = qkv[:, 2 * key_dim:]
    g = r.uniform(0.5, 1.0, (n_tok, nv)).astype(np.float32)
    beta = r.uniform(0.0, 1.0, (n_tok, nv)).astype(np.float32)
    S0 = r.standard_normal((nv, dv, dk)).astype(np.float32) * 0.1
    y_ref, S_ref = gd.gated_delta_ops(
        mx.array(qkv[:, :key_dim].reshape(1, n_tok, nk, dk)),
        mx.array(qkv[:, key_dim:2 * key_dim].reshape(1, n_tok, nk, dk)),
        mx.array(v.reshape(1, n_tok, nv, dv)), mx.array(g[None]), mx.array(beta[None]),
        mx.array(S0[None]))
    for kernels in kernel_sets():
        S_in = S0.copy()
        S = np.full_like(S0, np.nan)
        o = np.empty((n_tok, nv, dv), np.float32)
        _diag.gdn_recurrence_from(o, S, S_in, qkv, stride, 0, key_dim, 2 * key_dim,
                                        g, beta, n_tok, nk, nv, dk, dv, n_threads=3,
                                        kernels=kernels)
        assert_close(o, to_np(y_ref)[0])
        assert_close(S, to_np(S_ref)[0])
        np.testing.assert_array_equal(S_in, S0)
        o2, S2 = np.empty_like(o), S0.copy()
        _diag.gdn_recurrence(o2, S2, qkv, stride, 0, key_dim, 2 * key_dim, g, beta,
                                   n_tok, nk, nv, dk, dv, n_threads=1, kernels=kernels)
        np.testing.assert_array_equal(o, o2)
        np.testing.assert_array_equal(S, S2)


def test_gdn_recurrence_from_no_tokens() -> None:
    # Zero tokens: the state is carried over unchanged.
    nk, nv, dk, dv = 1, 2, 16, 8
    S_in = rng(3).standard_normal((nv, dv, dk)).astype(np.float32)
    S = np.full_like(S_in, np.nan)
    empty = np.empty((0, nv), np.float32)
    _diag.gdn_recurrence_from(np.empty(1, np.float32), S, S_in,
                                    np.empty(1, np.float32), 2 * nk * dk + nv * dv, 0,
                                    nk * dk, 2 * nk * dk, empty, empty, 0, nk, nv, dk, dv)
    np.testing.assert_array_equal(S, S_in)


# ---------------------------------------------------------------------------
# elementwise and rows
# ---------------------------------------------------------------------------

def test_swiglu_and_mul_sigmoid() -> None:
    n_rows, n_cols = 5, 48
    gu = rng(1).standard_normal((n_rows, 2 * n_cols)).astype(np.float32) * 5
    y = np.empty((n_rows, n_cols), np.float32)
    _diag.elementwise("swiglu", y, gu, n_rows, n_cols, 2 * n_cols, b_off=n_cols)
    ref = mlx_swiglu(mx.array(gu[:, :n_cols]), mx.array(gu[:, n_cols:]))
    assert_close(y, to_np(ref))

    x = rng(2).standard_normal((n_rows, n_cols)).astype(np.float32)
    g = rng(3).standard_normal((n_rows, 3 * n_cols)).astype(np.float32) * 5
    y = x.copy()
    _diag.elementwise("mul_sigmoid", y, g, n_rows, n_cols, 3 * n_cols)
    assert_close(y, to_np(mx.array(x) * mx.sigmoid(mx.array(g[:, :n_cols]))))
    y = x.copy()   # one gate per row (shared_expert_gate)
    _diag.elementwise("mul_sigmoid", y, g, n_rows, n_cols, 3 * n_cols, g_cols=1)
    assert_close(y, to_np(mx.array(x) * mx.sigmoid(mx.array(g[:, :1]))))

    y = x[0].copy()
    _diag.elementwise("axpy", y, x[1].copy(), 1, n_cols, 0, alpha=-0.3)
    assert_close(y, to_np(mx.array(x[0]) + (-0.3) * mx.array(x[1])))


def test_scatter_gather_rows() -> None:
    n, n_dst = 40, 6
    r = rng(4)
    src = r.standard_normal((5, n)).astype(np.float32)
    idx = np.array([3, 0, 3, 5, 3], np.int32)   # repeats accumulate in order
    w = r.standard_normal(5).astype(np.float32)
    dst0 = r.standard_normal((n_dst, n)).astype(np.float32)
    dst = dst0.copy()
    _diag.rows("scatter_add", dst, src, idx, 5, n, n_dst, 5, w=w)
    ref = mx.array(dst0).at[mx.array(idx)].add(mx.array(w)[:, None] * mx.array(src))
    assert_close(dst, to_np(ref))
    dst = dst0.copy()
    _diag.rows("scatter_add", dst, src, idx, 5, n, n_dst, 5)
    assert_close(dst, to_np(mx.array(dst0).at[mx.array(idx)].add(mx.array(src))))

    out = np.empty((4, n), np.float32)
    gidx = np.array([4, 0, 4, 2], np.int32)
    _diag.rows("gather", out, src, gidx, 4, n, 4, 5)
    np.testing.assert_array_equal(out, to_np(mx.array(src)[mx.array(gidx)]))


def test_public_core_has_no_diag_functions() -> None:
    """The single-op functions live only in the test-only moeflux._diag."""
    from moeflux import _core

    ops = {n for n in dir(_diag) if not n.startswith("__")}
    assert ops and not [n for n in dir(_core) if "diag" in n or n in ops]


# ---------------------------------------------------------------------------
# Whole models under each kernel set
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_next", "deepseek_v3", "qwen3_moe"])
def test_forward_each_kernel_set(arch: str,
                                 converted: Callable[..., tuple[Path, Path]]) -> None:
    """A whole model (synth default of each family) opened with backend "cpu:<set>"
    for every set this build and CPU run: the prompt's logits at every position
    (prefill: the dequantized-tile gemm) and 8 decode steps (qdot_rows) against mlx-lm,
    in both tiers (the acceptance bar and the CPU regression tier)."""
    import moeflux

    ckpt, model_dir = converted(arch)
    cont = continuation(512, 8, seed=21)
    ref_prompt = reference_logits(ckpt, FWD_PROMPT)
    ref_decode = reference_decode(ckpt, FWD_PROMPT, cont)[1:]
    for kernels in kernel_sets():
        with moeflux.Model(model_dir, threads=2, backend=f"cpu:{kernels}") as m:
            ours = m.eval(FWD_PROMPT, all_logits=True)
            rows = np.stack([m.eval([t]) for t in cont])
        for tier in ("acceptance", "cpu"):   # RTOL, then RTOL_CPU
            assert_logits_close(ours, ref_prompt, f"{kernels} prefill", backend=tier)
            assert_logits_close(rows, ref_decode, f"{kernels} decode", backend=tier)


def test_forward_kernel_set_errors(converted: Callable[..., tuple[Path, Path]]) -> None:
    """An unknown kernel set, or one this CPU does not run, is a BackendError naming
    it and the sets that would do."""
    import moeflux
    from moeflux.errors import BackendError

    _, model_dir = converted("qwen3_moe")
    have = _kernsets.available()
    for bad in ["sse9", "", *[k for k in _kernsets.KNOWN if k not in have]]:
        with pytest.raises(BackendError, match=f"'{bad}'.*{have[-1]}"):
            moeflux.Model(model_dir, threads=1, backend=f"cpu:{bad}")


@pytest.mark.parametrize("arch", CPU_ARCHS)
def test_forward_emulated(arch: str, converted: Callable[..., tuple[Path, Path]],
                          tmp_path: Path) -> None:
    """A whole model through the C API in another process: $MOEFLUX_RUN_LOGITS is the
    command that runs tests/c/run_logits.c (make test-neon: built for aarch64, under
    qemu-aarch64) and $MOEFLUX_RUN_LOGITS_SET the kernel set it forces. The prompt's
    logits at every position and 7 decode steps against mlx-lm, in both tiers.
    Without the variables (every run but make test-neon's) it is skipped; make
    test-neon requires the neon set exercised, so a skip there fails."""
    runner, kset = (os.environ.get("MOEFLUX_RUN_LOGITS"),
                    os.environ.get("MOEFLUX_RUN_LOGITS_SET"))
    if not runner or not kset:
        pytest.skip("make test-neon runs this (MOEFLUX_RUN_LOGITS / _SET unset)")
    ckpt, model_dir = converted(arch)
    cont = continuation(512, 8, seed=21)
    tokens = FWD_PROMPT + cont[:-1]
    out = tmp_path / "logits.f32"
    cmd = [*shlex.split(runner), str(model_dir), f"cpu:{kset}", str(len(FWD_PROMPT)),
           str(out), *map(str, tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    rows = np.fromfile(out, np.float32).reshape(len(tokens), -1)
    n = len(FWD_PROMPT)
    ref_prompt = reference_logits(ckpt, FWD_PROMPT)
    ref_decode = reference_decode(ckpt, FWD_PROMPT, cont[:-1])[1:]
    for tier in ("acceptance", "cpu"):   # RTOL, then RTOL_CPU
        assert_logits_close(rows[:n], ref_prompt, f"{kset} prefill", backend=tier)
        assert_logits_close(rows[n:], ref_decode, f"{kset} decode", backend=tier)
    _kernsets.note(kset)
