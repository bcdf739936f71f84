"""Synthetic checkpoints in the exact layout of mlx-community MLX uploads.

Tests and demos need models of every supported architecture without downloading
weights. This module writes them: sharded ``model*.safetensors`` files with
``__metadata__ {"format": "mlx"}``, ``model.safetensors.index.json``, ``config.json``
with the ``quantization`` block (and its ``quantization_config`` copy) exactly as
mlx-lm's ``quantize_model`` + ``save_config`` write them, and a small working byte-level
BPE ``tokenizer.json`` + ``tokenizer_config.json``.

Tensor names, shapes and dtypes follow what mlx-lm's own model classes produce after
``quantize_model`` (tests/test_synth.py proves equality, architecture by architecture):
quantized modules are ``weight`` U32 + ``scales``/``biases`` BF16, stacked experts get a
leading ``[E]``, MLA per-head matrices a leading ``[H]``; norms, conv1d, dt_bias and the
DeepSeek router are BF16; ``A_log`` (qwen3_5_moe) and ``e_score_correction_bias``
(deepseek_v3) stay F32 because mlx-lm's ``cast_predicate`` keeps them so.

Weights are generated directly in quantized form: random code words (uniform codes for
any bit width, since every bit pattern is a valid packing) and per-group scales/biases
chosen so the dequantized matrix has zero mean and standard deviation
``gain / sqrt(n_in)``. Every tensor is produced piece by piece (an expert slice or a
block of rows) from a generator seeded by (seed, tensor name, piece index), so output is
deterministic and memory stays bounded whatever the checkpoint size.

Command line::

    python -m moeflux.prep synth --arch qwen3_next --out DIR [--seed N]
        [--set key=value ...] [--layers N] [--preset qwen36-35b-a3b-shapes]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import queue
import re
import sys
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from moeflux.errors import SynthError
from moeflux.prep._common import check_disk
from moeflux.prep.safetensors_io import DTYPE_SIZES, SafetensorsWriter, f32_to_bf16

ARCHITECTURES = ("qwen3_5_moe", "qwen3_next", "deepseek_v3", "qwen3_moe", "glm4_moe",
                 "minimax")
VALID_BITS = (2, 3, 4, 5, 6, 8)
VALID_GROUP_SIZES = (32, 64, 128)
# Generation works on pieces of about this many bytes: large enough for numpy to be
# efficient, small enough that peak memory is a few tens of MB whatever the model.
PIECE_BYTES = 8 << 20
# Special tokens sit right after the 256 byte tokens so their ids never depend on how
# many merges fit into vocab_size.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_ID, EOS_ID = 256, 258
SYNTH_KEY = "_synth"  # private options carried in a tiny_config dict, never written

# Standard deviation multipliers (std = gain / sqrt(n_in)). Routers get a larger gain
# so the k-th and (k+1)-th expert are usually well apart: a near-tie would let rounding
# noise flip the choice between two implementations and make comparisons flaky.
GAIN_DEFAULT = 1.0
GAIN_ROUTER = 2.0
GAIN_LM_HEAD = 2.0
# Embedding rows of norm ~4: token identity must dominate the residual stream over
# attention outputs (which average over positions and so are alike across tokens),
# or every token's router input looks the same and one expert wins everywhere. Tied
# heads then give logits of std ~4, still a realistic spread.
GAIN_EMBED = 4.0
# Attention/GDN output projections: half gain, for the same reason (their outputs
# are averages over positions, so they add a component common to all tokens).
GAIN_MIXER_OUT = 0.5


# ==== Configs ====

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # Per-layer shapes of Qwen3.6-35B-A3B (model-math §2.1, reference-system §3.1):
    # 40 layers make the real model's ~20 GB; --layers picks fewer or more.
    "qwen36-35b-a3b-shapes": ("qwen3_5_moe", {
        "hidden_size": 2048, "num_hidden_layers": 40, "num_attention_heads": 16,
        "num_key_value_heads": 2, "head_dim": 256, "linear_num_key_heads": 16,
        "linear_num_value_heads": 32, "linear_key_head_dim": 128,
        "linear_value_head_dim": 128, "num_experts": 256, "num_experts_per_tok": 8,
        "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
        "vocab_size": 248320, "max_position_embeddings": 262144,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0,
                            "partial_rotary_factor": 0.25,
                            "mrope_section": [11, 11, 10], "mrope_interleaved": True},
    }),
}


def _base_text_qwen35() -> dict[str, Any]:
    return {
        "model_type": "qwen3_5_moe_text", "hidden_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "rms_norm_eps": 1e-6, "vocab_size": 512, "max_position_embeddings": 4096,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4,
        "linear_key_head_dim": 64, "linear_value_head_dim": 64,
        "linear_conv_kernel_dim": 4, "full_attention_interval": 4,
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64, "attn_output_gate": True,
        "attention_bias": False, "tie_word_embeddings": False,
        "mtp_num_hidden_layers": 0, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
        # rotary dims = 64 * 0.25 = 16 -> mrope sections sum to 8 (unused for text).
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0,
                            "partial_rotary_factor": 0.25, "mrope_section": [3, 3, 2],
                            "mrope_interleaved": True},
    }


def _base_qwen3_next() -> dict[str, Any]:
    return {
        "model_type": "qwen3_next", "architectures": ["Qwen3NextForCausalLM"],
        "hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4,
        "linear_key_head_dim": 64, "linear_value_head_dim": 64,
        "linear_conv_kernel_dim": 4, "num_experts": 8, "num_experts_per_tok": 2,
        "decoder_sparse_step": 1, "shared_expert_intermediate_size": 64,
        "mlp_only_layers": [], "moe_intermediate_size": 64, "rms_norm_eps": 1e-6,
        "vocab_size": 512, "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
        "max_position_embeddings": 4096, "norm_topk_prob": True,
        "tie_word_embeddings": False, "attention_bias": False, "rope_scaling": None,
        "full_attention_interval": 4, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
    }


def _base_deepseek_v3() -> dict[str, Any]:
    return {
        "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
        "vocab_size": 512, "hidden_size": 256, "intermediate_size": 128,
        "moe_intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 4, "n_shared_experts": 1, "n_routed_experts": 8,
        "routed_scaling_factor": 2.5, "kv_lora_rank": 64, "q_lora_rank": 64,
        "qk_rope_head_dim": 32, "v_head_dim": 64, "qk_nope_head_dim": 64,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
        "n_group": 4, "topk_group": 2, "num_experts_per_tok": 2, "moe_layer_freq": 1,
        "first_k_dense_replace": 1, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        # YaRN as in DeepSeek-V3; max_position_embeddings = factor * original (HF parity).
        "max_position_embeddings": 163840,
        "rope_scaling": {"type": "yarn", "factor": 40.0,
                         "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "attention_bias": False, "tie_word_embeddings": False,
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
    }


def _base_qwen3_moe() -> dict[str, Any]:
    return {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
        "hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "num_experts": 8, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "moe_intermediate_size": 64, "rms_norm_eps": 1e-6,
        "vocab_size": 512, "rope_theta": 1000000.0, "tie_word_embeddings": False,
        "max_position_embeddings": 4096, "norm_topk_prob": True,
        "attention_bias": False, "rope_scaling": None,
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
    }


def _base_glm4_moe() -> dict[str, Any]:
    # GLM-4.5's choices at tiny size: q/k/v biases, no q/k norm, half the head dims
    # rotated, one dense layer first, one shared expert, sigmoid noaux_tc routing.
    return {
        "model_type": "glm4_moe", "architectures": ["Glm4MoeForCausalLM"],
        "vocab_size": 512, "hidden_size": 256, "intermediate_size": 128,
        "max_position_embeddings": 4096, "moe_intermediate_size": 64,
        "norm_topk_prob": True, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "n_group": 1, "topk_group": 1, "n_shared_experts": 1,
        "n_routed_experts": 8, "routed_scaling_factor": 2.5, "num_experts_per_tok": 2,
        "first_k_dense_replace": 1, "num_hidden_layers": 3, "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0, "rope_scaling": None, "use_qk_norm": False,
        "tie_word_embeddings": False, "attention_bias": True,
        "partial_rotary_factor": 0.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
    }


def _base_minimax() -> dict[str, Any]:
    # MiniMax-M2's choices at tiny size: q/k RMSNorms over all heads' dims, half of
    # each head's dims rotated (rotary_dim), rope base 5e6, every layer routed experts
    # (sigmoid scores, correction bias, k 2 renormalised, no shared expert), the
    # router 8-bit as mlx-lm's quant_predicate makes it.
    return {
        "model_type": "minimax", "architectures": ["MiniMaxM2ForCausalLM"],
        "vocab_size": 512, "hidden_size": 256, "intermediate_size": 64,
        "max_position_embeddings": 4096, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "rotary_dim": 32,
        "num_local_experts": 8, "num_experts_per_tok": 2, "shared_intermediate_size": 0,
        "num_hidden_layers": 3, "rms_norm_eps": 1e-6, "rope_theta": 5000000.0,
        "use_qk_norm": True, "scoring_func": "sigmoid", "tie_word_embeddings": False,
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
    }


def tiny_config(arch: str, **overrides: Any) -> dict:
    """A complete config.json dict (quantization block included) for a tiny ``arch``.

    ``overrides`` sets any config key (for qwen3_5_moe inside ``text_config``) plus the
    pseudo-keys ``bits`` (4), ``group_size`` (64), ``gate_bits`` (bits of the router /
    shared_expert_gate override entries; 8 for the Qwen families, None = no entries),
    ``gate_group_size`` (64, as mlx-lm's predicates) and ``mla_form`` ("embed_q" or
    "kv_b_proj", deepseek_v3 only). Derived keys (``layer_types``, the quantization
    block) are recomputed after the overrides.
    """
    if arch not in ARCHITECTURES:
        raise SynthError(f"unknown architecture {arch!r}; expected one of "
                         f"{', '.join(ARCHITECTURES)}")
    ov = dict(overrides)
    bits = int(ov.pop("bits", 4))
    group_size = int(ov.pop("group_size", 64))
    float_router = arch in ("deepseek_v3", "glm4_moe")   # MoEGate: a plain array
    gate_bits = ov.pop("gate_bits", None if float_router else 8)
    gate_group_size = int(ov.pop("gate_group_size", 64))
    mla_form = ov.pop("mla_form", "embed_q")
    if bits not in VALID_BITS:
        raise SynthError(f"bits={bits}: MLX affine quantization allows {VALID_BITS}")
    if group_size not in VALID_GROUP_SIZES:
        raise SynthError(f"group_size={group_size}: allowed {VALID_GROUP_SIZES}")
    if gate_bits is not None:
        if float_router:
            raise SynthError(f"gate_bits: the {arch} router is a float tensor, "
                             "never quantized; pass gate_bits=None")
        if int(gate_bits) not in VALID_BITS:
            raise SynthError(f"gate_bits={gate_bits}: allowed {VALID_BITS}")
        gate_bits = int(gate_bits)
    if mla_form not in ("embed_q", "kv_b_proj"):
        raise SynthError(f"mla_form={mla_form!r}: expected 'embed_q' or 'kv_b_proj'")
    if arch != "deepseek_v3" and "mla_form" in overrides:
        raise SynthError("mla_form applies to deepseek_v3 only")

    if arch == "qwen3_5_moe":
        text = _base_text_qwen35()
        explicit_types = "layer_types" in ov
        text.update(copy.deepcopy(ov))
        if not explicit_types:
            text["layer_types"] = _layer_types(text)
        cfg: dict[str, Any] = {
            "model_type": "qwen3_5_moe",
            "architectures": ["Qwen3_5MoeForConditionalGeneration"],
            "tie_word_embeddings": text["tie_word_embeddings"],
            "bos_token_id": text.get("bos_token_id", BOS_ID),
            "eos_token_id": text.get("eos_token_id", EOS_ID),
            "text_config": text,
        }
    else:
        cfg = {"qwen3_next": _base_qwen3_next, "deepseek_v3": _base_deepseek_v3,
               "qwen3_moe": _base_qwen3_moe, "glm4_moe": _base_glm4_moe,
               "minimax": _base_minimax}[arch]()
        explicit_types = "layer_types" in ov
        cfg.update(copy.deepcopy(ov))
        if arch == "qwen3_next" and not explicit_types:
            cfg["layer_types"] = _layer_types(cfg)
        if arch == "deepseek_v3":
            cfg[SYNTH_KEY] = {"mla_form": mla_form}

    quant: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    if gate_bits is not None:
        for mod in _modules(cfg):
            if isinstance(mod, _Linear) and mod.is_gate and mod.n_in % group_size == 0:
                # mlx-lm's quant_predicate returns exactly these two keys (no "mode").
                quant[mod.path] = {"group_size": gate_group_size, "bits": gate_bits}
    cfg["quantization"] = quant
    cfg["quantization_config"] = copy.deepcopy(quant)
    return cfg


def _layer_types(text: dict[str, Any]) -> list[str]:
    """HF's layer_types list, consistent with mlx-lm's full_attention_interval rule."""
    interval = int(text.get("full_attention_interval", 4))
    return ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
            for i in range(int(text["num_hidden_layers"]))]


# ==== Module plan ====

@dataclass(frozen=True)
class _Linear:
    """A Linear/Embedding/SwitchLinear/MultiLinear: float [lead, out, in], maybe
    quantized. ``lead`` is the stacked-expert or per-head count (0 = none)."""

    path: str
    n_out: int
    n_in: int
    lead: int = 0
    gain: float = GAIN_DEFAULT
    is_gate: bool = False  # target of the 8-bit router override predicates


@dataclass(frozen=True)
class _Float:
    """A plain float parameter and how to fill it."""

    name: str
    shape: tuple[int, ...]
    init: str  # "norm" | "normal" | "a_log" | "dt_bias" | "corr_bias"
    dtype: str = "BF16"
    std: float = 1.0
    in_leaf: bool = True   # held by a leaf module (see _total_parameters)


def _text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg["text_config"] if "text_config" in cfg else cfg


def _modules(cfg: dict[str, Any]) -> list[_Linear | _Float]:
    """Every parameter-bearing module of the model, in mlx-lm's module-tree order."""
    arch = cfg["model_type"]
    if arch not in ARCHITECTURES:
        raise SynthError(f"config model_type {arch!r} is not one of "
                         f"{', '.join(ARCHITECTURES)}")
    t = _text_config(cfg)
    if t.get("attention_bias") and arch != "glm4_moe":
        raise SynthError("attention_bias=true is not supported by synth")
    prefix = "language_model." if arch == "qwen3_5_moe" else ""
    hid, vocab = int(t["hidden_size"]), int(t["vocab_size"])
    mods: list[_Linear | _Float] = [
        _Linear(f"{prefix}model.embed_tokens", vocab, hid, gain=GAIN_EMBED)]
    for il in range(int(t["num_hidden_layers"])):
        lp = f"{prefix}model.layers.{il}"
        if arch in ("qwen3_5_moe", "qwen3_next"):
            mods += _qwen_hybrid_layer(arch, t, il, lp)
        elif arch == "qwen3_moe":
            mods += _qwen_attention(t, lp, gated=False)
            mods += _norms(lp, hid)
            mods += _qwen_moe_mlp(arch, t, il, lp)
        elif arch == "glm4_moe":
            mods += _glm_attention(t, lp)
            mods += _norms(lp, hid)
            mods += _deepseek_mlp(t, il, lp, moe_layer_freq=False)
        elif arch == "minimax":
            mods += _minimax_attention(t, lp)
            mods += _norms(lp, hid)
            mods += _minimax_moe(t, lp)
        else:
            mods += _mla_attention(cfg, lp)
            mods += _norms(lp, hid)
            mods += _deepseek_mlp(t, il, lp)
    mods.append(_Float(f"{prefix}model.norm.weight", (hid,), "norm"))
    # mlx-lm's deepseek_v3 and glm4_moe always have their own lm_head.
    if arch in ("deepseek_v3", "glm4_moe") or not t.get("tie_word_embeddings", False):
        mods.append(_Linear(f"{prefix}lm_head", vocab, hid, gain=GAIN_LM_HEAD))
    return mods


