"""The minimax forward pass (csrc/models/minimax.c) against mlx-lm in float32.

Each case is a synthetic mlx-community checkpoint (conftest ``synth_checkpoint``,
mlx-lm's minimax layout, proved equal to mlx-lm's own conversion by
tests/test_synth.py: q/k RMSNorms over all heads' dims, an 8-bit router with its f32
e_score_correction_bias under block_sparse_moe, stacked experts of width
intermediate_size) converted by ``moeflux.prep.convert`` and opened with
``moeflux.Model``; one more is written by mlx-lm itself (its ``minimax.Model`` with
seeded random weights, ``quantize_model`` with the model's own predicate,
``save_model``). The oracle is ``tests/reference.py`` (mlx-lm's own forward). Every
comparison holds the CPU regression tier, which implies the 1e-3 acceptance bar, and
equal argmax: a full prompt (every position) and a prefill followed by 32
single-token decode steps.

The cases cover what changes the code path: use_qk_norm on and off, rotary_dim a half,
a quarter and all of head_dim, head_dim != hidden / heads, tied and untied heads, GQA
1 / 2 / 4, 2 to 4 routed experts of 8 or 16, 3/4/8-bit weights, group sizes 32/64/128
(128 leaves the experts' down_proj in float: layout version 2) and a 6-bit router.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import moeflux
from _helpers import (FWD_PROMPT, assert_close, check_failed_eval_recovers,
                      check_long_prompt, check_prefill_and_decode,
                      check_prompt_in_pieces, check_truncate_and_snapshot, continuation,
                      converted, state_growth_of_7_tokens)
from reference import reference_decode, reference_logits

__all__ = ["converted"]  # the fixture is used by name

ARCH = "minimax"

# (id, tiny_config overrides). The synth default (MiniMax-M2's choices at tiny size):
# hidden 256, 3 layers all MoE, 4 heads over 2 kv heads of 64, 32 dims rotated, q/k
# norms over all heads' dims, 8 experts of 64, k 2, router 8-bit, 4-bit gs 64.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("base", {}),
    ("noqknorm-tied-gqa4", {"use_qk_norm": False, "tie_word_embeddings": True,
                            "num_key_value_heads": 1}),
    ("fullrot-mha-3bit-gs32", {"rotary_dim": 64, "num_key_value_heads": 4, "bits": 3,
                               "group_size": 32, "gate_bits": 6}),
    ("16exp-k3-hd48-rot16-8bit", {"num_local_experts": 16, "num_experts_per_tok": 3,
                                  "head_dim": 48, "rotary_dim": 16, "bits": 8,
                                  "intermediate_size": 128, "num_hidden_layers": 4}),
    ("gs128-float-down-k4", {"group_size": 128, "num_experts_per_tok": 4}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_prefill_and_decode(case: tuple[str, dict[str, Any]],
                            converted: Callable[..., tuple[Path, Path]]) -> None:
    """All-position prefill logits, then 32 single-token decode steps."""
    _, overrides = case
    ckpt, model_dir = converted(ARCH, **overrides)
    check_prefill_and_decode(model_dir, ARCH, lambda t: reference_logits(ckpt, t),
                             lambda p, c: reference_decode(ckpt, p, c))


def _tensors(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "model_weights.json").read_text())["tensors"]


def test_cases_hold_what_they_claim(converted: Callable[..., tuple[Path, Path]]) -> None:
    """The base model has full-width q/k norms, a quantized router and an f32
    correction bias under block_sparse_moe, its own lm_head and no expert in the
    manifest; the second case has neither norms nor lm_head; gs 128 leaves the
    experts' down_proj float (layout version 2)."""
    _, model_dir = converted(ARCH)
    t = _tensors(model_dir)
    assert t["model.layers.0.self_attn.q_norm.weight"]["shape"] == [4 * 64]
    assert t["model.layers.0.self_attn.k_norm.weight"]["shape"] == [2 * 64]
    assert t["model.layers.2.block_sparse_moe.gate.weight"]["dtype"] == "U32"
    assert t["model.layers.2.block_sparse_moe.e_score_correction_bias"]["dtype"] == "F32"
    assert "lm_head.weight" in t
    assert not any(".switch_mlp." in n for n in t)
    lay = json.loads((model_dir / "packed_experts" / "layout.json").read_text())
    assert lay["moe_layers"] == [0, 1, 2] and lay["num_experts"] == 8
    _, model_dir = converted(ARCH, **CASES[1][1])
    t = _tensors(model_dir)
    assert "model.layers.0.self_attn.q_norm.weight" not in t and "lm_head.weight" not in t
    _, model_dir = converted(ARCH, **CASES[4][1])
    lay = json.loads((model_dir / "packed_experts" / "layout.json").read_text())
    comps = {c["name"]: c for c in lay["components"]}
    assert lay["version"] == 2 and comps["down_proj.weight"]["mode"] == "float"
    assert "down_proj.scales" not in comps and comps["gate_proj.weight"]["dtype"] == "U32"


