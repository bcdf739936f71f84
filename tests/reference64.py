"""A float64 oracle: mlx-lm's own forward pass in float64 on the CPU.

tests/reference.py runs mlx-lm in float32, as the engine runs. Over thousands of
positions some rows of a model are ill-conditioned, and there two float32 forwards
can each be off by more than the CPU regression tier while both are right to float32
precision. This oracle is the same mlx-lm model with every weight in float64 (the
quantized layers dequantized exactly: scale * code + bias in float64 from the
checkpoint's own codes, scales and biases), run by the model's own __call__, so that
"ours vs float64" measures the engine's own rounding alone.

MLX 0.32 on the CPU accepts float64 almost everywhere but does not compute everything
in it; measured against numpy float64 (tests/test_long_context.py checks the ones
used here):
- mx.gather_mm refuses float64 ("Currently only supports float32"): the expert layers
  (mlx-lm's SwitchLinear) are replaced by SwitchLinear64, one plain matmul per expert
  over the rows routed to it.
- mx.exp is a float32-accurate approximation (relative error ~1e-7 at |x| < 1, ~1e-6
  at |x| ~ 10), and so are mx.sigmoid, mx.logaddexp (nn.softplus) and mx.softmax;
  mx.sin / mx.cos reduce the argument in float32 precision (1e-4 off at 4,000 rad).
  mx.fast.rms_norm (1e-6), mx.fast.rope and mx.fast.scaled_dot_product_attention
  (1e-7) inherit this. mx.power, mx.log1p, mx.rsqrt, matmul and the sums are float64.
  Inside float64_math() these names are replaced by plain float64 ops (exp as
  mx.power(e, x); rope's cos and sin from numpy, of the float32 angle the model
  defines: see rope_angles).
- mlx-lm upcasts on purpose with astype(mx.float32) (precise_swiglu of the gated
  norm, exp(A_log) of the GatedDeltaNet decay, DeepSeek's router): inside
  float64_math() mx.float32 names float64, so these upcasts keep float64 (the model
  is also built there, so YaRN's frequency table is computed in float64).
mx.compile is off inside float64_math() (a compiled graph would keep the ops it traced).

A 4,096-position run costs about as much as mlx-lm's float32 one (30-85 s per tiny
model on 2 cores); cached_reference64 keeps its logits in .cache/ref64/ under a key of
everything they depend on (checkpoint bytes, tokens, this file, mlx and mlx-lm
versions), so only the first run on a machine pays it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

_MODELS64: dict[Path, Any] = {}

# Logits on disk (cached_reference64); $MOEFLUX_REF64_CACHE overrides, "off" disables.
CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache" / "ref64"


def _mx() -> Any:
    import mlx.core as mx

    mx.set_default_device(mx.cpu)
    return mx


# ==== float64 forms of the ops MLX computes in float32 precision ====

def exp64(x: Any) -> Any:
    """e ** x in float64 (mx.power is float64-accurate where mx.exp is not)."""
    mx = _mx()
    x = x if isinstance(x, mx.array) else mx.array(x, dtype=mx.float64)
    return mx.power(mx.array(math.e, dtype=x.dtype), x)


def sigmoid64(x: Any, **_: Any) -> Any:
    """1 / (1 + e ** -x)."""
    return 1.0 / (1.0 + exp64(-x))


def logaddexp64(a: Any, b: Any, **_: Any) -> Any:
    """log(e ** a + e ** b) = max + log1p(e ** -|a - b|)."""
    mx = _mx()
    return mx.maximum(a, b) + mx.log1p(exp64(-mx.abs(a - b)))


def softmax64(x: Any, axis: Any = None, precise: bool = True, **_: Any) -> Any:
    """e ** (x - max) normalised along ``axis`` (None: all axes, as mx.softmax)."""
    mx = _mx()
    e = exp64(x - mx.max(x, axis=axis, keepdims=True))
    return e / mx.sum(e, axis=axis, keepdims=True)


def rms_norm64(x: Any, weight: Any, eps: float, **_: Any) -> Any:
    """x / sqrt(mean(x^2) + eps) * weight (weight may be None)."""
    mx = _mx()
    y = x * mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + eps)
    return y if weight is None else y * weight


def _offset(offset: Any) -> int:
    """mx.fast.rope's offset (an int or a one-element array) as an int."""
    return int(offset.item()) if hasattr(offset, "item") else int(offset)