def _norms(lp: str, hid: int) -> list[_Linear | _Float]:
    return [_Float(f"{lp}.input_layernorm.weight", (hid,), "norm"),
            _Float(f"{lp}.post_attention_layernorm.weight", (hid,), "norm")]


def _qwen_hybrid_layer(arch: str, t: dict, il: int, lp: str) -> list[_Linear | _Float]:
    hid = int(t["hidden_size"])
    interval = int(t.get("full_attention_interval", 4))
    mods: list[_Linear | _Float] = []
    if (il + 1) % interval != 0:
        nk, nv = int(t["linear_num_key_heads"]), int(t["linear_num_value_heads"])
        dk, dv = int(t["linear_key_head_dim"]), int(t["linear_value_head_dim"])
        ksz = int(t["linear_conv_kernel_dim"])
        conv_dim = 2 * nk * dk + nv * dv
        la = f"{lp}.linear_attn"
        # Each conv output sums ksz taps: std 1/sqrt(ksz) keeps it at unit scale.
        mods.append(_Float(f"{la}.conv1d.weight", (conv_dim, ksz, 1), "normal",
                           std=1.0 / math.sqrt(ksz)))
        if arch == "qwen3_5_moe":
            mods += [_Linear(f"{la}.in_proj_qkv", conv_dim, hid),
                     _Linear(f"{la}.in_proj_z", nv * dv, hid),
                     _Linear(f"{la}.in_proj_b", nv, hid),
                     _Linear(f"{la}.in_proj_a", nv, hid)]
        else:
            mods += [_Linear(f"{la}.in_proj_qkvz", 2 * nk * dk + 2 * nv * dv, hid),
                     _Linear(f"{la}.in_proj_ba", 2 * nv, hid)]
        # mlx-lm's qwen3_5 cast_predicate keeps A_log in f32; qwen3_next has none.
        mods += [_Float(f"{la}.dt_bias", (nv,), "dt_bias"),
                 _Float(f"{la}.A_log", (nv,), "a_log",
                        dtype="F32" if arch == "qwen3_5_moe" else "BF16"),
                 _Float(f"{la}.norm.weight", (dv,), "norm"),
                 _Linear(f"{la}.out_proj", hid, nv * dv, gain=GAIN_MIXER_OUT)]
    else:
        mods += _qwen_attention(t, lp, gated=True)
    mods += _norms(lp, hid)
    mods += _qwen_moe_mlp(arch, t, il, lp)
    return mods


