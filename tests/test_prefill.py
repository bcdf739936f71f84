"""Prefill groups (csrc/models/decoder.c): a prompt longer than the 64-token chunk runs
layer-major over groups of up to 512 tokens, the MoE of each layer once per group, so
each routed expert is read once per group instead of once per chunk. The oracle for
the logits is mlx-lm (float32, CPU) through tests/reference.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import moeflux
from _helpers import assert_close, continuation, converted
from reference import reference_decode, reference_logits

__all__ = ["converted"]  # the fixture is used by name

GROUP = 512   # MF_PREFILL_GROUP_TOK


def test_each_expert_read_once_per_group(converted: Callable[..., tuple[Path, Path]]
                                         ) -> None:
    """150 tokens (3 chunks, one group): each (layer, expert) read at most once; 600
    tokens (two groups): at most twice. Chunk by chunk this read up to 3x / 10x."""
    _, model_dir = converted("qwen3_5_moe", num_experts=16, num_experts_per_tok=4)
    cfg = json.loads((model_dir / "config.json").read_text())["text_config"]
    n_moe, E, k = cfg["num_hidden_layers"], cfg["num_experts"], cfg["num_experts_per_tok"]
    with moeflux.Model(model_dir, threads=2, n_ctx=1024) as m:
        m.eval(continuation(512, 150, seed=30))
        st = m.stats()
        assert n_moe * E // 2 <= st["expert_reads"] <= n_moe * E, st
        # 600 picks of 16 experts per layer: after each MoE layer but the last, the
        # next layer's first 2k experts are read ahead, and the next layer uses them
        assert st["prefetch_issued"] == st["prefetch_hits"] == (n_moe - 1) * 2 * k, st
        m.reset()
        m.stats_reset()
        m.eval(continuation(512, GROUP + 88, seed=31))
        assert m.stats()["expert_reads"] <= 2 * n_moe * E, m.stats()


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_moe", "deepseek_v3"])
def test_two_groups_match_reference(arch: str,
                                    converted: Callable[..., tuple[Path, Path]]) -> None:
    """A prompt of a group and a partial chunk more (600 tokens: groups of 512 and 88,
    the second starting mid-sequence) matches mlx-lm at every position, and decoding
    after it continues exactly."""
    ckpt, model_dir = converted(arch)
    prompt = continuation(512, GROUP + 88, seed=32)
    with moeflux.Model(model_dir, threads=2, n_ctx=1024) as m:
        ours = m.eval(prompt, all_logits=True)
        assert_close(ours, reference_logits(ckpt, prompt), f"{len(prompt)}-token prefill")
        last = m.eval([7])
    ref = reference_decode(ckpt, prompt, [7])
    assert_close(np.stack([last]), ref[1:], "decode after the groups")
