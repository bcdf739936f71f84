"""A tiny synthetic gpt-oss checkpoint, made through mlx-lm's own ``gpt_oss.Model``
(the fixture of the gpt-oss model work; no weights are downloaded).

The model is built from ``tiny_gptoss_config()`` (real gpt-oss's structure at toy sizes:
alternating sliding-window / full attention with a window shorter than the test
prompts, attention sinks, linear biases everywhere, yarn rope scaling, top-k then
softmax routing, the clamped SwiGLU), given seeded random weights at scales that keep
activations O(1), cast to bf16 and quantized with mlx-lm's ``quantize_model`` the way
mlx-community's ``gpt-oss-*-MXFP4-Q8`` uploads are: the experts in MXFP4 (group 32, U8
E8M0 scales, no biases), every other linear and the embedding affine 8-bit with
group 64 (the router too, as gpt_oss.Model.quant_predicate asks). It is saved by
mlx-lm's ``save_model`` / ``save_config`` (so names, shapes, dtypes and the
``quantization`` block are mlx-lm's), with the byte-level BPE tokenizer of
moeflux.prep.synth.

``write_gptoss_checkpoint`` also stores the oracle next to the weights in
``reference.npz``: mlx-lm float32 CPU logits of a prefill of ``PROMPT`` and of
``N_DECODE`` decode steps after it (mlx-lm's cached path: ``RotatingKVCache`` on the
sliding layers), so the model work can compare against them without rerunning mlx-lm.

Command line (from the repository root)::

    .venv/bin/python tests/gptoss_synth.py OUT_DIR [--seed N] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

# The test prompt (longer than the sliding window, so the window and the rotating cache
# matter) and the decode steps after it.
PROMPT_LEN = 21
N_DECODE = 32

# The default weights: the seed whose reference keeps every greedy choice clear (top
# two logits of each row more than 2e-3 of the largest logit apart, above the 1e-3
# acceptance tier; seeds 0-5 give 1e-3 to 2.4e-3 at these sizes).
DEFAULT_SEED = 2

# Exact rope scaling block of the released gpt-oss configs.
YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": False, "original_max_position_embeddings": 4096}


def tiny_gptoss_config(**overrides: Any) -> dict[str, Any]:
    """A gpt_oss config.json dict at toy sizes (keys as the released configs name
    them); ``overrides`` replace keys. Sizes are multiples of 64 so that every linear
    quantizes (mlx-lm leaves a linear whose input is not a multiple of the group size
    in float)."""
    cfg: dict[str, Any] = {
        "model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"],
        "num_hidden_layers": 4, "num_local_experts": 8, "num_experts_per_tok": 2,
        "experts_per_token": 2, "vocab_size": 320, "rms_norm_eps": 1e-5,
        "hidden_size": 64, "intermediate_size": 64, "head_dim": 16,
        "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 8,
        "rope_theta": 150000, "rope_scaling": copy.deepcopy(YARN),
        "max_position_embeddings": 131072, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "hidden_act": "silu",
        "layer_types": ["sliding_attention", "full_attention"] * 2,
    }
    cfg.update(overrides)
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        n = int(cfg["num_hidden_layers"])
        cfg["layer_types"] = (["sliding_attention", "full_attention"] * n)[:n]
    return cfg


# Standard deviations of the random weights, relative to 1/sqrt(fan_in) for matrices.
GAINS = {"embed_tokens": 1.0, "lm_head": 2.0, "router": 3.0, "o_proj": 0.5,
         "down_proj": 0.5}


def _random_value(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """The random initial value of parameter ``name``."""
    leaf = name.split(".")[-1]
    if leaf == "sinks":
        return rng.normal(0.0, 1.0, shape)           # O(1) logits, as trained ones are
    if leaf == "bias":
        return rng.normal(0.0, 0.1, shape)
    if "norm" in name:
        return 1.0 + rng.normal(0.0, 0.1, shape)
    gain = next((g for k, g in GAINS.items() if k in name), 1.0)
    fan_in = shape[-1] if "embed_tokens" not in name else 1
    return rng.normal(0.0, gain / np.sqrt(fan_in), shape)


def _quant_predicate(path: str, module: Any) -> Any:
    """MXFP4 for the experts, 8-bit affine (group 64) for everything else."""
    if ".mlp.experts." in path:
        return {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    return {"group_size": 64, "bits": 8, "mode": "affine"}


def build_model(cfg: dict[str, Any], seed: int) -> Any:
    """mlx-lm's gpt_oss.Model for ``cfg`` with seeded random weights, in bf16."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import gpt_oss

    model = gpt_oss.Model(gpt_oss.ModelArgs.from_dict(cfg))
    rng = np.random.default_rng(seed)
    params = []
    for name, value in sorted(tree_flatten(model.parameters())):
        v = _random_value(name, tuple(value.shape), rng).astype(np.float32)
        params.append((name, mx.array(v)))
    model.update(tree_unflatten(params))
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    return model


