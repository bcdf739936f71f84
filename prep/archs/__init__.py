"""Per-family prep rules, one module per model_type (``prep/archs/<model_type>.py``).

Each module defines ``FAMILY``, a :class:`Family`: the facts of its checkpoints prep
relies on (which layers carry routed experts by mlx-lm's rule, whether layers
numbered past ``num_hidden_layers`` are dropped as mlx-lm's ``sanitize`` drops them,
the expert projections). Modules are found by name, so adding a family adds a file
here and touches nothing else in prep.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Family", "all_layers", "families", "family"]


@dataclass(frozen=True)
class Family:
    """The prep rules of one architecture family.

    ``moe_layers(text, n_layers, n_experts)`` gives the indices of the layers whose
    FFN is routed experts (mlx-lm's rule), from the LM config keys ``text`` (the
    nested text_config when there is one). ``experts_key`` names the expert count,
    ``expert_ff_key`` the experts' width. ``drops_extra_layers``: tensors of layers >=
    num_hidden_layers (multi-token prediction layers) are skipped rather than refused.
    ``ffn_module``: a decoder layer's FFN module (``mlp``; minimax:
    ``block_sparse_moe``). ``expert_module``: the module of the stacked experts under
    it (mlx-lm's SwitchGLU attribute name). ``expert_modes``: the quantization modes its
    experts may use (the rest of the model is affine or float whatever the family).
    ``aliases``: other config model_types mlx-lm runs as this family (its
    MODEL_REMAPPING, e.g. minimax_m2).
    """

    model_type: str
    moe_layers: Callable[[dict[str, Any], int, int], list[int]]
    experts_key: str = "num_experts"
    drops_extra_layers: bool = False
    expert_projections: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    expert_ff_key: str = "moe_intermediate_size"
    ffn_module: str = "mlp"
    expert_module: str = "switch_mlp"
    expert_modes: tuple[str, ...] = ("affine",)
    aliases: tuple[str, ...] = ()


def _cfg_int(text: dict[str, Any], key: str, default: int) -> int:
    v = text.get(key)
    return default if v is None else int(v)


def sparse_step_layers(text: dict[str, Any], n_layers: int, n_experts: int) -> list[int]:
    """Qwen rule: every decoder_sparse_step-th layer, minus mlp_only_layers."""
    if n_experts <= 0:
        return []
    step = _cfg_int(text, "decoder_sparse_step", 1)
    dense = set(text.get("mlp_only_layers") or [])
    return [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]


def first_dense_layers(text: dict[str, Any], n_layers: int, n_experts: int,
                       freq_key: str | None = None) -> list[int]:
    """DeepSeek/GLM rule: from first_k_dense_replace on (every moe_layer_freq-th)."""
    if n_experts <= 0:
        return []
    first = _cfg_int(text, "first_k_dense_replace", 0)
    freq = _cfg_int(text, freq_key, 1) if freq_key else 1
    return [i for i in range(n_layers) if i >= first and i % freq == 0]


def all_layers(text: dict[str, Any], n_layers: int, n_experts: int) -> list[int]:
    """gpt-oss / minimax rule: every layer's FFN is routed experts."""
    return list(range(n_layers)) if n_experts > 0 else []


def families() -> dict[str, Family]:
    """Every family module of this package, by model_type."""
    out: dict[str, Family] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        fam = importlib.import_module(f"{__name__}.{info.name}").FAMILY
        out[fam.model_type] = fam
    return out


def family(model_type: str) -> Family | None:
    """The family of ``model_type`` (or of one of its aliases), or None when prep has
    no rules for it."""
    for fam in families().values():
        if model_type == fam.model_type or model_type in fam.aliases:
            return fam
    return None
