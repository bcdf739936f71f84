"""Fixtures that can see plumbing bugs: every key the math reads is non-default.

The other forward tests vary one thing at a time around synth's defaults. Here each
family gets one checkpoint in which every config key the engine reads
(csrc/core/config.c) takes a value that is neither mlx-lm's default nor synth's:
RMSNorm eps, rope base, partial rotary, YaRN with mscale != mscale_all_dim, head_dim
!= hidden / heads, group sizes 32/64/128 and 2/3/5/6/8-bit modules through
per-module quantization entries (mlx-lm honours them on load as it does its own
predicates), tied and untied heads, dense layers from each family's rule, router
options, GatedDeltaNet head counts and conv width, GLM's q/k norm and bias options,
MiniMax's rotary_dim and q/k norm option.

The prompt's activations are not unit-scale: the embedding rows of some prompt tokens
are scaled by 0.05 / 0.02 (RMSNorm eps then matters: a norm's input mean square is
~1e-4 instead of ~0.06) and one by 20 (3 in tied models, whose head would otherwise
put one logit far above the rest and loosen the relative bound). The scaled tokens
also come back during decode.

The oracle is mlx-lm float32 (tests/reference.py); every comparison is held to the CPU
regression tier (which implies the acceptance bar). Used by tools/mutation_check.py:
wrong eps, rope base, scales... must fail here through the tolerance check.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import moeflux
from _helpers import assert_close, converted  # noqa: F401 (fixture)
from reference import reference_decode, reference_logits

# Prompt with scaled-row tokens at the start, in the middle and at the end; the
# decode continuation revisits them.
SCALED_TIED = {77: 0.05, 250: 0.02, 300: 3.0}
SCALED_UNTIED = {77: 0.05, 250: 0.02, 300: 20.0}
PROMPT = [77, 5, 300, 12, 9, 411, 250, 42, 8, 100, 77, 3, 300]
DECODE = [250, 17, 300, 64, 77, 9, 140, 250, 3, 411, 300, 88, 77, 5, 199, 12]


def _q(bits: int, gs: int) -> dict[str, int]:
    return {"group_size": gs, "bits": bits}


# (arch, tiny_config overrides, per-module quantization entries by path: a dict of
# bits / group size, or false = left in float). Layer plans are in the comments; each
# n_in of a quantized module divides its group size.
FIXTURES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # 4 layers, layer 2 dense (mlp_only_layers); 12 experts k 3 unnormalised;
    # head_dim 48 over hidden 256 / 4 heads, GQA 2; tied head; 3-bit gs 32 default.
    # partial_rotary_factor is read by config.c but ignored by qwen3_moe (as mlx-lm).
    "qwen3_moe": ({
        "num_hidden_layers": 4, "head_dim": 48, "num_key_value_heads": 2,
        "rms_norm_eps": 3e-5, "rope_theta": 54321.0, "partial_rotary_factor": 0.5,
        "mlp_only_layers": [2], "intermediate_size": 320, "num_experts": 12,
        "num_experts_per_tok": 3, "moe_intermediate_size": 96, "norm_topk_prob": False,
        "tie_word_embeddings": True, "bits": 3, "group_size": 32, "gate_bits": 6,
        "gate_group_size": 128,
    }, {
        "model.embed_tokens": _q(6, 64),
        "model.layers.0.self_attn.q_proj": _q(8, 128),
        "model.layers.0.self_attn.k_proj": _q(2, 64),
        "model.layers.1.self_attn.v_proj": _q(5, 32),
        "model.layers.1.self_attn.o_proj": _q(6, 64),
        "model.layers.2.mlp.down_proj": _q(8, 64),
        "model.layers.3.self_attn.k_proj": False,
    }),
    # 6 layers, attention at 2 and 5 (interval 3); MoE at 1 and 5 (sparse step 2,
    # layer 3 in mlp_only_layers), dense elsewhere; GQA 4, head_dim 48, rotary 24;
    # GDN 2 key / 6 value heads of 32 / 48, conv width 3; 5-bit gs 32 default.
    "qwen3_next": ({
        "num_hidden_layers": 6, "full_attention_interval": 3, "head_dim": 48,
        "num_key_value_heads": 1, "rms_norm_eps": 2e-5, "rope_theta": 7777.0,
        "partial_rotary_factor": 0.5, "linear_num_key_heads": 2,
        "linear_num_value_heads": 6, "linear_key_head_dim": 32,
        "linear_value_head_dim": 48, "linear_conv_kernel_dim": 3,
        "decoder_sparse_step": 2, "mlp_only_layers": [3], "intermediate_size": 192,
        "num_experts": 12, "num_experts_per_tok": 3, "moe_intermediate_size": 96,
        "shared_expert_intermediate_size": 160, "norm_topk_prob": True,
        "tie_word_embeddings": False, "bits": 5, "group_size": 32, "gate_bits": 8,
        "gate_group_size": 32,
    }, {
        "model.embed_tokens": _q(3, 128),
        "lm_head": _q(8, 128),
        "model.layers.0.linear_attn.in_proj_qkvz": _q(6, 128),
        "model.layers.0.linear_attn.out_proj": _q(8, 32),
        "model.layers.0.mlp.down_proj": _q(3, 64),
        "model.layers.2.self_attn.q_proj": _q(2, 64),
        "model.layers.5.mlp.shared_expert.up_proj": _q(6, 64),
        "model.layers.4.linear_attn.in_proj_qkvz": False,
    }),
    # 4 layers, attention at 1 and 3 (interval 2); 16 experts k 4 unnormalised;
    # head_dim 80, rotary 40; GDN 2 / 4 heads of 48 / 32, conv width 5; tied head;
    # 6-bit gs 128 default, so o_proj (320 inputs) stays float.
    "qwen3_5_moe": ({
        "num_hidden_layers": 4, "full_attention_interval": 2, "head_dim": 80,
        "rms_norm_eps": 4e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 31415.0,
                            "partial_rotary_factor": 0.5, "mrope_section": [7, 7, 6],
                            "mrope_interleaved": True},
        "linear_num_key_heads": 2, "linear_num_value_heads": 4,
        "linear_key_head_dim": 48, "linear_value_head_dim": 32,
        "linear_conv_kernel_dim": 5, "num_experts": 16, "num_experts_per_tok": 4,
        "moe_intermediate_size": 128, "shared_expert_intermediate_size": 256,
        "norm_topk_prob": False, "tie_word_embeddings": True, "bits": 6,
        "group_size": 128, "gate_bits": 5, "gate_group_size": 128,
    }, {
        "language_model.model.embed_tokens": _q(5, 32),
        "language_model.model.layers.0.linear_attn.in_proj_qkv": _q(3, 64),
        "language_model.model.layers.2.linear_attn.in_proj_z": _q(2, 32),
        "language_model.model.layers.1.self_attn.q_proj": _q(2, 32),
        "language_model.model.layers.3.self_attn.k_proj": _q(8, 64),
        "language_model.model.layers.0.mlp.shared_expert.down_proj": _q(8, 64),
        "language_model.model.layers.2.linear_attn.out_proj": False,
    }),
    # 5 layers, MoE at 2 and 4 (first_k_dense_replace 2, moe_layer_freq 2); 16
    # experts in 8 groups keeping 3, k 3 unnormalised, scaled 1.7, 2 shared; 6 heads,
    # q/kv ranks 192/128, nope 48, rope 16, v 32; YaRN factor 8 over 256 positions,
    # beta 16/2, mscale 0.8 vs mscale_all_dim 0.6 (both the rotated dims and the
    # softmax scale carry a factor); 2-bit gs 64 default (embed_q, 48 inputs, float).
    "deepseek_v3": ({
        "num_hidden_layers": 5, "num_attention_heads": 6, "num_key_value_heads": 6,
        "q_lora_rank": 192, "kv_lora_rank": 128, "qk_nope_head_dim": 48,
        "qk_rope_head_dim": 16, "v_head_dim": 32, "rms_norm_eps": 2.5e-5,
        "rope_theta": 20000.0, "max_position_embeddings": 2048,
        "rope_scaling": {"type": "yarn", "factor": 8.0,
                         "original_max_position_embeddings": 256, "beta_fast": 16,
                         "beta_slow": 2, "mscale": 0.8, "mscale_all_dim": 0.6},
        "n_routed_experts": 16, "n_group": 8, "topk_group": 3, "num_experts_per_tok": 3,
        "routed_scaling_factor": 1.7, "norm_topk_prob": False, "n_shared_experts": 2,
        "first_k_dense_replace": 2, "moe_layer_freq": 2, "intermediate_size": 384,
        "moe_intermediate_size": 128, "bits": 2, "group_size": 64,
    }, {
        "model.embed_tokens": _q(8, 64),
        "lm_head": _q(6, 128),
        "model.layers.0.self_attn.q_a_proj": _q(8, 32),
        "model.layers.0.self_attn.kv_a_proj_with_mqa": _q(5, 128),
        "model.layers.1.self_attn.o_proj": _q(3, 32),
        "model.layers.0.mlp.down_proj": _q(3, 128),
        "model.layers.2.mlp.shared_experts.gate_proj": _q(5, 32),
        "model.layers.3.self_attn.q_b_proj": False,
    }),
    # 5 layers, MoE from layer 2 (first_k_dense_replace 2); 16 experts in 4 groups
    # keeping 2, k 3 unnormalised, scaled 1.7, 2 shared; head_dim 48 over 4 heads,
    # GQA 4, 36 of 48 dims rotated; q/k norms on, projection biases off (GLM-4.5 has
    # them the other way round: test_glm4_moe's base); tie_word_embeddings true, which
    # mlx-lm's glm4_moe does not consult (its own lm_head); 3-bit gs 32 default.
    "glm4_moe": ({
        "num_hidden_layers": 5, "head_dim": 48, "num_key_value_heads": 1,
        "rms_norm_eps": 3.5e-5, "rope_theta": 23456.0, "partial_rotary_factor": 0.75,
        "max_position_embeddings": 2048, "use_qk_norm": True, "attention_bias": False,
        "n_routed_experts": 16, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3,
        "routed_scaling_factor": 1.7, "norm_topk_prob": False, "n_shared_experts": 2,
        "first_k_dense_replace": 2, "intermediate_size": 320,
        "moe_intermediate_size": 96, "tie_word_embeddings": True, "bits": 3,
        "group_size": 32,
    }, {
        "model.embed_tokens": _q(6, 64),
        "lm_head": _q(8, 128),
        "model.layers.0.self_attn.q_proj": _q(5, 128),
        "model.layers.1.mlp.down_proj": _q(2, 64),
        "model.layers.2.self_attn.o_proj": _q(8, 32),
        "model.layers.3.mlp.shared_experts.up_proj": _q(6, 64),
        "model.layers.4.self_attn.k_proj": False,
    }),
    # 4 layers, all MoE; 12 experts k 3 (renormalised although norm_topk_prob is
    # false: mlx-lm's minimax does not read it); head_dim 48 over 4 heads, GQA 4, 24
    # of 48 dims rotated; no q/k norms (minimax's default has them: test_minimax's
    # base); tied head; 5-bit gs 32 default, router 6-bit gs 128, and layer 2's
    # experts' down_proj 2-bit (a mixed expert recipe).
    "minimax": ({
        "num_hidden_layers": 4, "head_dim": 48, "num_key_value_heads": 1,
        "rms_norm_eps": 4.5e-5, "rope_theta": 34567.0, "rotary_dim": 24,
        "max_position_embeddings": 2048, "use_qk_norm": False, "num_local_experts": 12,
        "num_experts_per_tok": 3, "intermediate_size": 96, "norm_topk_prob": False,
        "tie_word_embeddings": True, "bits": 5, "group_size": 32, "gate_bits": 6,
        "gate_group_size": 128,
    }, {
        "model.embed_tokens": _q(3, 64),
        "model.layers.0.self_attn.q_proj": _q(8, 128),
        "model.layers.1.self_attn.o_proj": _q(6, 64),
        "model.layers.2.block_sparse_moe.switch_mlp.down_proj": _q(2, 32),
        "model.layers.3.self_attn.k_proj": False,
    }),
}


def _embed_key(arch: str) -> str:
    prefix = "language_model." if arch == "qwen3_5_moe" else ""
    return f"{prefix}model.embed_tokens"


def _scale_rows(ckpt: Path, arch: str, rows: dict[int, float]) -> None:
    """Multiplies the dequantized embedding rows ``rows`` by their factors (scales and
    biases of a quantized table, the weight of a float one), in place."""
    import mlx.core as mx

    emb = _embed_key(arch)
    for f in sorted(ckpt.glob("model*.safetensors")):
        tensors = mx.load(str(f))
        parts = [p for p in ("scales", "biases", "weight")
                 if f"{emb}.{p}" in tensors and (p != "weight" or
                                                 f"{emb}.scales" not in tensors)]
        if not parts:
            continue
        for p in parts:
            t = tensors[f"{emb}.{p}"]
            col = np.ones((t.shape[0], 1), np.float32)
            for r, c in rows.items():
                col[r] = c
            tensors[f"{emb}.{p}"] = (t.astype(mx.float32) * mx.array(col)).astype(t.dtype)
        mx.save_safetensors(str(f), tensors, metadata={"format": "mlx"})


def _scale_conv_qk(ckpt: Path, arch: str, factor: float) -> None:
    """Multiplies layer 0's conv1d taps of the first q head and the first k head by
    ``factor``: that head's q and k then reach the GatedDeltaNet's q/k RMS norm with a
    mean square of ~1e-5, where its eps (1e-6 / head_dim, from mlx-lm's eps 1e-6 on
    the L2 sum) matters; at unit scale no eps is visible."""
    import mlx.core as mx

    cfg = json.loads((ckpt / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    dk, key_dim = text["linear_key_head_dim"], (text["linear_key_head_dim"] *
                                                text["linear_num_key_heads"])
    name = f"{_embed_key(arch).rsplit('.', 1)[0]}.layers.0.linear_attn.conv1d.weight"
    col = np.ones((2 * key_dim + text["linear_num_value_heads"] *
                   text["linear_value_head_dim"], 1, 1), np.float32)
    col[:dk] = col[key_dim:key_dim + dk] = factor
    for f in sorted(ckpt.glob("model*.safetensors")):
        tensors = mx.load(str(f))
        if name in tensors:
            t = tensors[name]
            tensors[name] = (t.astype(mx.float32) * mx.array(col)).astype(t.dtype)
            mx.save_safetensors(str(f), tensors, metadata={"format": "mlx"})


def build_fixture(arch: str, root: Path) -> tuple[Path, Path]:
    """(checkpoint, converted model dir) of FIXTURES[arch] under ``root``."""
    from moeflux.prep.convert import convert
    from moeflux.prep.synth import tiny_config, write_checkpoint

    overrides, per_module = FIXTURES[arch]
    cfg = tiny_config(arch, **copy.deepcopy(overrides))
    for key in ("quantization", "quantization_config"):
        cfg[key].update(copy.deepcopy(per_module))
    ckpt = write_checkpoint(root / "ckpt", cfg, seed=5)
    tied = json.loads((ckpt / "config.json").read_text()).get("tie_word_embeddings")
    _scale_rows(ckpt, arch, SCALED_TIED if tied else SCALED_UNTIED)
    if arch in ("qwen3_next", "qwen3_5_moe"):
        _scale_conv_qk(ckpt, arch, 0.01)
    return ckpt, convert(ckpt, root / "model", progress=False)


@pytest.fixture(scope="session")
def nondefault(tmp_path_factory: pytest.TempPathFactory
               ) -> Callable[[str], tuple[Path, Path]]:
    """Factory: arch -> (checkpoint, model dir) of its non-default fixture, once."""
    done: dict[str, tuple[Path, Path]] = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in done:
            done[arch] = build_fixture(arch, tmp_path_factory.mktemp(f"nd-{arch}"))
        return done[arch]

    return get


ARCHS = list(FIXTURES)

# gpt_oss comes from tests/gptoss_synth.py (conftest's synth_checkpoint dispatches to
# it; overrides are config keys): a 4-layer plan that is not mlx-lm's alternation,
# window 5, 12 experts k 3, GQA 4:1 with head_dim 32 over hidden 64, YaRN with every
# field off its default (mscale != mscale_all_dim), eps and base off their defaults.
GPTOSS: dict[str, Any] = {
    "layer_types": ["full_attention", "sliding_attention", "sliding_attention",
                    "full_attention"],
    "sliding_window": 5, "num_local_experts": 12, "num_experts_per_tok": 3,
    "experts_per_token": 3, "head_dim": 32, "num_key_value_heads": 1,
    "intermediate_size": 192, "rms_norm_eps": 3e-5, "rope_theta": 54321,
    "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "beta_fast": 16.0,
                     "beta_slow": 2.0, "mscale": 1.5, "mscale_all_dim": 0.5,
                     "original_max_position_embeddings": 2048},
}
# mlx-lm's default layer plan of gpt_oss: sliding, full, sliding, full.
GPTOSS_ALTERNATING = ["sliding_attention", "full_attention"] * 2


def test_gpt_oss_prefill_and_decode(converted: Callable[..., tuple[Path, Path]]) -> None:
    """The gpt_oss fixture with every key off its default: every prompt position, in
    one call and in three pieces, then single-token decode steps, within the CPU tier
    (the prompt and decode run past its window of 5)."""
    ckpt, model_dir = converted("gpt_oss", **GPTOSS)
    with moeflux.Model(model_dir, threads=2) as m:
        ours = m.eval(PROMPT, all_logits=True)
        rows = [m.eval([t]) for t in DECODE]
    with moeflux.Model(model_dir, threads=2) as m:
        pieces = np.concatenate([m.eval(PROMPT[a:b], all_logits=True)
                                 for a, b in ((0, 4), (4, 5), (5, len(PROMPT)))])
    ref_prompt = reference_logits(ckpt, PROMPT)
    assert_close(ours, ref_prompt, "gpt_oss prefill")
    assert_close(pieces, ref_prompt, "gpt_oss chunked prefill")
    ref = reference_decode(ckpt, PROMPT, DECODE)
    assert_close(np.stack(rows), ref[1:], "gpt_oss decode")


def test_fixtures_are_what_they_claim(nondefault) -> None:
    """The written files carry the non-default values (mlx-lm reads them, and the
    module overrides really produced other widths), and the scaled rows are scaled."""
    import mlx.core as mx

    for arch in ARCHS:
        ckpt, _ = nondefault(arch)
        cfg = json.loads((ckpt / "config.json").read_text())
        text = cfg.get("text_config", cfg)
        assert text["rms_norm_eps"] not in (1e-5, 1e-6)
        quant = cfg["quantization"]
        bits = {quant["bits"]} | {v["bits"] for v in quant.values() if isinstance(v, dict)}
        gss = {quant["group_size"]} | {v["group_size"] for v in quant.values()
                                       if isinstance(v, dict)}
        assert len(bits) >= 4 and len(gss) == 3, (arch, bits, gss)
        tensors: dict[str, Any] = {}
        for f in ckpt.glob("model*.safetensors"):
            tensors.update(mx.load(str(f)))
        for path, q in FIXTURES[arch][1].items():
            w = tensors[f"{path}.weight"]
            if q is False:   # left in float by a false entry
                assert f"{path}.scales" not in tensors and w.dtype == mx.bfloat16, path
                continue
            s = tensors[f"{path}.scales"]
            n_in = w.shape[-1] * 32 // q["bits"]
            assert n_in // s.shape[-1] == q["group_size"], path
        emb = _embed_key(arch)
        norm = np.abs(np.array(tensors[f"{emb}.scales"].astype(mx.float32))).mean(-1)
        assert norm[77] < 0.1 * np.median(norm) and norm[300] > 2.5 * np.median(norm)


# Keys config.c reads that the coverage check below does not ask to be non-default:
# sizes (varied by the other forward tests), token ids, and the structure around
# values (checked by name or by test_fixtures_are_what_they_claim).
NOT_MATH = {"hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
            "bos_token_id", "eos_token_id", "model_type", "text_config", "quantization",
            "quantization_config", "rope_parameters", "rope_scaling", "type", "rope_type",
            "bits", "group_size", "mode"}
# Values that count as default: mlx-lm's default and synth's base value of each key.
DEFAULTS: dict[str, list[Any]] = {
    "rms_norm_eps": [1e-6, 1e-5], "rope_theta": [1e4, 1e5, 1e6, 1e7],
    "partial_rotary_factor": [1.0, 0.25], "max_position_embeddings": [4096, 163840],
    "intermediate_size": [128], "moe_intermediate_size": [64],
    "shared_expert_intermediate_size": [64], "num_experts": [8], "n_routed_experts": [8],
    "num_experts_per_tok": [2], "decoder_sparse_step": [1], "mlp_only_layers": [[]],
    "full_attention_interval": [4], "linear_conv_kernel_dim": [4],
    "linear_num_key_heads": [16], "linear_num_value_heads": [4, 64],
    "linear_key_head_dim": [64, 192], "linear_value_head_dim": [64, 128],
    "n_group": [1, 4], "topk_group": [1, 2], "routed_scaling_factor": [1.0, 2.5],
    "first_k_dense_replace": [0, 1], "moe_layer_freq": [1], "q_lora_rank": [1536, 64],
    "kv_lora_rank": [512, 64], "qk_nope_head_dim": [128, 64], "qk_rope_head_dim": [64, 32],
    "v_head_dim": [128, 64], "n_shared_experts": [None, 1], "factor": [40.0],
    "beta_fast": [32], "beta_slow": [1], "mscale": [1.0], "mscale_all_dim": [0.0, 1.0],
    "original_max_position_embeddings": [4096],
    "use_qk_norm": [False], "attention_bias": [True],
    "sliding_window": [128, 8], "num_local_experts": [128, 8], "rotary_dim": [32],
}
BOTH_WAYS = ("tie_word_embeddings", "norm_topk_prob")


def _values(key: str) -> list[Any]:
    """The value of ``key`` in each fixture's config (text_config, rope blocks)."""
    import gptoss_synth
    from moeflux.prep.synth import tiny_config

    out = []
    cfgs = [tiny_config(arch, **copy.deepcopy(overrides))
            for arch, (overrides, _) in FIXTURES.items()]
    cfgs.append(gptoss_synth.tiny_gptoss_config(**copy.deepcopy(GPTOSS)))
    for cfg in cfgs:
        text = cfg.get("text_config", cfg)
        for block in (text, text.get("rope_parameters") or {}, text.get("rope_scaling") or {}):
            if key in block:
                out.append(block[key])
    return out