@pytest.mark.parametrize("case", [CASES[0], CASES[4]], ids=[CASES[0][0], CASES[4][0]])
def test_verify_full_against_the_source(case: tuple[str, dict[str, Any]],
                                        converted: Callable[..., tuple[Path, Path]]
                                        ) -> None:
    """prep's verify passes every byte of the converted directory against the source
    (experts under block_sparse_moe, layout versions 1 and 2)."""
    from moeflux.prep.verify import verify

    ckpt, model_dir = converted(ARCH, **case[1])
    rep = verify(model_dir, ckpt, full=True)
    assert rep.ok, str(rep)


def test_verify_finds_a_changed_expert_byte(tmp_path: Path,
                                            converted: Callable[..., tuple[Path, Path]]
                                            ) -> None:
    from moeflux.prep.verify import verify

    ckpt, src = converted(ARCH)
    model_dir = tmp_path / "model"
    shutil.copytree(src, model_dir)
    victim = model_dir / "packed_experts" / "layer_01.bin"
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    victim.write_bytes(bytes(blob))
    rep = verify(model_dir, ckpt, full=True)
    assert not rep.ok and "layer_01" in str(rep), str(rep)


# ==== a checkpoint written by mlx-lm itself ====

# Standard deviations of the random weights, relative to 1/sqrt(fan_in) for matrices.
GAINS = {"embed_tokens": 4.0, "lm_head": 2.0, "block_sparse_moe.gate": 2.0,
         "o_proj": 0.5}


def _random_value(name: str, shape: tuple[int, ...], rng: np.random.Generator
                  ) -> np.ndarray:
    """The random initial value of parameter ``name`` (norm gains near 1, correction
    biases of the routers' scale, matrices at unit-scale outputs)."""
    if "norm" in name:
        return 1.0 + rng.normal(0.0, 0.1, shape)
    if name.endswith("e_score_correction_bias"):
        return rng.normal(0.0, 0.05, shape)
    gain = next((g for k, g in GAINS.items() if k in name), 1.0)
    fan_in = shape[-1] if "embed_tokens" not in name else 1
    return rng.normal(0.0, gain / np.sqrt(fan_in), shape)


