"""The qwen3_moe forward pass (csrc/models/qwen3_moe.c) against mlx-lm in float32.

Each case is a synthetic mlx-community checkpoint (conftest ``synth_checkpoint``)
converted by ``moeflux.prep.convert`` and opened with ``moeflux.Model``. The oracle is
``tests/reference.py`` (mlx-lm's own forward). Acceptance, per position: max |ours -
ref| <= 1e-3 * max |ref| and the same argmax, for a full prompt (every position) and
for a prefill followed by 32 single-token decode steps.

The cases cover what changes the code path: the 8-bit router override (mlx-lm's
qwen3_moe quant predicate) and a 4-bit router (conversions made before it), group
sizes 32/64/128, 3/4/6/8-bit weights, dense layers from mlp_only_layers and the
decoder_sparse_step grid, norm_topk_prob off, GQA ratios 1, 2 and 4, tied embeddings.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import moeflux
from moeflux.prep.convert import convert
from reference import reference_decode, reference_logits

REL_TOL = 1e-3
PROMPT = [1, 5, 77, 300, 12, 9, 411, 42, 8, 100, 250, 3]
N_DECODE = 32

# (id, tiny_config overrides). The synth default: hidden 256, 2 layers, 4 heads over 2
# kv heads of 64, 8 experts, k 2, I 64, 4-bit gs 64 with an 8-bit gs 64 router.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("base", {}),
    ("router4bit-gs32", {"gate_bits": None, "group_size": 32}),
    ("gs128-8bit-mha", {"group_size": 128, "bits": 8, "moe_intermediate_size": 128,
                        "num_key_value_heads": 4}),
    # Layers 1 and 3 MoE (sparse step 2) except layer 1 listed in mlp_only_layers, so
    # only layer 3 is MoE; the others are dense SwiGLU of intermediate_size.
    ("dense-layers-no-renorm-gqa4", {"num_hidden_layers": 4, "mlp_only_layers": [1],
                                     "decoder_sparse_step": 2, "norm_topk_prob": False,
                                     "num_key_value_heads": 1}),
    ("tied-k3-e16", {"tie_word_embeddings": True, "num_experts": 16,
                     "num_experts_per_tok": 3}),
    # Bit-stream code widths: 6-bit weights with a 4-bit router, 3-bit everywhere.
    ("6bit-router4", {"bits": 6, "gate_bits": 4}),
    ("3bit-gs128", {"bits": 3, "gate_bits": None, "group_size": 128,
                    "moe_intermediate_size": 128}),
]


@pytest.fixture(scope="session")
def converted(synth_checkpoint: Callable[..., Path],
              tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Path, Path]]:
    """Factory: overrides -> (checkpoint dir, converted model dir), once each."""
    done: dict[str, tuple[Path, Path]] = {}

    def make(**overrides: Any) -> tuple[Path, Path]:
        ckpt = synth_checkpoint("qwen3_moe", **overrides)
        if ckpt.name not in done:
            dst = tmp_path_factory.mktemp("model") / ckpt.name
            convert(ckpt, dst, progress=False)
            done[ckpt.name] = (ckpt, dst)
        return done[ckpt.name]

    return make


def assert_close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    """The acceptance rule, row by row (one row per position)."""
    ours = np.atleast_2d(ours)
    ref = np.atleast_2d(ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    assert np.isfinite(ours).all(), f"{what}: non-finite logits"
    err = np.abs(ours - ref).max(axis=-1)
    scale = np.abs(ref).max(axis=-1)
    bad = np.nonzero(err > REL_TOL * scale)[0]
    assert bad.size == 0, (f"{what}: positions {bad.tolist()} off by "
                           f"{(err / scale)[bad].tolist()} (relative)")
    am_ours, am_ref = ours.argmax(-1), ref.argmax(-1)
    diff = np.nonzero(am_ours != am_ref)[0]
    assert diff.size == 0, (f"{what}: argmax differs at positions {diff.tolist()}: "
                            f"{am_ours[diff].tolist()} vs {am_ref[diff].tolist()}")


def continuation(n_vocab: int, n: int, seed: int = 7) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, n_vocab, n)]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_prefill_and_decode(case: tuple[str, dict[str, Any]],
                            converted: Callable[..., tuple[Path, Path]]) -> None:
    """All-position prefill logits, then 32 single-token decode steps."""
    _, overrides = case
    ckpt, model_dir = converted(**overrides)
    with moeflux.Model(model_dir, threads=2) as m:
        assert m.arch == "qwen3_moe"
        ours = m.eval(PROMPT, all_logits=True)
        assert_close(ours, reference_logits(ckpt, PROMPT), "prefill")
        cont = continuation(m.n_vocab, N_DECODE)
        ref = reference_decode(ckpt, PROMPT, cont)
        assert_close(ours[-1], ref[0], "prefill last row vs cached reference")
        rows = [m.eval([t]) for t in cont]
        assert_close(np.stack(rows), ref[1:], "decode")
        assert m.n_past == len(PROMPT) + N_DECODE


def test_router_bits_follow_the_file(converted: Callable[..., tuple[Path, Path]]) -> None:
    """The two router cases really hold 8-bit and 4-bit routers (so the cases above
    cover both), and mlx-lm's config block says the same."""
    for overrides, bits in (({}, 8), ({"gate_bits": None, "group_size": 32}, 4)):
        ckpt, model_dir = converted(**overrides)
        man = json.loads((model_dir / "model_weights.json").read_text())
        t = man["tensors"]["model.layers.0.mlp.gate.weight"]
        assert t["shape"][-1] * 32 // 256 == bits


