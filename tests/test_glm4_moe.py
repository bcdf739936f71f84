"""The glm4_moe forward pass (csrc/models/glm4_moe.c) against mlx-lm in float32.

Each case is a synthetic mlx-community checkpoint (conftest ``synth_checkpoint``,
mlx-lm's glm4_moe layout: q/k/v biases, optional q/k norms, float router with its
e_score_correction_bias, shared experts, dense first layers) converted by
``moeflux.prep.convert`` and opened with ``moeflux.Model``. The oracle is
``tests/reference.py`` (mlx-lm's own forward). Every comparison holds the CPU
regression tier, which implies the 1e-3 acceptance bar, and equal argmax: a full
prompt (every position) and a prefill followed by 32 single-token decode steps.

The cases cover what changes the code path: attention_bias on and off, use_qk_norm
on and off, partial rotary 0.5 / 0.25 / full, noaux_tc group selection (n_group > 1
keeping topk_group groups), norm_topk_prob off, top-1 routing (no renormalisation),
no shared experts, several dense layers first, GQA 1 / 2 / 4, 3/4/8-bit weights and
group sizes 32/64/128.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

from _helpers import (assert_close, check_failed_eval_recovers, check_long_prompt,
                      check_prefill_and_decode, check_prompt_in_pieces,
                      check_truncate_and_snapshot, converted, state_growth_of_7_tokens)
from reference import reference_decode, reference_logits

__all__ = ["converted"]  # the fixture is used by name

ARCH = "glm4_moe"

# (id, tiny_config overrides). The synth default (GLM-4.5's choices at tiny size):
# hidden 256, 3 layers (layer 0 dense), 4 heads over 2 kv heads of 64, half of each
# head rotated, q/k/v biases, no q/k norm, 8 experts in 1 group, k 2 renormalised,
# x2.5, one shared expert, 4-bit gs 64.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("base", {}),
    ("qknorm-nobias-groups", {"use_qk_norm": True, "attention_bias": False,
                              "n_routed_experts": 16, "n_group": 4, "topk_group": 2,
                              "num_experts_per_tok": 3, "norm_topk_prob": False}),
    ("qknorm-bias-rot025-gqa4", {"use_qk_norm": True, "partial_rotary_factor": 0.25,
                                 "num_key_value_heads": 1, "group_size": 32}),
    ("full-rotary-noshared-first2", {"partial_rotary_factor": 1.0,
                                     "n_shared_experts": None, "num_hidden_layers": 4,
                                     "first_k_dense_replace": 2, "bits": 8,
                                     "group_size": 128, "moe_intermediate_size": 128}),
    ("top1-mha-3bit", {"num_experts_per_tok": 1, "num_key_value_heads": 4, "bits": 3,
                       "n_shared_experts": 2, "routed_scaling_factor": 1.0}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_prefill_and_decode(case: tuple[str, dict[str, Any]],
                            converted: Callable[..., tuple[Path, Path]]) -> None:
    """All-position prefill logits, then 32 single-token decode steps."""
    _, overrides = case
    ckpt, model_dir = converted(ARCH, **overrides)
    check_prefill_and_decode(model_dir, ARCH, lambda t: reference_logits(ckpt, t),
                             lambda p, c: reference_decode(ckpt, p, c))


def test_cases_hold_what_they_claim(converted: Callable[..., tuple[Path, Path]]) -> None:
    """The base checkpoint has q/k/v biases and no q/k norms, its layer 0 is dense and
    the router is float with an f32 correction bias (mlx-lm's glm4_moe layout)."""
    _, model_dir = converted(ARCH)
    t = json.loads((model_dir / "model_weights.json").read_text())["tensors"]
    assert "model.layers.1.self_attn.q_proj.bias" in t
    assert "model.layers.1.self_attn.q_norm.weight" not in t
    assert "model.layers.0.mlp.gate_proj.weight" in t
    assert t["model.layers.1.mlp.gate.weight"]["dtype"] in ("BF16", "F32")
    assert t["model.layers.1.mlp.gate.e_score_correction_bias"]["dtype"] == "F32"
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in t
    _, model_dir = converted(ARCH, **CASES[1][1])
    t = json.loads((model_dir / "model_weights.json").read_text())["tensors"]
    assert "model.layers.1.self_attn.q_norm.weight" in t
    assert "model.layers.1.self_attn.q_proj.bias" not in t


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


def test_failed_eval_leaves_state_unchanged(tmp_path: Path,
                                            converted: Callable[..., tuple[Path, Path]]
                                            ) -> None:
    """An expert read failing in the last layer leaves the position unchanged, and
    decoding continues exactly once the file is whole again."""
    check_failed_eval_recovers(*converted(ARCH), tmp_path)


def test_mtp_layer_dropped(tmp_path: Path, synth_checkpoint: Callable[..., Path]) -> None:
    """GLM checkpoints carry a multi-token-prediction layer numbered
    num_hidden_layers; mlx-lm's sanitize drops it and so does prep (prep/archs/
    glm4_moe.py), and the model still matches mlx-lm."""
    import mlx.core as mx

    import moeflux
    from moeflux.prep.convert import convert

    ckpt = tmp_path / "ckpt"
    shutil.copytree(synth_checkpoint(ARCH), ckpt)
    n = json.loads((ckpt / "config.json").read_text())["num_hidden_layers"]
    extra = {f"model.layers.{n}.eh_proj.weight": mx.zeros((4, 8), dtype=mx.bfloat16),
             f"model.layers.{n}.enorm.weight": mx.ones((8,), dtype=mx.bfloat16)}
    mx.save_safetensors(str(ckpt / "model-mtp.safetensors"), extra,
                        metadata={"format": "mlx"})
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "model-mtp.safetensors" for k in extra})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    dst = convert(ckpt, tmp_path / "model", progress=False)
    names = json.loads((dst / "model_weights.json").read_text())["tensors"]
    assert not [k for k in names if k.startswith(f"model.layers.{n}.")]
    with moeflux.Model(dst, threads=2) as m:
        ours = m.eval([1, 5, 77, 300], all_logits=True)
    assert_close(ours, reference_logits(ckpt, [1, 5, 77, 300]), "with an MTP layer")