def write_mlx_lm_checkpoint(out: Path, cfg: dict[str, Any], seed: int) -> Path:
    """mlx-lm's minimax.Model for ``cfg`` (a config without quantization block) with
    seeded random weights, cast to bf16 as mlx_lm.convert does (the correction bias
    kept f32 by the model's cast_predicate), quantized 4-bit gs 64 by quantize_model
    with the model's own quant_predicate (8-bit router) and saved by save_model /
    save_config."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import minimax
    from mlx_lm.utils import quantize_model, save_config, save_model

    model = minimax.Model(minimax.ModelArgs.from_dict(cfg))
    rng = np.random.default_rng(seed)
    keep = model.cast_predicate
    params = []
    for name, value in sorted(tree_flatten(model.parameters())):
        v = mx.array(_random_value(name, tuple(value.shape), rng).astype(np.float32))
        params.append((name, v.astype(mx.bfloat16) if keep(name) else v))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    model, qcfg = quantize_model(model, copy.deepcopy(cfg), 64, 4)
    save_model(out, model)
    save_config(qcfg, out / "config.json")
    return out


def test_checkpoint_written_by_mlx_lm(tmp_path: Path) -> None:
    """mlx-lm's own minimax.Model, quantized and saved by mlx-lm, converted: prompt and
    32 decode steps agree with mlx-lm at every position."""
    from moeflux.prep.convert import convert
    from moeflux.prep.synth import tiny_config

    cfg = tiny_config(ARCH, num_local_experts=12, num_experts_per_tok=3,
                      rotary_dim=48, rope_theta=10000.0)
    cfg.pop("quantization")
    cfg.pop("quantization_config")
    ckpt = write_mlx_lm_checkpoint(tmp_path / "ckpt", cfg, seed=3)
    qblock = json.loads((ckpt / "config.json").read_text())["quantization"]
    assert qblock["model.layers.0.block_sparse_moe.gate"] == {"group_size": 64, "bits": 8}
    model_dir = convert(ckpt, tmp_path / "model", progress=False)
    check_prefill_and_decode(model_dir, ARCH, lambda t: reference_logits(ckpt, t),
                             lambda p, c: reference_decode(ckpt, p, c))


def test_hugging_face_model_type_minimax_m2(tmp_path: Path,
                                            converted: Callable[..., tuple[Path, Path]]
                                            ) -> None:
    """MiniMax-M2's own configs say model_type minimax_m2 (mlx-lm remaps it to
    minimax): prep converts and verifies such a checkpoint as minimax and the engine
    runs it."""
    from moeflux.prep.convert import convert
    from moeflux.prep.verify import verify
    from test_prep import clone_checkpoint

    def retype(cfg: dict[str, Any]) -> None:
        cfg["model_type"] = "minimax_m2"

    src = clone_checkpoint(converted(ARCH)[0], tmp_path / "src", edit_config=retype)
    dst = convert(src, tmp_path / "model", progress=False)
    assert json.loads((dst / "moeflux.json").read_text())["architecture"] == ARCH
    assert verify(dst, src, full=True).ok
    with moeflux.Model(dst, threads=2) as m:
        ours = m.eval(FWD_PROMPT, all_logits=True)
    assert_close(ours, reference_logits(src, FWD_PROMPT), "model_type minimax_m2")


def test_cli_info_names_the_experts(converted: Callable[..., tuple[Path, Path]]) -> None:
    """`moeflux info` reads the expert count under minimax's key (num_local_experts)."""
    from test_cli import run

    ckpt, model_dir = converted(ARCH)
    r = run("info", str(model_dir), "--json")
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert facts["architecture"] == ARCH and facts["num_experts"] == 8
    assert facts["num_experts_per_tok"] == 2 and facts["layout_ok"] is True


# ==== the sequence: pieces, long prompts, cache size, truncate, snapshots ====

@pytest.mark.parametrize("cuts", [[1], [4, 9]], ids=str)
def test_prompt_in_pieces_equals_one_shot(cuts: list[int],
                                          converted: Callable[..., tuple[Path, Path]]
                                          ) -> None:
    """The prompt fed in pieces (chunked) gives every position's one-shot logits."""
    check_prompt_in_pieces(*converted(ARCH), cuts)


def test_long_prompt_crosses_internal_chunks(converted: Callable[..., tuple[Path, Path]]
                                             ) -> None:
    """A prompt longer than the forward's 64-token scratch runs in internal chunks."""
    check_long_prompt(*converted(ARCH))


def test_kv_cache_bytes_per_token(converted: Callable[..., tuple[Path, Path]]) -> None:
    """K and V of num_key_value_heads * head_dim f32 per layer per token."""
    ckpt, model_dir = converted(ARCH)
    cfg = json.loads((ckpt / "config.json").read_text())
    per_tok = (cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] *
               cfg["head_dim"] * 4)
    assert state_growth_of_7_tokens(model_dir) == 7 * per_tok


def test_truncate_and_snapshot_are_exact(converted: Callable[..., tuple[Path, Path]]
                                         ) -> None:
    """Truncating to n and continuing equals a sequence that only ever had n tokens;
    a snapshot restores bit for bit."""
    check_truncate_and_snapshot(*converted(ARCH))


def test_snapshot_into_a_fresh_context(converted: Callable[..., tuple[Path, Path]]
                                       ) -> None:
    """A snapshot taken after 70 tokens (two internal chunks) restores bit for bit in
    the same context and in a fresh one with another n_ctx, and the decode after it
    agrees with mlx-lm."""
    ckpt, model_dir = converted(ARCH)
    prompt, cont = continuation(512, 70, seed=21), continuation(512, 5, seed=22)
    with moeflux.Model(model_dir, threads=2) as m:
        m.eval(prompt)
        snap = m.save_state()
        first = np.stack([m.eval([t]) for t in cont])
        m.load_state(snap)
        again = np.stack([m.eval([t]) for t in cont])
    np.testing.assert_array_equal(again, first)
    with moeflux.Model(model_dir, threads=2, n_ctx=128) as m:
        m.load_state(snap)
        assert m.n_past == len(prompt)
        fresh = np.stack([m.eval([t]) for t in cont])
    np.testing.assert_array_equal(fresh, first)
    assert_close(first, reference_decode(ckpt, prompt, cont)[1:], "decode after restore")


