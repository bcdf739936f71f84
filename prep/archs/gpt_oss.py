"""Prep rules of gpt_oss (mlx-lm gpt_oss, mlx-community's MXFP4-Q8 uploads): routed
experts on every layer, stacked under ``mlp.experts`` (gate_proj / up_proj / down_proj
already split by mlx-lm's sanitize) in MXFP4 with per-expert ``.bias``, the expert
count in num_local_experts and their width in intermediate_size."""
from moeflux.prep.archs import Family, all_layers

FAMILY = Family("gpt_oss", moe_layers=all_layers, experts_key="num_local_experts",
                expert_ff_key="intermediate_size", expert_module="experts",
                expert_modes=("affine", "mxfp4"))
