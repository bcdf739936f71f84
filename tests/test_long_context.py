"""4,096 positions through each sequence mixer, against mlx-lm in float32 and float64.

The other forward tests stop at 150 positions. Here a 4,096-token sequence goes through
small-width models of each mixer: softmax attention with GQA (qwen3_moe), GatedDeltaNet
plus gated attention (qwen3_5_moe, qwen3_next: the recurrent state carried over 4,096
steps, and attention over the full-attention layers' 4,096-row cache) and MLA
(deepseek_v3, YaRN rope at positions past its original 4,096-position window's first
half). The tokens go in as a server feeds a long prompt: in pieces of uneven sizes (the
engine splits each further into its 64-token scratch chunks), one of them a single
token, every position's logits kept, then 4 decode steps.

Two oracles, both mlx-lm's own forward (the whole sequence in one causal prefill into
a fresh prompt cache, then single-token steps on that cache):
- float32 (tests/reference.py), for the acceptance bar RTOL and the same argmax at
  every position and decode step;
- float64 (tests/reference64.py: the same model and checkpoint with float64 weights
  and float64 math), for the CPU regression tier RTOL_CPU at every position and decode
  step, and the median position within RTOL_CPU / 10.
Why float64 for the tier: over 4,096 positions a hybrid has ill-conditioned positions,
where a GatedDeltaNet head's output nearly cancels (at qwen3_next's position 608 one
head's RMS is 13x below its median) and the gated RMSNorm scales it back, amplifying
every float32 rounding upstream 10-25x. There mlx-lm's float32 forward is itself up
to 5.1e-5 (qwen3_next) of the largest logit away from float64, so float32-vs-float32
summed two such errors (6.3e-5). Against float64, the engine's best kernel set on the
development VM (AVX-512) is at most 4.4e-5 (qwen3_5_moe) and 3.0e-5 (qwen3_next), the
AVX2 set 3.2e-5 and 3.8e-5, with medians 1.8e-6; qwen3_moe and deepseek_v3 within
6.4e-6 (bench/RESULTS.md, "Long context against a float64 oracle"). That leaves the
hybrids' worst positions a margin of 12-24%, not 10x: they are the model's own
conditioning (only a float64 forward removes it), and a kernel change that reorders a
sum moves them by ~1e-5 either way. The scalar set reaches 5.65e-5 at one qwen3_5_moe
position, so this test holds the build's best set (the one every caller gets); the
scalar set is left to the kernel tests. A plumbing bug (a wrong eps, rope base or
scale) moves every position and fails the median check as well as the tier.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from _helpers import RTOL_CPU, assert_close, continuation, converted, eval_in_pieces
from reference import forget_reference, load_reference
from reference64 import cached_reference64

__all__ = ["converted"]  # the fixture is used by name

N_POS = 4096
CUTS = [1000, 1001, 2600]     # pieces of 1000, 1, 1599 and 1496 tokens
N_DECODE = 4

# (arch, tiny_config overrides): room for 4,096 positions and the decode steps after.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("qwen3_moe", {"max_position_embeddings": 8192}),
    ("qwen3_5_moe", {"max_position_embeddings": 8192}),
    ("qwen3_next", {"max_position_embeddings": 8192}),
    ("deepseek_v3", {}),
]


def oracle(ckpt: Path, tokens: list[int], cont: list[int]) -> tuple[np.ndarray,
                                                                    np.ndarray]:
    """mlx-lm: every position's logits of ``tokens`` prefilled into a fresh prompt
    cache, then the logits of each single-token step of ``cont`` on that cache."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    model = load_reference(ckpt)
    try:
        cache = make_prompt_cache(model)
        logits = model(mx.array([tokens], dtype=mx.int32), cache=cache)
        mx.eval(logits)
        prefill = np.array(logits[0].astype(mx.float32))
        rows = []
        for t in cont:
            logits = model(mx.array([[int(t)]], dtype=mx.int32), cache=cache)
            mx.eval(logits)
            rows.append(np.array(logits[0, -1].astype(mx.float32)))
        return prefill, np.stack(rows)
    finally:
        forget_reference(ckpt)


