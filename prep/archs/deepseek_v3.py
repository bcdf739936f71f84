"""Prep rules of deepseek_v3: experts from first_k_dense_replace on, every
moe_layer_freq-th layer; the MTP layers past num_hidden_layers are dropped."""
from moeflux.prep.archs import Family, first_dense_layers

FAMILY = Family("deepseek_v3",
                moe_layers=lambda text, n, ne: first_dense_layers(text, n, ne,
                                                                  "moe_layer_freq"),
                experts_key="n_routed_experts", drops_extra_layers=True)