def _attn_dims(t: dict, lp: str) -> tuple[int, int, int, int, str]:
    """(hidden, query heads, KV heads, head dim, module path) of a GQA attention."""
    hid, nh, nkv = (int(t[k]) for k in ("hidden_size", "num_attention_heads",
                                         "num_key_value_heads"))
    return hid, nh, nkv, int(t.get("head_dim") or hid // nh), f"{lp}.self_attn"


def _qwen_attention(t: dict, lp: str, gated: bool) -> list[_Linear | _Float]:
    hid, nh, nkv, hd, sa = _attn_dims(t, lp)
    # Gated attention: q_proj holds query and output gate per head ([h][q | gate]).
    return [_Linear(f"{sa}.q_proj", nh * hd * (2 if gated else 1), hid),
            _Linear(f"{sa}.k_proj", nkv * hd, hid),
            _Linear(f"{sa}.v_proj", nkv * hd, hid),
            _Linear(f"{sa}.o_proj", hid, nh * hd, gain=GAIN_MIXER_OUT),
            _Float(f"{sa}.q_norm.weight", (hd,), "norm"),
            _Float(f"{sa}.k_norm.weight", (hd,), "norm")]


def _glm_attention(t: dict, lp: str) -> list[_Linear | _Float]:
    """GLM-4 MoE attention: q/k/v biases (attention_bias), q/k norms (use_qk_norm)."""
    hid, nh, nkv, hd, sa = _attn_dims(t, lp)
    mods: list[_Linear | _Float] = [
        _Linear(f"{sa}.q_proj", nh * hd, hid), _Linear(f"{sa}.k_proj", nkv * hd, hid),
        _Linear(f"{sa}.v_proj", nkv * hd, hid)]
    if t.get("attention_bias"):
        mods += [_Float(f"{sa}.{p}_proj.bias", (n,), "normal", std=0.5)
                 for p, n in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd))]
    mods.append(_Linear(f"{sa}.o_proj", hid, nh * hd, gain=GAIN_MIXER_OUT))
    if t.get("use_qk_norm"):
        mods += [_Float(f"{sa}.q_norm.weight", (hd,), "norm"),
                 _Float(f"{sa}.k_norm.weight", (hd,), "norm")]
    return mods