def run(model_dir: Path, tokens: list[int], cont: list[int],
        backend: str) -> tuple[np.ndarray, np.ndarray]:
    """moeflux: ``tokens`` in the pieces CUTS makes (every position), then ``cont``
    one token at a time."""
    import moeflux

    with moeflux.Model(model_dir, threads=2, n_ctx=N_POS + N_DECODE, backend=backend) as m:
        ours = eval_in_pieces(m, tokens, CUTS)
        rows = np.stack([m.eval([t]) for t in cont])
        assert m.n_past == N_POS + N_DECODE
    return ours, rows


def median_rel(ours: np.ndarray, ref: np.ndarray) -> float:
    """The median over positions of max |ours - ref| / max |ref| (row by row)."""
    scale = np.abs(ref).max(axis=-1).astype(np.float64)
    return float(np.median(np.abs(ours.astype(np.float64) - ref).max(axis=-1) / scale))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_long_context(case: tuple[str, dict[str, Any]],
                      converted: Callable[..., tuple[Path, Path]]) -> None:
    """4,096 positions in four pieces (every position's logits), then 4 decode steps:
    the acceptance bar against mlx-lm float32, the CPU tier against mlx-lm float64 at
    every position (see the module's docstring)."""
    import _kernsets

    arch, overrides = case
    ckpt, model_dir = converted(arch, **overrides)
    tokens = continuation(512, N_POS, seed=41)
    cont = continuation(512, N_DECODE, seed=42)
    ref, ref_dec = oracle(ckpt, tokens, cont)
    ref64, ref64_dec = cached_reference64(ckpt, tokens, cont)
    ours, rows = run(model_dir, tokens, cont, "cpu")
    best = _kernsets.available()[0]
    what = f"{arch} {N_POS} positions in pieces ({best})"
    assert_close(ours, ref, what, backend="acceptance")
    assert_close(rows, ref_dec, f"{arch} decode after {N_POS}", backend="acceptance")
    assert_close(ours, ref64, f"{what} vs float64", backend="cpu")
    assert_close(rows, ref64_dec, f"{arch} decode after {N_POS} vs float64",
                 backend="cpu")
    median = median_rel(ours, ref64)
    print(f"{arch} ({best}) vs float64: median position {median:.3g}, mlx-lm float32 "
          f"vs float64: median {median_rel(ref, ref64):.3g}")
    assert median <= RTOL_CPU / 10, f"{arch}: median position off by {median:.3g}"
    _kernsets.note(best)


# ==== The float64 oracle itself ====

def test_float64_ops() -> None:
    """reference64's float64 forms of the ops MLX computes in float32 precision equal
    numpy float64 (to ~1e-15), and compute the same functions as the mx ops they
    stand for (to their float32-level error)."""
    import mlx.core as mx
    import reference64 as r64

    rng = np.random.default_rng(0)
    f64 = lambda a: mx.array(a, dtype=mx.float64)  # noqa: E731 (mx.array(np) is float32)
    x = rng.uniform(-20, 20, (8, 96))
    e = np.exp(x - x.max(-1, keepdims=True))
    for got, want, mine in [
            (r64.exp64(f64(x)), np.exp(x), mx.exp(f64(x))),
            (r64.sigmoid64(f64(x)), 1 / (1 + np.exp(-x)), mx.sigmoid(f64(x))),
            (r64.logaddexp64(f64(x), 0), np.logaddexp(x, 0), mx.logaddexp(f64(x), 0)),
            (r64.softmax64(f64(x), axis=-1), e / e.sum(-1, keepdims=True),
             mx.softmax(f64(x), axis=-1)),
            (r64.rms_norm64(f64(x), f64(x[0]), 1e-6),
             x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * x[0],
             mx.fast.rms_norm(f64(x), f64(x[0]), 1e-6))]:
        scale = np.abs(want).max()
        assert np.abs(np.array(got) - want).max() <= 1e-14 * scale
        assert np.abs(np.array(mine) - want).max() <= 1e-5 * scale
    check_rope64(rng, f64)
    check_sdpa64(rng, f64)