@pytest.mark.parametrize("cuts", [[1], [4, 9]], ids=str)
def test_prompt_in_pieces_equals_one_shot(cuts: list[int],
                                          converted: Callable[..., tuple[Path, Path]]
                                          ) -> None:
    """The prompt fed in pieces gives every position's logits (a piece attends to K/V
    rows written by earlier calls)."""
    ckpt, model_dir = converted()
    ref = reference_logits(ckpt, PROMPT)
    with moeflux.Model(model_dir, threads=2) as m:
        bounds = [0, *cuts, len(PROMPT)]
        parts = [m.eval(PROMPT[a:b], all_logits=True) for a, b in zip(bounds, bounds[1:])]
    assert_close(np.concatenate(parts), ref, f"pieces at {cuts}")


def test_long_prompt_crosses_internal_chunks(converted: Callable[..., tuple[Path, Path]]
                                             ) -> None:
    """A prompt longer than the forward's 64-token scratch runs in internal chunks;
    every position must still match, and so must decoding after it."""
    ckpt, model_dir = converted()
    prompt = continuation(512, 150, seed=3)
    with moeflux.Model(model_dir, threads=2) as m:
        ours = m.eval(prompt, all_logits=True)
        assert_close(ours, reference_logits(ckpt, prompt), "150-token prefill")
        cont = continuation(512, 4, seed=4)
        rows = [m.eval([t]) for t in cont]
    ref = reference_decode(ckpt, prompt, cont)
    assert_close(np.stack(rows), ref[1:], "decode after 150 tokens")


def test_kv_cache_bytes_per_token(converted: Callable[..., tuple[Path, Path]]) -> None:
    """The state grows by K and V of num_key_value_heads * head_dim f32 per layer per
    token."""
    ckpt, model_dir = converted()
    cfg = json.loads((ckpt / "config.json").read_text())
    per_tok = (cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] *
               cfg["head_dim"] * 4)
    with moeflux.Model(model_dir, threads=2) as m:
        m.eval(PROMPT[:4])
        s4 = m.state_size
        m.eval(PROMPT[4:11])
        s11 = m.state_size
    assert s11 - s4 == 7 * per_tok


def test_truncate_and_snapshot_are_exact(converted: Callable[..., tuple[Path, Path]]
                                         ) -> None:
    """Attention-only state: truncating to n and continuing equals a sequence that
    only ever had n tokens; a snapshot restores bit for bit."""
    ckpt, model_dir = converted()
    cont = continuation(512, 6, seed=5)
    ref = reference_decode(ckpt, PROMPT[:5], cont)
    with moeflux.Model(model_dir, threads=2) as m:
        m.eval(PROMPT)
        m.truncate(5)
        assert m.n_past == 5
        snap = m.save_state()
        rows = [m.eval([t]) for t in cont]
        assert_close(np.stack(rows), ref[1:], "decode after truncate")
        m.load_state(snap)
        again = [m.eval([t]) for t in cont]
    np.testing.assert_array_equal(np.stack(again), np.stack(rows))


def test_failed_eval_leaves_state_unchanged(tmp_path: Path,
                                            converted: Callable[..., tuple[Path, Path]]
                                            ) -> None:
    """An expert read failing in the last layer (file truncated after open) raises
    after the first layer wrote its K/V rows; the position stays, and decoding
    continues exactly once the file is whole again."""
    ckpt, src_dir = converted()
    model_dir = tmp_path / "model"
    shutil.copytree(src_dir, model_dir)
    cont = continuation(512, 3, seed=11)
    ref = reference_decode(ckpt, PROMPT, cont)
    n_layer = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    victim = model_dir / "packed_experts" / f"layer_{n_layer - 1:02d}.bin"
    blob = victim.read_bytes()
    with moeflux.Model(model_dir, threads=2) as m:
        m.eval(PROMPT)
        with open(victim, "r+b") as f:   # same inode: the open descriptor sees it
            f.truncate(0)
        for tok in cont[:2]:
            with pytest.raises(OSError):
                m.eval([tok, cont[1]])
            assert m.n_past == len(PROMPT)
        with open(victim, "r+b") as f:
            f.write(blob)
        rows = [m.eval([t]) for t in cont]
    assert_close(np.stack(rows), ref[1:], "decode after failed evals")