def _minimax_attention(t: dict, lp: str) -> list[_Linear | _Float]:
    """MiniMax attention: no biases; q/k norms (use_qk_norm, default on) of all the
    query / key heads' dims at once."""
    hid, nh, nkv, hd, sa = _attn_dims(t, lp)
    mods: list[_Linear | _Float] = [
        _Linear(f"{sa}.q_proj", nh * hd, hid), _Linear(f"{sa}.k_proj", nkv * hd, hid),
        _Linear(f"{sa}.v_proj", nkv * hd, hid),
        _Linear(f"{sa}.o_proj", hid, nh * hd, gain=GAIN_MIXER_OUT)]
    if t.get("use_qk_norm", True):
        mods += [_Float(f"{sa}.q_norm.weight", (nh * hd,), "norm"),
                 _Float(f"{sa}.k_norm.weight", (nkv * hd,), "norm")]
    return mods


def _minimax_moe(t: dict, lp: str) -> list[_Linear | _Float]:
    """MiniMax's block_sparse_moe: a quantizable router, experts of width
    intermediate_size, and the correction bias mlx-lm's cast_predicate keeps f32."""
    hid, n_exp = int(t["hidden_size"]), int(t["num_local_experts"])
    mp = f"{lp}.block_sparse_moe"
    mods: list[_Linear | _Float] = [
        _Linear(f"{mp}.gate", n_exp, hid, gain=GAIN_ROUTER, is_gate=True)]
    mods += _switch_mlp(f"{mp}.switch_mlp", hid, int(t["intermediate_size"]), n_exp)
    mods.append(_Float(f"{mp}.e_score_correction_bias", (n_exp,), "corr_bias",
                       dtype="F32", in_leaf=False))
    return mods


def _dense_mlp(path: str, hid: int, inter: int) -> list[_Linear | _Float]:
    return [_Linear(f"{path}.gate_proj", inter, hid),
            _Linear(f"{path}.up_proj", inter, hid),
            _Linear(f"{path}.down_proj", hid, inter)]


