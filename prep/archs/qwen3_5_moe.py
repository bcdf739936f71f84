"""Prep rules of qwen3_5_moe (Qwen3.5 / Qwen3.6 MoE): routed experts on every layer."""
from moeflux.prep.archs import Family

FAMILY = Family("qwen3_5_moe",
                moe_layers=lambda text, n, ne: list(range(n)) if ne > 0 else [])