def check_rope64(rng: np.random.Generator, f64: Callable[[np.ndarray], Any]) -> None:
    """rope64 at position 4,090 equals numpy's rotation by the float32 angle, in both
    layouts, and mx.fast.rope near position 0 (where its float32 sin/cos is exact
    enough); YaRN-style frequencies too."""
    import mlx.core as mx
    import reference64 as r64

    x = rng.standard_normal((1, 2, 5, 48))
    for trad, base, freqs in [(False, 1e7, None), (True, 1e4, None),
                              (True, None, mx.array(np.geomspace(1, 3e4, 8)))]:
        kw = dict(traditional=trad, base=base, scale=1.0, freqs=freqs)
        th = r64.rope_angles(5, 4090, 16, base, 1.0, freqs)
        c, s = np.cos(th), np.sin(th)
        lo, hi = (x[..., 0:16:2], x[..., 1:16:2]) if trad else (x[..., :8], x[..., 8:16])
        a, b = lo * c - hi * s, lo * s + hi * c
        rot = np.stack([a, b], -1).reshape(a.shape[:-1] + (16,)) if trad else \
            np.concatenate([a, b], -1)
        want = np.concatenate([rot, x[..., 16:]], -1)
        got = np.array(r64.rope64(f64(x), 16, offset=4090, **kw))
        assert np.abs(got - want).max() <= 1e-14
        near = np.array(mx.fast.rope(f64(x), 16, offset=3, **kw))
        mine = np.array(r64.rope64(f64(x), 16, offset=3, **kw))
        assert np.abs(mine - near).max() <= 1e-5


def check_sdpa64(rng: np.random.Generator, f64: Callable[[np.ndarray], Any]) -> None:
    """sdpa64 (GQA, causal over a longer cache, boolean and additive masks) equals
    numpy's attention, and mx.fast.scaled_dot_product_attention to float32 level."""
    import mlx.core as mx
    import reference64 as r64

    q = rng.standard_normal((1, 4, 5, 32))
    k, v = rng.standard_normal((1, 2, 9, 32)), rng.standard_normal((1, 2, 9, 24))
    causal = np.arange(5)[:, None] + 4 >= np.arange(9)[None, :]
    add = rng.standard_normal((1, 4, 5, 9))
    hide = np.where(causal, 0.0, -np.inf)
    for mask, bias in [(None, 0.0), ("causal", hide), (mx.array(causal), hide),
                       (f64(add), add)]:
        s = q @ np.repeat(k, 2, 1).swapaxes(-1, -2) * 0.3 + bias
        p = np.exp(s - s.max(-1, keepdims=True))
        want = p / p.sum(-1, keepdims=True) @ np.repeat(v, 2, 1)
        got = np.array(r64.sdpa64(f64(q), f64(k), f64(v), scale=0.3, mask=mask))
        assert np.abs(got - want).max() <= 1e-14
        fast = mx.fast.scaled_dot_product_attention(f64(q), f64(k), f64(v), scale=0.3,
                                                    mask=mask)
        assert np.abs(np.array(fast) - want).max() <= 1e-5


@pytest.mark.parametrize("arch", [c[0] for c in CASES])
def test_float64_oracle_short(arch: str,
                              converted: Callable[..., tuple[Path, Path]]) -> None:
    """On 100 positions and 4 decode steps the float64 oracle and mlx-lm float32 agree
    within the CPU tier (medians ~2e-6: float32's own error), same argmax; no
    parameter of the float64 model is left in another float type."""
    from reference64 import forget_reference64, load_reference64, reference64_logits

    ckpt, _ = converted(arch, **dict(CASES)[arch])
    tokens, cont = continuation(512, 100, seed=41), continuation(512, 4, seed=42)
    try:
        load_reference64(ckpt)   # to_float64 asserts every float parameter is float64
        ref64, ref64_dec = reference64_logits(ckpt, tokens, cont)
    finally:
        forget_reference64(ckpt)
    assert ref64.dtype == np.float64 and ref64_dec.dtype == np.float64
    ref, ref_dec = oracle(ckpt, tokens, cont)
    assert_close(ref, ref64, f"{arch} mlx-lm float32 vs float64", backend="cpu")
    assert_close(ref_dec, ref64_dec, f"{arch} decode float32 vs float64", backend="cpu")
    assert median_rel(ref, ref64) <= RTOL_CPU / 10