def rope64(x: Any, dims: int, *, traditional: bool, base: float | None, scale: float,
           offset: Any, freqs: Any = None, **_: Any) -> Any:
    """mx.fast.rope with cos, sin and the rotation in float64: the first ``dims``
    features of the row at position offset + l turned by theta_j = position * scale
    * inv_j, inv_j = base ** (-2j / dims) or 1 / freqs[j]. theta_j is the float32
    product of the float32 position and the float32 inv_j, as the model defines it
    (see rope_angles)."""
    mx = _mx()
    theta = rope_angles(x.shape[-2], _offset(offset), dims, base, scale, freqs)
    cos = mx.array(np.cos(theta), dtype=mx.float64)
    sin = mx.array(np.sin(theta), dtype=mx.float64)
    rot = x[..., :dims]
    if traditional:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = mx.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(rot.shape)
    else:
        a, b = rot[..., : dims // 2], rot[..., dims // 2:]
        out = mx.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return mx.concatenate([out, x[..., dims:]], axis=-1) if dims < x.shape[-1] else out


def rope_angles(n: int, offset: int, dims: int, base: float | None, scale: float,
                freqs: Any = None) -> np.ndarray:
    """[n, dims / 2] rotary angles of positions offset .. offset + n - 1.

    The angle is taken as the model defines it, in float32: the float32 inverse
    frequency (the float64 value rounded once) times the float32 position, rounded
    to float32. Hugging Face's reference forward computes it so on purpose (float32,
    autocast off), and mlx-lm and moeflux do the same; it is a definition every
    engine shares, not a rounding to remove (at position 4,096 the float64 angle
    moves qwen3_moe's logits by 1.9e-5 and deepseek_v3's by 4.6e-5 of the largest).
    """
    per = (np.float64(base) ** (np.arange(0, dims, 2) / dims) if freqs is None
           else np.array(freqs.astype(_mx().float64), dtype=np.float64))
    inv = (1.0 / per).astype(np.float32)
    pos = (np.arange(n, dtype=np.float64) + offset).astype(np.float32) * np.float32(scale)
    return (pos[:, None] * inv[None, :]).astype(np.float64)


def _grouped_mask(mask: Any, n_kv: int, group: int) -> Any:
    """An array mask [B, H, L, S] (or broadcastable) laid out as the grouped scores
    [B, Hkv, group, L, S]."""
    if mask.ndim < 4:
        return mask
    if mask.shape[1] == 1:
        return mask[:, :, None]
    return mask.reshape(mask.shape[0], n_kv, group, *mask.shape[2:])


def sdpa64(q: Any, k: Any, v: Any, *, scale: float, mask: Any = None,
           sinks: Any = None, **_: Any) -> Any:
    """mx.fast.scaled_dot_product_attention in plain ops: q [B, Hq, L, D] against
    k, v [B, Hkv, S, *] (Hq a multiple of Hkv); mask None, "causal", boolean (True
    attends) or additive."""
    mx = _mx()
    if sinks is not None:
        raise NotImplementedError("sdpa64: attention sinks")
    b, hq, n, d = q.shape
    hk, s = k.shape[1], k.shape[2]
    g = hq // hk
    scores = (q.reshape(b, hk, g, n, d) * scale) @ k[:, :, None].swapaxes(-1, -2)
    if isinstance(mask, str):
        assert mask == "causal", mask
        keep = (mx.arange(n)[:, None] + (s - n)) >= mx.arange(s)[None, :]
        scores = mx.where(keep, scores, -math.inf)
    elif mask is not None:
        mask = _grouped_mask(mask, hk, g)
        scores = (mx.where(mask, scores, -math.inf) if mask.dtype == mx.bool_
                  else scores + mask)
    out = softmax64(scores, axis=-1) @ v[:, :, None]
    return out.reshape(b, hq, n, v.shape[-1])


@contextlib.contextmanager
def float64_math() -> Iterator[None]:
    """Within: the mx ops above are their float64 forms, mx.float32 names float64,
    mx.compile is off. Everything is put back on exit."""
    mx = _mx()
    core = {"exp": exp64, "sigmoid": sigmoid64, "logaddexp": logaddexp64,
            "softmax": softmax64, "float32": mx.float64}
    fast = {"rope": rope64, "rms_norm": rms_norm64,
            "scaled_dot_product_attention": sdpa64}
    saved = ({k: getattr(mx, k) for k in core}, {k: getattr(mx.fast, k) for k in fast})
    mx.disable_compile()
    try:
        for k, f in core.items():
            setattr(mx, k, f)
        for k, f in fast.items():
            setattr(mx.fast, k, f)
        yield
    finally:
        for k, f in saved[0].items():
            setattr(mx, k, f)
        for k, f in saved[1].items():
            setattr(mx.fast, k, f)
        mx.enable_compile()


# ==== The float64 model ====

def _switch_linear64() -> type:
    """The class SwitchLinear64 (made on first use: mlx is imported lazily)."""
    import mlx.core as mx
    import mlx.nn as nn

    class SwitchLinear64(nn.Module):
        """mlx-lm's SwitchLinear ([E, out, in] weight, one expert per index) without
        mx.gather_mm: each expert's rows in one plain float64 matmul."""

        def __init__(self, weight: Any, bias: Any = None) -> None:
            super().__init__()
            self.weight = weight
            if bias is not None:
                self.bias = bias

        def __call__(self, x: Any, indices: Any, sorted_indices: bool = False) -> Any:
            """x [..., 1, in] broadcast against indices [...] -> [..., 1, out]."""
            shape = indices.shape
            rows = mx.broadcast_to(x, (*shape, *x.shape[-2:])).reshape(-1, x.shape[-1])
            idx = np.array(indices).reshape(-1)
            order = np.argsort(idx, kind="stable")
            bounds = np.searchsorted(idx[order], np.arange(self.weight.shape[0] + 1))
            parts = [rows[mx.array(order[a:b])] @ self.weight[e].T
                     for e, (a, b) in enumerate(zip(bounds, bounds[1:])) if b > a]
            out = mx.concatenate(parts)[mx.array(np.argsort(order))]
            out = out.reshape(*shape, 1, -1)
            if "bias" in self:
                out = out + mx.expand_dims(self["bias"][indices], -2)
            return out

    return SwitchLinear64


def _dequantized(module: Any, mx: Any) -> Any:
    """float64 weight of a quantized module: mx.dequantize with its float64 scales and
    biases (exact: a code times a bf16/f32 scale plus a bias fits float64)."""
    assert module.scales.dtype == mx.float64, module.scales.dtype
    return mx.dequantize(module.weight, module.scales, module.get("biases"),
                         module.group_size, module.bits, module.mode)


def _float64_module(module: Any, mx: Any) -> Any | None:
    """The float64 replacement of one leaf module, or None when it needs none."""
    import mlx.nn as nn
    from mlx_lm.models.mla import MultiLinear, QuantizedMultiLinear
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    bias = module.get("bias")
    if isinstance(module, nn.QuantizedLinear):
        w = _dequantized(module, mx)
        new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    elif isinstance(module, nn.QuantizedEmbedding):
        w = _dequantized(module, mx)
        new = nn.Embedding(*w.shape)
    elif isinstance(module, QuantizedMultiLinear):
        w = _dequantized(module, mx)
        new = MultiLinear(w.shape[2], w.shape[1], w.shape[0])
    elif isinstance(module, (QuantizedSwitchLinear, SwitchLinear)):
        w = _dequantized(module, mx) if isinstance(module, QuantizedSwitchLinear) \
            else module.weight
        return _switch_linear64()(w, bias)
    elif "scales" in module:
        raise TypeError(f"reference64: no float64 form for quantized "
                        f"{type(module).__name__}")
    else:
        return None
    new.weight = w
    if bias is not None:
        new.bias = bias
    return new


def to_float64(model: Any) -> Any:
    """``model`` (mlx-lm, as loaded) with every float parameter in float64 and every
    quantized or gather_mm layer replaced by its float64 form; checked: no float
    parameter of another dtype is left."""
    mx = _mx()
    from mlx.utils import tree_flatten, tree_unflatten

    model.set_dtype(mx.float64)
    swaps = []
    for name, module in model.named_modules():
        new = _float64_module(module, mx)
        if new is not None:
            swaps.append((name, new))
    model.update_modules(tree_unflatten(swaps))
    left = [k for k, v in tree_flatten(model.parameters())
            if mx.issubdtype(v.dtype, mx.floating) and v.dtype != mx.float64]
    assert not left, f"reference64: parameters not in float64: {left}"
    return model


def load_reference64(ckpt_dir: str | Path) -> Any:
    """float64 mlx-lm model of ``ckpt_dir`` (strict load); cached per path."""
    path = Path(ckpt_dir).resolve()
    model = _MODELS64.get(path)
    if model is None:
        mx = _mx()
        from mlx_lm.utils import load_model

        with float64_math():
            model, _ = load_model(path, strict=True)
            model = to_float64(model)
            mx.eval(model.parameters())
        _MODELS64[path] = model
    return model


def forget_reference64(ckpt_dir: str | Path) -> None:
    """Drop the cached float64 model of ``ckpt_dir``."""
    _MODELS64.pop(Path(ckpt_dir).resolve(), None)


def reference64_logits(ckpt_dir: str | Path, tokens: list[int],
                       continuation: list[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """float64 logits: every position of ``tokens`` prefilled into a fresh prompt cache
    ([L, V]), then each single-token step of ``continuation`` on that cache ([C, V])."""
    if not tokens:
        raise ValueError("reference64_logits: empty token list")
    mx = _mx()
    from mlx_lm.models.cache import make_prompt_cache

    model = load_reference64(ckpt_dir)
    with float64_math():
        cache = make_prompt_cache(model)
        logits = model(mx.array([list(tokens)], dtype=mx.int32), cache=cache)
        mx.eval(logits)
        prefill = np.array(logits[0])
        rows = []
        for t in continuation:
            logits = model(mx.array([[int(t)]], dtype=mx.int32), cache=cache)
            mx.eval(logits)
            rows.append(np.array(logits[0, -1]))
    width = prefill.shape[-1]
    return prefill, np.stack(rows) if rows else np.zeros((0, width))


def _cache_key(ckpt_dir: Path, tokens: list[int], continuation: list[int]) -> str:
    """Hash of everything the float64 logits depend on."""
    import mlx.core as mx
    import mlx_lm

    h = hashlib.sha256()
    for f in sorted(p for p in ckpt_dir.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(ckpt_dir)).encode())
        h.update(f.read_bytes())
    h.update(json.dumps([list(tokens), list(continuation), mx.__version__,
                         mlx_lm.__version__]).encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:32]


def cached_reference64(ckpt_dir: str | Path, tokens: list[int],
                       continuation: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """reference64_logits, kept on disk (see CACHE_DIR); the model is dropped after
    a run, as the tests' float32 oracles drop theirs."""
    ckpt = Path(ckpt_dir).resolve()
    where = os.environ.get("MOEFLUX_REF64_CACHE", str(CACHE_DIR))
    path = None if where == "off" else \
        Path(where) / f"{_cache_key(ckpt, tokens, continuation)}.npz"
    if path is not None and path.exists():
        with np.load(path) as z:
            return z["prefill"], z["decode"]
    try:
        prefill, decode = reference64_logits(ckpt, tokens, continuation)
    finally:
        forget_reference64(ckpt)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, prefill=prefill, decode=decode)
        os.replace(tmp, path)
    return prefill, decode