def _switch_mlp(path: str, hid: int, inter: int, n_exp: int) -> list[_Linear | _Float]:
    return [_Linear(f"{path}.gate_proj", inter, hid, lead=n_exp),
            _Linear(f"{path}.up_proj", inter, hid, lead=n_exp),
            _Linear(f"{path}.down_proj", hid, inter, lead=n_exp)]


def _qwen_moe_mlp(arch: str, t: dict, il: int, lp: str) -> list[_Linear | _Float]:
    hid, n_exp = int(t["hidden_size"]), int(t.get("num_experts", 0))
    shared = arch != "qwen3_moe"  # the hybrids add a gated shared expert
    if arch == "qwen3_5_moe":
        is_moe = n_exp > 0  # qwen3_5: every layer, no mlp_only_layers/sparse step
    else:
        step = int(t.get("decoder_sparse_step", 1))
        is_moe = (il not in t.get("mlp_only_layers", []) and n_exp > 0
                  and (il + 1) % step == 0)
    mp = f"{lp}.mlp"
    if not is_moe:
        return _dense_mlp(mp, hid, int(t["intermediate_size"]))
    mods: list[_Linear | _Float] = [
        _Linear(f"{mp}.gate", n_exp, hid, gain=GAIN_ROUTER, is_gate=True)]
    mods += _switch_mlp(f"{mp}.switch_mlp", hid, int(t["moe_intermediate_size"]), n_exp)
    if shared:
        mods += _dense_mlp(f"{mp}.shared_expert", hid,
                           int(t["shared_expert_intermediate_size"]))
        mods.append(_Linear(f"{mp}.shared_expert_gate", 1, hid, is_gate=True))
    return mods


def _mla_attention(cfg: dict, lp: str) -> list[_Linear | _Float]:
    hid, nh = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    nope, rope = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"])
    vd, kv_lora = int(cfg["v_head_dim"]), int(cfg["kv_lora_rank"])
    q_lora = cfg.get("q_lora_rank")
    form = cfg.get(SYNTH_KEY, {}).get("mla_form", "embed_q")
    sa = f"{lp}.self_attn"
    mods: list[_Linear | _Float] = []
    if q_lora is None:
        mods.append(_Linear(f"{sa}.q_proj", nh * (nope + rope), hid))
    else:
        mods += [_Linear(f"{sa}.q_a_proj", int(q_lora), hid),
                 _Float(f"{sa}.q_a_layernorm.weight", (int(q_lora),), "norm"),
                 _Linear(f"{sa}.q_b_proj", nh * (nope + rope), int(q_lora))]
    mods += [_Linear(f"{sa}.kv_a_proj_with_mqa", kv_lora + rope, hid),
             _Float(f"{sa}.kv_a_layernorm.weight", (kv_lora,), "norm")]
    if form == "kv_b_proj":
        # Older mlx-lm conversions: rows [h][k_nope(nope) | v(vd)] over the latent.
        mods.append(_Linear(f"{sa}.kv_b_proj", nh * (nope + vd), kv_lora))
    else:
        # mlx-lm >= 0.30.6: the same matrix split per head, K part transposed.
        mods += [_Linear(f"{sa}.embed_q", kv_lora, nope, lead=nh),
                 _Linear(f"{sa}.unembed_out", vd, kv_lora, lead=nh)]
    mods.append(_Linear(f"{sa}.o_proj", hid, nh * vd, gain=GAIN_MIXER_OUT))
    return mods


def _deepseek_mlp(t: dict, il: int, lp: str,
                  moe_layer_freq: bool = True) -> list[_Linear | _Float]:
    """DeepSeek-V3's MoE layer (and GLM-4 MoE's, which has no moe_layer_freq)."""
    hid, n_exp = int(t["hidden_size"]), t.get("n_routed_experts")
    mp = f"{lp}.mlp"
    freq = int(t.get("moe_layer_freq", 1)) if moe_layer_freq else 1
    if not (n_exp is not None and il >= int(t.get("first_k_dense_replace", 0))
            and il % freq == 0):
        return _dense_mlp(mp, hid, int(t["intermediate_size"]))
    inter = int(t["moe_intermediate_size"])
    mods = _switch_mlp(f"{mp}.switch_mlp", hid, inter, int(n_exp))
    # Router: plain float module (not quantizable); correction bias kept f32 by
    # mlx-lm's deepseek cast_predicate.
    mods += [_Float(f"{mp}.gate.weight", (int(n_exp), hid), "normal",
                    std=GAIN_ROUTER / math.sqrt(hid)),
             _Float(f"{mp}.gate.e_score_correction_bias", (int(n_exp),), "corr_bias",
                    dtype="F32")]
    if t.get("n_shared_experts") is not None:
        mods += _dense_mlp(f"{mp}.shared_experts", hid,
                           inter * int(t["n_shared_experts"]))
    return mods


# ==== Tensor plan ====