IO_SETTINGS: dict[str, dict[str, Any]] = {
    "pread": {"io_mode": "pread"},
    "mmap": {"io_mode": "mmap"},
    "direct": {"io_mode": "direct"},
    "one_io_thread": {"io_mode": "pread", "io_threads": 1},
    "cache": {"io_mode": "pread", "expert_cache_bytes": 64 << 20},
    "prefetch": {"io_mode": "pread", "prefetch": True},
}


def test_every_io_mode_bitwise_equal(converted: Callable[..., tuple[Path, Path]]) -> None:
    """Prefill (past one internal chunk) and decode give the same bits whichever way
    the experts are read."""
    _, model_dir = converted(ARCH)
    prompt, cont = continuation(512, 70, seed=13), continuation(512, 6, seed=14)

    def run(**kw: Any) -> np.ndarray:
        with moeflux.Model(model_dir, threads=2, **kw) as m:
            rows = [m.eval(prompt, all_logits=True)]
            rows += [m.eval([t])[None] for t in cont]
            return np.concatenate(rows)

    base = run()
    for name, kw in IO_SETTINGS.items():
        assert np.array_equal(run(**kw), base), f"{name}: logits differ from default"


def test_failed_eval_leaves_state_unchanged(tmp_path: Path,
                                            converted: Callable[..., tuple[Path, Path]]
                                            ) -> None:
    """An expert read failing in the last layer leaves the position unchanged, and
    decoding continues exactly once the file is whole again."""
    check_failed_eval_recovers(*converted(ARCH), tmp_path)


# ==== what open and prep refuse ====

def _with_config(src: Path, dst: Path, **changes: Any) -> Path:
    """A copy of model dir ``src`` whose config.json has ``changes`` (None: removed)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_top1_routing_is_refused(tmp_path: Path,
                                 converted: Callable[..., tuple[Path, Path]]) -> None:
    """mlx-lm renormalises a lone routed expert to weight 1, the shared noaux_tc router
    keeps its sigmoid score: open refuses num_experts_per_tok 1, naming it."""
    _, model_dir = converted(ARCH)
    bad = _with_config(model_dir, tmp_path / "m", num_experts_per_tok=1)
    with pytest.raises(moeflux.UnsupportedError, match="num_experts_per_tok 1"):
        moeflux.Model(bad)


@pytest.mark.parametrize("value,match", [(None, r'"rotary_dim" is missing'),
                                         (66, "rotary_dim must be even"),
                                         (7, "rotary_dim must be even")])
def test_bad_rotary_dim_is_refused(value: Any, match: str, tmp_path: Path,
                                   converted: Callable[..., tuple[Path, Path]]) -> None:
    _, model_dir = converted(ARCH)
    bad = _with_config(model_dir, tmp_path / "m", rotary_dim=value)
    with pytest.raises(moeflux.FormatError, match=match):
        moeflux.Model(bad)


def test_prep_refuses_raw_hf_experts(converted: Callable[..., tuple[Path, Path]],
                                     tmp_path: Path) -> None:
    """Hugging Face's per-expert w1/w2/w3 (mlx-lm's sanitize stacks them) are refused,
    naming the tensor."""
    from moeflux.errors import FormatError
    from moeflux.prep.convert import convert
    from test_prep import clone_checkpoint

    def rename(t: dict[str, Any]) -> None:
        t["model.layers.0.block_sparse_moe.experts.0.w1.weight"] = t.pop(
            "model.layers.0.block_sparse_moe.switch_mlp.gate_proj.weight")

    src = clone_checkpoint(converted(ARCH)[0], tmp_path / "src", edit_tensors=rename)
    with pytest.raises(FormatError, match=r"experts\.0\.w1\.weight: raw Hugging Face"):
        convert(src, tmp_path / "out", progress=False)
