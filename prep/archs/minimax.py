"""Prep rules of minimax (MiniMax-M2, mlx-lm minimax): routed experts on every layer,
stacked under ``block_sparse_moe.switch_mlp`` (mlx-lm's sanitize joins Hugging Face's
per-expert w1 / w3 / w2 into gate_proj / up_proj / down_proj), the expert count in
num_local_experts and their width in intermediate_size. Hugging Face's MiniMax-M2
configs say model_type minimax_m2, which mlx-lm runs as minimax."""
from moeflux.prep.archs import Family, all_layers

FAMILY = Family("minimax", moe_layers=all_layers, experts_key="num_local_experts",
                expert_ff_key="intermediate_size", ffn_module="block_sparse_moe",
                aliases=("minimax_m2",))