def config_keys() -> set[str]:
    """Every config key the engine reads: the strings of csrc/core/config.c (the
    shared keys) and the key arguments of the getters in each family's reader
    (csrc/models/*.c: mf_cfg_* and mf_json_get* calls, mf_arch.experts_key)."""
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    keys = set(re.findall(r'"([a-z][a-z0-9_]*)"', (csrc / "core/config.c").read_text()))
    call = re.compile(r'(?:mf_cfg_\w+|mf_json_get\w*)\([^;"]*"([a-z][a-z0-9_]*)"', re.S)
    for path in sorted((csrc / "models").glob("*.c")):
        src = path.read_text()
        keys |= set(call.findall(src))
        keys |= set(re.findall(r'\.experts_key = "([a-z0-9_]+)"', src))
    return keys


def test_every_key_config_c_reads_is_non_default_somewhere() -> None:
    """Every key the config readers read (core/config.c and the families' readers in
    models/) takes a non-default value in at least one fixture (head_dim != hidden /
    heads, GQA, both values of the booleans). Parsed from the C source, so a key added
    there without a fixture fails here."""
    keys = config_keys() - NOT_MATH
    keys -= {"affine", "yarn", "default", "qwen3_5_moe_text", "mxfp4"}   # values
    assert {"moe_layer_freq", "linear_conv_kernel_dim", "mscale_all_dim",
            "use_qk_norm", "attention_bias"} <= keys
    missing = []
    for key in sorted(keys):
        vals = _values(key)
        if key in BOTH_WAYS:
            ok = {True, False} <= set(vals)
        elif key == "head_dim":
            ok = any(FIXTURES[a][0].get("head_dim", 0) * FIXTURES[a][0].get(
                "num_attention_heads", 4) != 256 for a in FIXTURES)
        elif key == "layer_types":   # read by gpt_oss alone
            ok = GPTOSS["layer_types"] != GPTOSS_ALTERNATING
        elif key == "num_key_value_heads":
            ok = any(0 < FIXTURES[a][0].get("num_key_value_heads", 0) < 4
                     for a in FIXTURES)
        elif key in DEFAULTS:
            ok = any(v not in DEFAULTS[key] for v in vals)
        else:
            ok = False   # a key this test does not know yet: add it to DEFAULTS
        if not ok:
            missing.append(f"{key} {vals}")
    assert not missing, f"keys without a non-default value in any fixture: {missing}"


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_decode(arch: str, nondefault) -> None:
    """Every prompt position, then single-token decode steps, within the CPU tier."""
    ckpt, model_dir = nondefault(arch)
    with moeflux.Model(model_dir, threads=2) as m:
        assert m.arch == arch
        ours = m.eval(PROMPT, all_logits=True)
        assert_close(ours, reference_logits(ckpt, PROMPT), f"{arch} prefill")
        rows = [m.eval([t]) for t in DECODE]
    ref = reference_decode(ckpt, PROMPT, DECODE)
    assert_close(ours[-1], ref[0], f"{arch} last prefill row vs cached reference")
    assert_close(np.stack(rows), ref[1:], f"{arch} decode")


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill(arch: str, nondefault) -> None:
    """The prompt in three pieces, every position within the CPU tier (state carried
    across calls: KV rows, conv history, delta-rule state, MLA latents)."""
    ckpt, model_dir = nondefault(arch)
    with moeflux.Model(model_dir, threads=2) as m:
        got = np.concatenate([m.eval(PROMPT[a:b], all_logits=True)
                              for a, b in ((0, 4), (4, 5), (5, len(PROMPT)))])
    assert_close(got, reference_logits(ckpt, PROMPT), f"{arch} chunked prefill")