@dataclass(frozen=True)
class _Tensor:
    """One tensor to write: name, dtype, shape, and a factory of its byte pieces."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: Callable[[], Iterator[bytes]]

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def _quant_params(quant: dict | None, mod: _Linear) -> tuple[int, int] | None:
    """(bits, group_size) of a module, or None for float: the same rule as mlx-lm's
    quantize_model (default params only when n_in divides by the default group size)
    followed by its per-path overrides."""
    if quant is None:
        return None
    entry = quant.get(mod.path)
    if entry is False:
        return None
    if mod.n_in % int(quant["group_size"]) != 0:
        return None
    if isinstance(entry, dict):
        bits, gs = int(entry["bits"]), int(entry["group_size"])
        mode = entry.get("mode", "affine")
    else:
        bits, gs = int(quant["bits"]), int(quant["group_size"])
        mode = quant.get("mode", "affine")
    if mode != "affine":
        raise SynthError(f"{mod.path}: quantization mode {mode!r}; synth writes "
                         "affine only")
    if bits not in VALID_BITS or gs not in VALID_GROUP_SIZES:
        raise SynthError(f"{mod.path}: bits {bits} / group_size {gs} not allowed")
    if mod.n_in % gs != 0:
        raise SynthError(f"{mod.path}: in_features {mod.n_in} is not a multiple of "
                         f"its group_size {gs}")
    return bits, gs


def _tensor_plan(cfg: dict, seed: int) -> list[_Tensor]:
    quant = cfg.get("quantization")
    out: list[_Tensor] = []
    for mod in _modules(cfg):
        if isinstance(mod, _Float):
            out.append(_Tensor(mod.name, mod.dtype, mod.shape,
                               _float_pieces(mod, seed)))
            continue
        lead = (mod.lead,) if mod.lead else ()
        qp = _quant_params(quant, mod)
        if qp is None:
            out.append(_Tensor(f"{mod.path}.weight", "BF16",
                               lead + (mod.n_out, mod.n_in),
                               _float_linear_pieces(mod, seed)))
            continue
        bits, gs = qp
        out.append(_Tensor(f"{mod.path}.weight", "U32",
                           lead + (mod.n_out, mod.n_in * bits // 32),
                           _code_pieces(mod, bits, seed)))
        for part in ("scales", "biases"):
            out.append(_Tensor(f"{mod.path}.{part}", "BF16",
                               lead + (mod.n_out, mod.n_in // gs),
                               _affine_pieces(mod, bits, gs, seed, part)))
    return out


def _rng(seed: int, name: str, *idx: int) -> np.random.Generator:
    """Generator for one piece of one tensor: independent of write order."""
    # SFC64: the fastest numpy bit generator for raw words (~3 GB/s here), which
    # is what code words need; statistical quality is ample for test weights.
    return np.random.Generator(np.random.SFC64(
        np.random.SeedSequence([seed & 0xFFFFFFFF, zlib.crc32(name.encode())] +
                               [int(i) for i in idx])))


def _row_blocks(n_rows: int, row_bytes: int) -> Iterator[tuple[int, int, int]]:
    """(block index, first row, row count): fixed by the shape alone, so the random
    stream of each block does not depend on anything but the tensor."""
    per = max(1, PIECE_BYTES // max(1, row_bytes))
    for ib, r0 in enumerate(range(0, n_rows, per)):
        yield ib, r0, min(per, n_rows - r0)


def _code_pieces(mod: _Linear, bits: int, seed: int) -> Callable[[], Iterator[Any]]:
    words = mod.n_in * bits // 32

    def gen() -> Iterator[bytes]:
        for il in range(max(1, mod.lead)):
            for ib, _, n in _row_blocks(mod.n_out, words * 4):
                # Random bits are a valid packing for every bit width (2..8, stream
                # or word packed), and give codes uniform over [0, 2^bits).
                nbytes = n * words * 4
                raw = _rng(seed, mod.path + ".weight", il, ib).bit_generator.random_raw(
                    (nbytes + 7) // 8)
                yield memoryview(raw.view(np.uint8)[:nbytes])
    return gen


def _affine_pieces(mod: _Linear, bits: int, gs: int, seed: int,
                   part: str) -> Callable[[], Iterator[bytes]]:
    groups = mod.n_in // gs
    n_levels = (1 << bits) - 1
    # Codes uniform on {0..n}: variance ((n+1)^2 - 1) / 12. Pick |scale| so the
    # dequantized value s*q + b has std gain/sqrt(n_in) and b = -s*n/2 centres it.
    code_std = math.sqrt(((n_levels + 1) ** 2 - 1) / 12.0)
    target = mod.gain / math.sqrt(mod.n_in)
    base = target / code_std

    def gen() -> Iterator[bytes]:
        for il in range(max(1, mod.lead)):
            for ib, _, n in _row_blocks(mod.n_out, groups * 4):
                # scales and biases come from the same stream, drawn twice, so each
                # is written alone yet the pair stays consistent.
                r = _rng(seed, mod.path + ".affine", il, ib)
                # u[0] in [-1, 1): its sign is the scale's sign (mlx scales take both
                # signs), |u| spreads |scale| over base*[0.75, 1.25). u[1] shifts each
                # group's mean by a little (std 0.05*target) so groups differ.
                u = r.random(size=(2, n, groups), dtype=np.float32) * 2.0 - 1.0
                scales = np.where(u[0] < 0, -base, base) * (0.75 + 0.5 * np.abs(u[0]))
                scales = scales.astype(np.float32)
                if part == "scales":
                    yield f32_to_bf16(scales).tobytes()
                else:
                    jitter = u[1] * (0.05 * math.sqrt(3.0) * target)
                    biases = (-scales * (n_levels / 2.0) + jitter).astype(np.float32)
                    yield f32_to_bf16(biases).tobytes()
    return gen


def _float_linear_pieces(mod: _Linear, seed: int) -> Callable[[], Iterator[bytes]]:
    std = mod.gain / math.sqrt(mod.n_in)

    def gen() -> Iterator[bytes]:
        for il in range(max(1, mod.lead)):
            for ib, _, n in _row_blocks(mod.n_out, mod.n_in * 4):
                r = _rng(seed, mod.path + ".weight", il, ib)
                w = r.normal(0.0, std, size=(n, mod.n_in)).astype(np.float32)
                yield f32_to_bf16(w).tobytes()
    return gen


def _float_pieces(mod: _Float, seed: int) -> Callable[[], Iterator[bytes]]:
    rows = mod.shape[0]
    cols = int(np.prod(mod.shape[1:])) if len(mod.shape) > 1 else 1

    def gen() -> Iterator[bytes]:
        for ib, _, n in _row_blocks(rows, cols * 4):
            r = _rng(seed, mod.name, ib)
            size = (n, cols) if len(mod.shape) > 1 else (n,)
            if mod.init == "norm":
                # Never all ones: a missing or extra "+1" must change the output.
                x = r.uniform(0.5, 1.5, size=size)
            elif mod.init == "normal":
                x = r.normal(0.0, mod.std, size=size)
            elif mod.init == "a_log":
                x = np.log(r.uniform(1.0, 16.0, size=size))  # as HF's A init
            elif mod.init == "dt_bias":
                # softplus(a + dt_bias) mostly in 0.05..1: decays exp(-A*dt) spread
                # over (0, 1), so the recurrent state matters for several tokens.
                x = r.uniform(-3.0, 0.0, size=size)
            elif mod.init == "corr_bias":
                mag = r.uniform(0.02, 0.2, size=size)
                x = mag * np.where(r.random(size=size) < 0.5, -1.0, 1.0)
            else:
                raise AssertionError(mod.init)
            x = x.astype(np.float32)
            yield (x.tobytes() if mod.dtype == "F32" else f32_to_bf16(x).tobytes())
    return gen


def _total_parameters(cfg: dict) -> int:
    """mlx-lm's get_total_parameters: quantized modules count their unpacked weight,
    scales and biases not included; float modules count every element. It sums over
    LEAF modules only, so A_log and dt_bias (held directly by the GatedDeltaNet, which
    has children) are not counted, nor minimax's e_score_correction_bias (held by its
    block_sparse_moe)."""
    n = 0
    for mod in _modules(cfg):
        if isinstance(mod, _Float):
            if mod.init not in ("a_log", "dt_bias") and mod.in_leaf:
                n += int(np.prod(mod.shape))
        else:
            n += max(1, mod.lead) * mod.n_out * mod.n_in
    return n


# ==== Writing ====

def checkpoint_bytes(config: dict) -> int:
    """Bytes of tensor data write_checkpoint writes for ``config`` (the shards'
    headers and the small JSON files come on top: kilobytes)."""
    return sum(t.nbytes for t in _tensor_plan(config, 0))


def write_checkpoint(out_dir: str | os.PathLike, config: dict, *, seed: int = 0,
                     max_shard_bytes: int = 5 * 10**9,
                     progress: bool = False) -> Path:
    """Write the checkpoint for ``config`` into ``out_dir`` and return its path.

    ``config`` is a tiny_config() dict or any consistent config of a supported
    architecture (no ``quantization`` block = unquantized BF16 model). Deterministic
    by ``seed``. Shards at ``max_shard_bytes`` the way mlx-lm's save_model does (a
    tensor larger than the limit gets a shard of its own). Streams tensor by tensor,
    piece by piece. Existing files of the same names are replaced.
    """
    out = Path(out_dir)
    cfg = copy.deepcopy(config)
    cfg.pop(SYNTH_KEY, None)
    plan = _tensor_plan(config, seed)
    if "quantization" in cfg:
        cfg["quantization_config"] = copy.deepcopy(cfg["quantization"])
    vocab = int(_text_config(cfg)["vocab_size"])
    tokenizer = build_tokenizer_json(vocab)  # fails early on a too-small vocab
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model*.safetensors"):
        old.unlink()  # a previous, differently sharded write must not be globbed
    # Refuse before writing when the disk cannot hold it, not gigabytes later.
    check_disk(out, sum(t.nbytes for t in plan))

    shards: list[list[_Tensor]] = []
    size = 0
    for t in plan:
        if not shards or size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    total = sum(t.nbytes for t in plan)
    bar = _progress_bar(total) if progress else None
    weight_map: dict[str, str] = {}
    try:
        for i, shard in enumerate(shards):
            fname = (f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                     if len(shards) > 1 else "model.safetensors")
            _write_shard(out / fname, shard, bar)
            weight_map.update({t.name: fname for t in shard})
    finally:
        if bar is not None:
            bar.close()
    index = {"metadata": {"total_size": total,
                          "total_parameters": _total_parameters(config)},
             "weight_map": dict(sorted(weight_map.items()))}
    _write_text(out / "model.safetensors.index.json", json.dumps(index, indent=4))
    _write_text(out / "tokenizer.json", json.dumps(tokenizer, ensure_ascii=False))
    _write_text(out / "tokenizer_config.json",
                json.dumps(_tokenizer_config(cfg), indent=2))
    # config.json last: its presence marks a complete checkpoint.
    _write_text(out / "config.json", json.dumps(dict(sorted(cfg.items())), indent=4))
    return out


def _write_shard(path: Path, tensors: list[_Tensor], bar: Any) -> None:
    """Generate pieces on this thread while a second thread writes them: file writes
    release the GIL, so disk time overlaps generation. The bounded queue keeps at most
    a few pieces (tens of MB) in flight."""
    writer = SafetensorsWriter(path, [(t.name, t.dtype, t.shape) for t in tensors],
                               metadata={"format": "mlx"})
    pending: queue.Queue = queue.Queue(maxsize=4)
    failure: list[BaseException] = []

    def drain() -> None:
        while True:
            item = pending.get()
            if item is None:
                return
            if failure:
                continue  # keep draining so the producer never blocks forever
            try:
                writer.write(item[0], item[1])
            except BaseException as exc:  # handed to the producer below
                failure.append(exc)

    thread = threading.Thread(target=drain, name="synth-writer", daemon=True)
    thread.start()
    try:
        try:
            for t in tensors:
                for piece in t.pieces():
                    if failure:
                        raise failure[0]
                    pending.put((t.name, piece))
                    if bar is not None:
                        bar.update(len(piece))
        finally:
            pending.put(None)
            thread.join()
        if failure:
            raise failure[0]
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _progress_bar(total: int) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar, same output
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc="synth")


# ==== Tokenizer ====

# Training text for the merges: plain English and a little code, so common words
# become single tokens and prompts tokenize to a realistic number of ids.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A mixture of experts model routes each
token to a few experts out of many, and only those experts are read from the disk.
The router picks the top experts for every token in every layer. Hello, world! This is
a small test of the tokenizer: it splits text into bytes and merges frequent pairs.
def forward(self, x): return self.down(silu(self.gate(x)) * self.up(x))
The model reads the weights of the dense part once and keeps them in memory, while the
experts stream in with each token. What is the capital of France? The capital of
France is Paris. One, two, three, four, five, six, seven, eight, nine, ten. 0123456789
user assistant system <think> </think> the the the and and of of to to in in is is
"""


