"""Prep rules of glm4_moe (GLM-4.5 / GLM-4.6 MoE): experts from first_k_dense_replace
on; the multi-token-prediction layer numbered num_hidden_layers is dropped, as mlx-lm's
sanitize drops it."""
from moeflux.prep.archs import Family, first_dense_layers

FAMILY = Family("glm4_moe", moe_layers=first_dense_layers,
                experts_key="n_routed_experts", drops_extra_layers=True)
