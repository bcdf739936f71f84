"""The forward pass at the real sizes of each family, against mlx-lm in float32.

Every other forward test runs at hidden size 256 with at most 16 experts; bugs that only
show at real sizes (more rows than a task block, more groups per row than a scratch
chunk, 256-512 experts in the router and its groups, head_dim 256, 128 MLA heads, GDN
with 64 value heads) would pass them. Here one or two decoder layers of each family
have the real per-layer shapes (model-math §2.1, §3.1, §4):

- Qwen3.6-35B-A3B (qwen3_5_moe): hidden 2048, 256 experts (8 active, I 512, shared
  512), attention 16/2 heads of 256 with the output gate, GDN 16/32 heads of 128;
  two layers, GatedDeltaNet then gated attention (full_attention_interval 2).
- Qwen3.5-397B-A17B (qwen3_5_moe): hidden 4096, 512 experts (10 active, I 1024, shared
  1024), attention 32/2 heads of 256, GDN 16/64 heads of 128; two layers as above
  (2.0 GB of experts each at 2 bits; one layer alone cannot be built: mlx-lm's
  Qwen3.5 model looks for its first full-attention layer at full_attention_interval-1).
- DeepSeek-V3 (deepseek_v3): hidden 7168, 128 heads, q_lora 1536, kv_lora 512,
  qk_rope 64, qk_nope 128, v_head 128, 256 experts (8 active, I 2048, one shared),
  n_group 8 / topk_group 4; one MoE layer (first_k_dense_replace 0): 3.5 GB of experts
  at 2 bits.
- Qwen3-30B-A3B (qwen3_moe): hidden 2048, 32/4 heads of 128, 128 experts (8 active, I
  768); two layers.

The vocabulary is reduced to 8192 everywhere (the real 129-248k only widen the embedding
and the head, which the tests at every width already cover). Weights are 4-bit, group
64, with the 8-bit router overrides of the Qwen conversions; the two largest cases
(397B, DeepSeek-V3) take their routed experts at 2 bits (a per-module override, the
shape of mlx-community's 2-bit-expert recipes), which keeps each of them under 4.5
GB on disk while every matrix keeps its real shape (the 4-bit kernels meet the real
expert shapes in the 35B and 30B cases). Written by the synth generator in the
mlx-community layout (tests/test_synth.py proves it equal to what mlx-lm's own
classes + quantize_model produce) and converted by moeflux.prep.convert. Each case: a
12-token prompt (every position's logits) and 16 decode steps, in both tiers (the
acceptance bar RTOL and the CPU backend's regression tier RTOL_CPU).

The converted models and mlx-lm's logits are cached under .cache/real_shapes/ (git
ignored; $MOEFLUX_REAL_SHAPES_CACHE elsewhere), keyed by a hash of the configuration,
of the generator's and converter's sources and of mlx / mlx-lm's versions, so a change
to any of them rebuilds what depends on it (the checkpoint is generated again only
then, and deleted once both exist); older builds of a case are deleted when it is
rebuilt. Disk: a case needs its checkpoint and its converted model at once while it is
built (at most 8.7 GB, the 397B case); the converted models (10 GB together) stay cached
only while at least KEEP_FREE bytes stay free besides, else each goes after its test.
A disk that cannot hold one case's build skips that case, saying how much it needs.
Memory: mlx-lm holds one case at a time, released before moeflux runs. First run
about 10 minutes on 2 cores, later runs under a minute.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _helpers import assert_close, continuation
from reference import forget_reference, reference_decode, reference_logits

REPO = Path(__file__).resolve().parent.parent
VOCAB = 8192
PROMPT = [1, 5, 77, 300, 12, 9, 4011, 42, 8, 1000, 2500, 8190]
N_DECODE = 16
# Free bytes that must remain after a converted model is kept for the next run: room
# to build the largest case (checkpoint + converted model) with a margin.
KEEP_FREE = 16 << 30

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen36-35b-a3b": ("qwen3_5_moe", {
        "hidden_size": 2048, "num_hidden_layers": 2, "full_attention_interval": 2,
        "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
        "linear_num_key_heads": 16, "linear_num_value_heads": 32,
        "linear_key_head_dim": 128, "linear_value_head_dim": 128, "num_experts": 256,
        "num_experts_per_tok": 8, "moe_intermediate_size": 512,
        "shared_expert_intermediate_size": 512, "vocab_size": VOCAB,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0,
                            "partial_rotary_factor": 0.25,
                            "mrope_section": [11, 11, 10], "mrope_interleaved": True},
    }),
    "qwen35-397b-a17b": ("qwen3_5_moe", {
        "hidden_size": 4096, "num_hidden_layers": 2, "full_attention_interval": 2,
        "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 256,
        "linear_num_key_heads": 16, "linear_num_value_heads": 64,
        "linear_key_head_dim": 128, "linear_value_head_dim": 128, "num_experts": 512,
        "num_experts_per_tok": 10, "moe_intermediate_size": 1024,
        "shared_expert_intermediate_size": 1024, "vocab_size": VOCAB,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0,
                            "partial_rotary_factor": 0.25,
                            "mrope_section": [11, 11, 10], "mrope_interleaved": True},
    }),
    "deepseek-v3": ("deepseek_v3", {
        "hidden_size": 7168, "num_hidden_layers": 1, "first_k_dense_replace": 0,
        "intermediate_size": 18432, "num_attention_heads": 128,
        "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
        "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
        "n_routed_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 2048,
        "n_shared_experts": 1, "n_group": 8, "topk_group": 4, "vocab_size": VOCAB,
    }),
    "qwen3-30b-a3b": ("qwen3_moe", {
        "hidden_size": 2048, "num_hidden_layers": 2, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "moe_intermediate_size": 768, "intermediate_size": 6144,
        "vocab_size": VOCAB,
    }),
}


# Routed-expert bits of the cases whose experts are not at the default 4 bits, and
# the prefix of their module paths.
EXPERT_BITS: dict[str, tuple[int, str]] = {
    "qwen35-397b-a17b": (2, "language_model.model"),
    "deepseek-v3": (2, "model"),
}


def case_config(name: str) -> dict[str, Any]:
    """The config.json dict of case ``name``, its expert overrides included."""
    from moeflux.prep.synth import tiny_config

    arch, overrides = CASES[name]
    cfg = tiny_config(arch, **overrides)
    if name in EXPERT_BITS:
        bits, prefix = EXPERT_BITS[name]
        t = cfg.get("text_config", cfg)
        for il in range(int(t["num_hidden_layers"])):
            for c in ("gate_proj", "up_proj", "down_proj"):
                entry = {"group_size": 64, "bits": bits}
                for key in ("quantization", "quantization_config"):
                    cfg[key][f"{prefix}.layers.{il}.mlp.switch_mlp.{c}"] = entry
    return cfg


def _cache_root() -> Path:
    env = os.environ.get("MOEFLUX_REAL_SHAPES_CACHE")
    return Path(env) if env else REPO / ".cache" / "real_shapes"


def _sources_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _build(dest: Path, make: Any) -> Path:
    """dest, built by make(tmp) into a temporary sibling and renamed when complete;
    other builds of the same case (older keys) are deleted first."""
    if dest.exists():
        return dest
    case = dest.name.rsplit("-", 1)[0]
    for old in dest.parent.glob(f"{case}-*"):
        shutil.rmtree(old, ignore_errors=True)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    make(tmp)
    os.replace(tmp, dest)
    return dest


def _oracle(ckpt: Path, cont: list[int]) -> dict[str, np.ndarray]:
    """mlx-lm's prompt logits and decode rows, with its model released afterwards
    (the largest case holds ~8.5 GB)."""
    import mlx.core as mx

    try:
        return {"prompt": reference_logits(ckpt, PROMPT),
                "decode": reference_decode(ckpt, PROMPT, cont)[1:]}
    finally:
        forget_reference(ckpt)
        gc.collect()
        mx.clear_cache()


def _save_npz(dest: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = dest.with_name(dest.name + ".partial.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, dest)


def _require_disk(root: Path, cfg: dict[str, Any], need_model: bool) -> None:
    """Skips the case when the disk cannot hold its checkpoint and (if it is to be
    built) its converted model, which is about as large."""
    from moeflux.prep.synth import checkpoint_bytes

    need = checkpoint_bytes(cfg) * (2 if need_model else 1) + (256 << 20)
    free = shutil.disk_usage(root).free
    if free < need:
        pytest.skip(f"{root}: building this case needs {need / 1e9:.1f} GB of disk, "
                    f"{free / 1e9:.1f} GB free")


def real_case(name: str, cont: list[int]) -> tuple[Path, dict[str, np.ndarray]]:
    """(converted moeflux model dir, mlx-lm's logits {"prompt", "decode"}) of case
    ``name``, built once. The checkpoint is generated (deterministically) only when
    one of the two is missing, and deleted once both exist: the cache then holds the
    converted model and mlx-lm's logits (keyed by mlx and mlx-lm's versions too)."""
    import mlx.core as mx
    import mlx_lm

    from moeflux.prep.convert import convert
    from moeflux.prep.synth import write_checkpoint

    cfg = case_config(name)
    prep = REPO / "prep"
    gen = _sources_hash([prep / "synth.py", prep / "safetensors_io.py"])
    key = hashlib.sha256(json.dumps([cfg, gen], sort_keys=True).encode()).hexdigest()[:16]
    conv = _sources_hash(list(prep.glob("*.py")))[:16]
    ref = hashlib.sha256(json.dumps([mx.__version__, mlx_lm.__version__, PROMPT, cont])
                         .encode()).hexdigest()[:16]
    root = _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    model = root / f"{name}-model-{key}{conv}"
    oracle = root / f"{name}-oracle-{key}{ref}.npz"
    ckpt = root / f"{name}-ckpt-{key}"
    if not (model.exists() and oracle.exists()):
        _require_disk(root, cfg, need_model=not model.exists())
        _build(ckpt, lambda d: write_checkpoint(d, cfg, seed=0))
        _build(model, lambda d: convert(ckpt, d, progress=False))
        if not oracle.exists():
            for old in root.glob(f"{name}-oracle-*"):
                old.unlink()
            _save_npz(oracle, _oracle(ckpt, cont))
    shutil.rmtree(ckpt, ignore_errors=True)
    with np.load(oracle) as z:
        return model, {k: z[k] for k in z.files}


@pytest.mark.parametrize("name", list(CASES))
def test_real_shapes(name: str) -> None:
    """12-token prompt (every position) and 16 decode steps at the real sizes of one
    family, against mlx-lm, in both tiers."""
    import moeflux

    cont = continuation(VOCAB, N_DECODE, seed=17)
    model_dir, ref = real_case(name, cont)
    try:
        with moeflux.Model(model_dir, threads=2) as m:
            assert m.arch == CASES[name][0]
            ours = m.eval(PROMPT, all_logits=True)
            rows = np.stack([m.eval([t]) for t in cont])
    finally:
        if shutil.disk_usage(model_dir).free < KEEP_FREE:
            shutil.rmtree(model_dir, ignore_errors=True)   # the next case needs room
    for tier in ("acceptance", "cpu"):   # RTOL, then RTOL_CPU
        assert_close(ours, ref["prompt"], f"{name} prefill", backend=tier)
        assert_close(rows, ref["decode"], f"{name} decode", backend=tier)