def _byte_alphabet() -> list[str]:
    """Printable stand-in character for each byte (the byte-level BPE convention):
    printable Latin-1 bytes map to themselves, the rest to code points from 256 up."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) +
            list(range(0xAE, 0x100)))
    chars: list[str] = []
    extra = 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _learn_merges(n_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE training on _CORPUS; ties broken by the pair itself (deterministic)."""
    alphabet = _byte_alphabet()
    counts: dict[tuple[str, ...], int] = {}
    for word in re.findall(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+", _CORPUS):
        key = tuple(alphabet[b] for b in word.encode("utf-8"))
        counts[key] = counts.get(key, 0) + 1
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: dict[tuple[str, str], int] = {}
        for word, c in counts.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        joined = best[0] + best[1]
        new_counts: dict[tuple[str, ...], int] = {}
        for word, c in counts.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_counts[tuple(out)] = new_counts.get(tuple(out), 0) + c
        counts = new_counts
    return merges


_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _pseudo_words() -> Iterator[str]:
    """Pronounceable made-up words, one syllable (consonant + vowel) first, then
    two, then three...: endless and deterministic."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    words = [""]
    while True:
        words = [w + s for w in words for s in syllables]
        yield from words


def _fill_with_words(vocab: dict[str, int], vocab_size: int, space: str) -> None:
    """Give every id left below vocab_size a token: a space and a made-up word.
    Encoding never produces them (no merge leads there), but a model samples any id,
    and each must decode to readable text rather than nothing."""
    words = _pseudo_words()
    while len(vocab) < vocab_size:
        token = space + next(words)
        if token not in vocab:
            vocab[token] = len(vocab)


def build_tokenizer_json(vocab_size: int, max_merges: int = 256) -> dict:
    """A byte-level BPE tokenizer.json (HF ``tokenizers`` format) covering exactly
    ``vocab_size`` ids: 0..255 bytes, 256..258 special tokens, then merges, then
    made-up words (so that every id a model can produce decodes to text)."""
    n_fixed = 256 + len(SPECIAL_TOKENS)
    if vocab_size < n_fixed:
        raise SynthError(f"vocab_size {vocab_size} is too small for a byte-level "
                         f"tokenizer: it needs at least {n_fixed} ids")
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {ch: i for i, ch in enumerate(alphabet)}
    added = []
    for i, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = 256 + i
        added.append({"id": 256 + i, "content": tok, "single_word": False,
                      "lstrip": False, "rstrip": False, "normalized": False,
                      "special": True})
    merges = _learn_merges(min(max_merges, vocab_size - n_fixed))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    _fill_with_words(vocab, vocab_size, alphabet[ord(" ")])
    byte_level = {"type": "ByteLevel", "add_prefix_space": False,
                  "trim_offsets": False, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": added, "normalizer": None,
        "pre_tokenizer": byte_level, "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True,
                    "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [[a, b] for a, b in merges]},
    }


_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer_config(cfg: dict) -> dict:
    t = _text_config(cfg)
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[2],
        "pad_token": SPECIAL_TOKENS[0], "unk_token": None,
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(t.get("max_position_embeddings", 4096)),
        "chat_template": _CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(256 + i): {"content": tok, "lstrip": False, "normalized": False,
                           "rstrip": False, "single_word": False, "special": True}
            for i, tok in enumerate(SPECIAL_TOKENS)},
    }


# ==== Command line ====

def _parse_value(text: str) -> Any:
    """--set values: JSON when they parse (numbers, true, null, lists), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def register(subparsers: Any) -> None:
    """Add the ``synth`` command to moeflux.prep's CLI."""
    p = subparsers.add_parser(
        "synth", help="write a synthetic MLX-layout checkpoint",
        description="Write a synthetic checkpoint (mlx-community layout) of a "
                    "supported architecture with random quantized weights.")
    p.add_argument("--arch", choices=ARCHITECTURES,
                   help="architecture (implied by --preset)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override or pseudo-key (bits, group_size, gate_bits, "
                        "gate_group_size, mla_form); repeatable")
    p.add_argument("--layers", type=int, help="num_hidden_layers")
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--max-shard-bytes", type=int, default=5 * 10**9)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    try:
        path = _run(args)
    except SynthError as exc:  # a bad request: one line, not a traceback
        print(f"synth: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _run(args: argparse.Namespace) -> Path:
    overrides: dict[str, Any] = {}
    arch = args.arch
    if args.preset:
        parch, pov = PRESETS[args.preset]
        if arch is not None and arch != parch:
            raise SynthError(f"--preset {args.preset} is {parch}, not --arch {arch}")
        arch = parch
        overrides.update(copy.deepcopy(pov))
    if arch is None:
        raise SynthError("give --arch or --preset")
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SynthError(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = _parse_value(value)
    if args.layers is not None:
        overrides["num_hidden_layers"] = args.layers
    cfg = tiny_config(arch, **overrides)
    return write_checkpoint(args.out, cfg, seed=args.seed,
                            max_shard_bytes=args.max_shard_bytes,
                            progress=not args.no_progress)
