"""The hybrid forward pass (qwen3_5_moe and qwen3_next) against mlx-lm in float32.

Each case is a synthetic mlx-community checkpoint (conftest ``synth_checkpoint``)
converted by ``moeflux.prep.convert`` and opened with ``moeflux.Model``. The oracle is
``tests/reference.py`` (mlx-lm's own forward). Acceptance, per position: max |ours -
ref| <= 1e-3 * max |ref| and the same argmax.

The cases cover what changes the code path: 8-bit vs 4-bit routers and shared-expert
gates, group sizes 32/64/128, other code widths, k = 1 and k = num_experts, tied
embeddings, several full_attention_interval values, qwen3_next dense layers via
mlp_only_layers and decoder_sparse_step, and top-k weights without renormalisation.
"""
from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import moeflux
from moeflux.prep.convert import convert
from _helpers import FWD_PROMPT as PROMPT
from _helpers import RTOL_CPU
from _helpers import (assert_close, check_failed_eval_recovers, check_long_prompt,
                      check_prefill_and_decode, check_reset_equals_fresh, continuation,
                      converted, eval_in_pieces)
from reference import reference_decode, reference_logits

__all__ = ["converted"]  # the fixture is used by name

# (id, arch, tiny_config overrides)
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("q35-base", "qwen3_5_moe", {}),
    ("q35-gs32-4bit-router", "qwen3_5_moe", {"group_size": 32, "gate_bits": None}),
    ("q35-gs128-k1-tied", "qwen3_5_moe",
     {"group_size": 128, "num_experts_per_tok": 1, "tie_word_embeddings": True,
      "moe_intermediate_size": 128, "shared_expert_intermediate_size": 128}),
    ("q35-kall-interval2-8bit", "qwen3_5_moe",
     {"num_experts_per_tok": 8, "full_attention_interval": 2, "bits": 8}),
    ("q35-interval3-5layers", "qwen3_5_moe",
     {"num_hidden_layers": 5, "full_attention_interval": 3, "num_experts": 16,
      "num_experts_per_tok": 4}),
    ("next-base", "qwen3_next", {}),
    ("next-mlp-only-no-renorm", "qwen3_next",
     {"mlp_only_layers": [1, 3], "norm_topk_prob": False}),
    ("next-sparse-step2-interval2", "qwen3_next",
     {"decoder_sparse_step": 2, "full_attention_interval": 2}),
    ("next-gs32-tied-k1", "qwen3_next",
     {"group_size": 32, "tie_word_embeddings": True, "num_experts_per_tok": 1,
      "linear_num_value_heads": 8}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_prefill_and_decode(case: tuple[str, str, dict[str, Any]],
                            converted: Callable[..., tuple[Path, Path]]) -> None:
    """All-position prefill logits, then 32 single-token decode steps."""
    _, arch, overrides = case
    ckpt, model_dir = converted(arch, **overrides)
    check_prefill_and_decode(model_dir, arch, lambda t: reference_logits(ckpt, t),
                             lambda p, c: reference_decode(ckpt, p, c))


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_next"])
@pytest.mark.parametrize("cuts", [[1], [3, 7], [5, 6, 11]], ids=str)
def test_chunked_prompt_equals_one_shot(arch: str, cuts: list[int],
                                        converted: Callable[..., tuple[Path, Path]]
                                        ) -> None:
    """The prompt fed in pieces gives every position's logits of the one-shot run
    (and of the reference): conv history, delta-rule state and KV carry over."""
    ckpt, model_dir = converted(arch)
    ref = reference_logits(ckpt, PROMPT)
    with moeflux.Model(model_dir, threads=2) as m:
        whole = m.eval(PROMPT, all_logits=True)
        m.reset()
        pieces = eval_in_pieces(m, PROMPT, cuts)
    assert_close(pieces, ref, f"chunked at {cuts}")
    # Not bitwise: these cuts change the token counts the matmuls see, and with them
    # the kernel and the order of the sums (test_determinism.py has the cuts that are).
    np.testing.assert_allclose(pieces, whole, rtol=0,
                               atol=RTOL_CPU * np.abs(ref).max())


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_next"])
def test_long_prompt_crosses_internal_chunks(arch: str,
                                             converted: Callable[..., tuple[Path, Path]]
                                             ) -> None:
    """A prompt longer than the forward's 64-token scratch runs in internal chunks;
    every position must still match, and so must decoding after it."""
    check_long_prompt(*converted(arch))


def test_expert_reads_once_per_chunk(converted: Callable[..., tuple[Path, Path]]) -> None:
    """Prefill groups tokens by expert: each (layer, expert) is read at most once per
    64-token chunk, not once per token; decode reads exactly k experts per layer."""
    _, model_dir = converted("qwen3_5_moe", num_experts=16, num_experts_per_tok=4)
    cfg = json.loads((model_dir / "config.json").read_text())["text_config"]
    n_layer, E, k = cfg["num_hidden_layers"], cfg["num_experts"], \
        cfg["num_experts_per_tok"]
    layout = json.loads((model_dir / "packed_experts" / "layout.json").read_text())
    with moeflux.Model(model_dir, threads=2) as m:
        m.eval(continuation(512, 64, seed=17))
        st = m.stats()
        # 64 tokens x 4 experts x 4 layers = 1024 token-expert pairs, 64 blobs at most
        assert n_layer * k <= st["expert_reads"] <= n_layer * E, st
        assert st["expert_bytes_read"] == st["expert_reads"] * layout["expert_size"]
        m.stats_reset()
        m.eval(continuation(512, 150, seed=18))   # chunks of 64, 64, 22
        assert m.stats()["expert_reads"] <= 3 * n_layer * E
        m.stats_reset()
        for t in continuation(512, 5, seed=19):
            m.eval([t])
        assert m.stats()["expert_reads"] == 5 * n_layer * k


def test_two_sequences_share_one_model(converted: Callable[..., tuple[Path, Path]]
                                       ) -> None:
    """Two contexts over one loaded model, decoding different sequences on two
    threads at once: each matches its own reference (no shared mutable state)."""
    from concurrent.futures import ThreadPoolExecutor

    ckpt, model_dir = converted("qwen3_next")
    prompts = [PROMPT, continuation(512, 10, seed=20)]
    conts = [continuation(512, 8, seed=21), continuation(512, 8, seed=22)]
    with moeflux.Model(model_dir, threads=1) as a:
        b = moeflux.Model.share(a, threads=1)

        def run(i: int) -> np.ndarray:
            m = (a, b)[i]
            m.eval(prompts[i])
            return np.stack([m.eval([t]) for t in conts[i]])

        with ThreadPoolExecutor(2) as pool:
            outs = list(pool.map(run, [0, 1]))
        b.close()
    for i in range(2):
        ref = reference_decode(ckpt, prompts[i], conts[i])
        assert_close(outs[i], ref[1:], f"sequence {i}")


def test_reset_equals_fresh(converted: Callable[..., tuple[Path, Path]]) -> None:
    """After reset the sequence behaves as a fresh one (all state zeroed)."""
    check_reset_equals_fresh(*converted("qwen3_5_moe"))


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_next"])
def test_failed_eval_leaves_state_unchanged(arch: str, tmp_path: Path,
                                            converted: Callable[..., tuple[Path, Path]]
                                            ) -> None:
    """An expert read failing mid-eval (file truncated after open) raises, leaves the
    position and the linear-attention state as they were, and decoding continues
    exactly once the file is whole again."""
    check_failed_eval_recovers(*converted(arch), tmp_path)


class _Interrupt(Exception):
    """Raised by the test's SIGALRM handler inside a running eval."""


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_next"])
def test_aborted_eval_leaves_state_unchanged(arch: str,
                                             converted: Callable[..., tuple[Path, Path]]
                                             ) -> None:
    """A signal during a long, internally chunked eval stops it between layers (the
    abort callback runs Python's handlers); the sequence is as before the call and
    decoding continues exactly."""
    ckpt, model_dir = converted(arch)
    cont = continuation(512, 3, seed=15)
    ref = reference_decode(ckpt, PROMPT, cont)

    def handler(signum: int, frame: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        raise _Interrupt()

    old = signal.signal(signal.SIGALRM, handler)
    try:
        with moeflux.Model(model_dir, threads=2) as m:
            m.eval(PROMPT)
            for _ in range(5):   # until the signal lands inside the C eval
                spent = m.stats()["compute_s"]
                signal.setitimer(signal.ITIMER_REAL, 0.003, 0.001)
                with pytest.raises(_Interrupt):
                    m.eval(continuation(512, 256, seed=16))
                signal.setitimer(signal.ITIMER_REAL, 0)
                assert m.n_past == len(PROMPT)
                if m.stats()["compute_s"] > spent:
                    break
            else:
                pytest.fail("the signal never arrived during an eval")
            rows = [m.eval([t]) for t in cont]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert_close(np.stack(rows), ref[1:], "decode after an aborted eval")


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_next"])
def test_snapshot_load_continues_exactly(arch: str,
                                         converted: Callable[..., tuple[Path, Path]]
                                         ) -> None:
    """The state segments hold everything the forward reads from the past: a
    snapshot taken after the prompt, loaded into a ctx that has since run other
    tokens, continues bit for bit, and matches the reference."""
    ckpt, model_dir = converted(arch)
    cont = continuation(512, 4, seed=13)
    with moeflux.Model(model_dir, threads=2) as m:
        m.eval(PROMPT)
        snap = m.save_state()
        first = np.stack([m.eval([t]) for t in cont])
        m.reset()
        m.eval(continuation(512, 9, seed=14))
        m.load_state(snap)
        assert m.n_past == len(PROMPT)
        again = np.stack([m.eval([t]) for t in cont])
    np.testing.assert_array_equal(again, first)
    assert_close(again, reference_decode(ckpt, PROMPT, cont)[1:], "after load_state")


def _expert_arrays(path: Path, layout: dict) -> dict[str, np.ndarray]:
    """The components of every expert of one packed layer file, stacked [E, ...]
    (BF16 widened to float32)."""
    raw = np.fromfile(path, np.uint8).reshape(layout["num_experts"], layout["expert_size"])
    out = {}
    for c in layout["components"]:
        part = np.ascontiguousarray(raw[:, c["offset"]:c["offset"] + c["size"]])
        if c["dtype"] == "U32":
            arr = part.view(np.uint32)
        else:
            assert c["dtype"] == "BF16", c
            arr = (part.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        out[c["name"]] = arr.reshape(layout["num_experts"], *c["shape"])
    return out


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_next"])
def test_2bit_experts_match_mlx_with_the_same_codes(arch: str, tmp_path: Path,
                                                    synth_checkpoint: Callable[..., Path]
                                                    ) -> None:
    """packed_experts_2bit (prep's requantization): the oracle is mlx-lm with its
    switch_mlp replaced by 2-bit QuantizedSwitchLinear weights holding exactly the
    codes/scales/biases of the 2-bit files, so bits inferred from the expert layout
    and the 2-bit matmul path are checked end to end."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    ckpt = synth_checkpoint(arch)
    model_dir = convert(ckpt, tmp_path / "model2", expert_bits=2, progress=False)
    layout = json.loads((model_dir / "packed_experts_2bit" / "layout.json").read_text())
    assert layout["bits"] == 2
    ref_model, _ = load_model(ckpt, strict=True)
    ref_model.set_dtype(mx.float32)
    layers = ref_model.layers
    for il in layout["moe_layers"]:
        arrays = _expert_arrays(model_dir / "packed_experts_2bit" / f"layer_{il:02d}.bin",
                                layout)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(layers[il].mlp.switch_mlp, proj)
            lin.weight = mx.array(arrays[f"{proj}.weight"])
            lin.scales = mx.array(arrays[f"{proj}.scales"])
            lin.biases = mx.array(arrays[f"{proj}.biases"])
            lin.bits = 2
            lin.group_size = layout["group_size"]
    ref = np.array(ref_model(mx.array([PROMPT], dtype=mx.int32))[0])
    handle = moeflux._core.ModelHandle(str(model_dir), use_2bit=1)
    with moeflux.Model(handle, threads=2) as m:
        ours = m.eval(PROMPT, all_logits=True)
    assert_close(ours, ref, "2-bit experts")


def test_raw_hf_conv_layout_refused(tmp_path: Path,
                                    converted: Callable[..., tuple[Path, Path]]) -> None:
    """A conv1d weight in raw HF layout [C, 1, K] means the checkpoint skipped mlx-lm's
    sanitize (norms without +1): loading must refuse it with a clear message."""
    _, src_dir = converted("qwen3_5_moe")
    model_dir = tmp_path / "model"
    shutil.copytree(src_dir, model_dir)
    man_path = model_dir / "model_weights.json"
    man = json.loads(man_path.read_text())
    name = "model.layers.0.linear_attn.conv1d.weight"
    c, k, one = man["tensors"][name]["shape"]
    assert one == 1
    man["tensors"][name]["shape"] = [c, 1, k]
    man_path.write_text(json.dumps(man))
    with pytest.raises(moeflux.FormatError, match="Hugging Face"):
        moeflux.Model(model_dir, threads=1)


@pytest.mark.parametrize("arch,key", [("qwen3_5_moe", "rope_parameters"),
                                      ("qwen3_next", "rope_scaling")])
def test_rope_scaling_refused(arch: str, key: str, tmp_path: Path,
                              converted: Callable[..., tuple[Path, Path]]) -> None:
    """mlx-lm would apply a non-default rope scaling; the engine implements plain
    rope only and must refuse such a config instead of computing something else."""
    _, src_dir = converted(arch)
    model_dir = tmp_path / "model"
    shutil.copytree(src_dir, model_dir)
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    lm = cfg.get("text_config", cfg)
    lm[key] = {**(lm.get(key) or {}), "rope_type": "linear", "factor": 2.0}
    lm[key].pop("type", None)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(moeflux.UnsupportedError, match="linear"):
        moeflux.Model(model_dir, threads=1)
