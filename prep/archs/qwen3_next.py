"""Prep rules of qwen3_next: the Qwen sparse-step rule."""
from moeflux.prep.archs import Family, sparse_step_layers

FAMILY = Family("qwen3_next", moe_layers=sparse_step_layers)