def _tokenizer_config() -> dict[str, Any]:
    from moeflux.prep.synth import SPECIAL_TOKENS

    return {"tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[2],
            "pad_token": SPECIAL_TOKENS[0], "unk_token": None,
            "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": 131072}


def prompt_tokens(cfg: dict[str, Any], seed: int = 1) -> list[int]:
    """The test prompt: PROMPT_LEN token ids, deterministic."""
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(0, int(cfg["vocab_size"]), PROMPT_LEN)]


def reference_run(ckpt: Path, prompt: list[int], n_decode: int) -> dict[str, np.ndarray]:
    """mlx-lm float32 CPU logits of ``ckpt``: ``prefill`` [L, V] of the prompt without a
    cache, and ``decode`` [n_decode + 1, V]: the prompt's last position through
    make_prompt_cache, then each greedy (argmax) token fed alone; ``tokens`` the greedy
    continuation."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    mx.set_default_device(mx.cpu)
    model, _ = load_model(ckpt, strict=True)
    model.set_dtype(mx.float32)
    prefill = model(mx.array([prompt], dtype=mx.int32))[0].astype(mx.float32)
    cache = make_prompt_cache(model)
    rows = [model(mx.array([prompt], dtype=mx.int32), cache=cache)[0, -1]]
    tokens = []
    for _ in range(n_decode):
        tokens.append(int(mx.argmax(rows[-1]).item()))
        rows.append(model(mx.array([[tokens[-1]]], dtype=mx.int32), cache=cache)[0, -1])
    decode = mx.stack(rows).astype(mx.float32)
    mx.eval(prefill, decode)
    return {"prompt": np.array(prompt, np.int32), "prefill": np.array(prefill),
            "decode": np.array(decode), "tokens": np.array(tokens, np.int32)}


def write_gptoss_checkpoint(out_dir: str | os.PathLike, *, seed: int = DEFAULT_SEED,
                            **overrides: Any) -> Path:
    """Write the tiny gpt-oss checkpoint (tiny_gptoss_config(**overrides), weights from
    ``seed``) and its reference.npz into ``out_dir`` (replaced); returns the path.
    config.json is written last but for reference.npz, which marks a complete
    directory."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    from moeflux.prep.synth import build_tokenizer_json

    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = tiny_gptoss_config(**overrides)
    model = build_model(cfg, seed)
    model, qcfg = quantize_model(model, copy.deepcopy(cfg), group_size=64, bits=8,
                                 mode="affine", quant_predicate=_quant_predicate)
    save_model(out, model)
    (out / "tokenizer.json").write_text(
        json.dumps(build_tokenizer_json(int(cfg["vocab_size"])), ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2))
    save_config(qcfg, out / "config.json")
    ref = reference_run(out, prompt_tokens(cfg), N_DECODE)
    np.savez(out / "reference.npz", **ref)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, VALUE as JSON (e.g. sliding_window=4)")
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    path = write_gptoss_checkpoint(args.out, seed=args.seed, **overrides)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
