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
from pathlib import Path
from typing import Any, Callable

import pytest

from _helpers import (check_failed_eval_recovers, check_long_prompt,
                      check_prefill_and_decode, check_prompt_in_pieces,
                      check_truncate_and_snapshot, converted, state_growth_of_7_tokens)
from reference import reference_decode, reference_logits

__all__ = ["converted"]  # the fixture is used by name

ARCH = "qwen3_moe"

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


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_prefill_and_decode(case: tuple[str, dict[str, Any]],
                            converted: Callable[..., tuple[Path, Path]]) -> None:
    """All-position prefill logits, then 32 single-token decode steps."""
    _, overrides = case
    ckpt, model_dir = converted(ARCH, **overrides)
    check_prefill_and_decode(model_dir, ARCH, lambda t: reference_logits(ckpt, t),
                             lambda p, c: reference_decode(ckpt, p, c))


def test_router_bits_follow_the_file(converted: Callable[..., tuple[Path, Path]]) -> None:
    """The two router cases really hold 8-bit and 4-bit routers (so the cases above
    cover both), and mlx-lm's config block says the same."""
    for overrides, bits in (({}, 8), ({"gate_bits": None, "group_size": 32}, 4)):
        ckpt, model_dir = converted(ARCH, **overrides)
        man = json.loads((model_dir / "model_weights.json").read_text())
        t = man["tensors"]["model.layers.0.mlp.gate.weight"]
        assert t["shape"][-1] * 32 // 256 == bits


@pytest.mark.parametrize("cuts", [[1], [4, 9]], ids=str)
def test_prompt_in_pieces_equals_one_shot(cuts: list[int],
                                          converted: Callable[..., tuple[Path, Path]]
                                          ) -> None:
    """The prompt fed in pieces gives every position's logits (a piece attends to K/V
    rows written by earlier calls)."""
    check_prompt_in_pieces(*converted(ARCH), cuts)


def test_long_prompt_crosses_internal_chunks(converted: Callable[..., tuple[Path, Path]]
                                             ) -> None:
    """A prompt longer than the forward's 64-token scratch runs in internal chunks;
    every position must still match, and so must decoding after it."""
    check_long_prompt(*converted(ARCH))


def test_kv_cache_bytes_per_token(converted: Callable[..., tuple[Path, Path]]) -> None:
    """The state grows by K and V of num_key_value_heads * head_dim f32 per layer per
    token."""
    ckpt, model_dir = converted(ARCH)
    cfg = json.loads((ckpt / "config.json").read_text())
    per_tok = (cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] *
               cfg["head_dim"] * 4)
    assert state_growth_of_7_tokens(model_dir) == 7 * per_tok


def test_truncate_and_snapshot_are_exact(converted: Callable[..., tuple[Path, Path]]
                                         ) -> None:
    """Attention-only state: truncating to n and continuing equals a sequence that
    only ever had n tokens; a snapshot restores bit for bit."""
    check_truncate_and_snapshot(*converted(ARCH))


def test_failed_eval_leaves_state_unchanged(tmp_path: Path,
                                            converted: Callable[..., tuple[Path, Path]]
                                            ) -> None:
    """An expert read failing in the last layer (file truncated after open) raises
    after the first layer wrote its K/V rows; the position stays, and decoding
    continues exactly once the file is whole again."""
    check_failed_eval_recovers(*converted(ARCH), tmp_path)
