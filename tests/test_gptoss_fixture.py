"""The synthetic gpt-oss checkpoint of tests/gptoss_synth.py: that it is what
mlx-community's MXFP4 uploads are (layout, dtypes, quantization block, MXFP4 experts),
that mlx-lm loads it strictly with the experts in mode mxfp4, that its stored oracle
(reference.npz) is mlx-lm's own output and self-consistent (the cached decode with the
rotating cache equals an uncached masked prefill of the same tokens), that the sliding
window really shapes the outputs, and that the CPU MXFP4 kernels reproduce mlx's
quantized matmul on the fixture's own expert weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import _kernsets
import gptoss_synth as gs
from moeflux import _diag

mx.set_default_device(mx.cpu)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gs.write_gptoss_checkpoint(tmp_path_factory.mktemp("gptoss") / "ckpt")


def tensors(path: Path) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    for f in sorted(path.glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def test_layout_is_mlx_community_mxfp4_q8(ckpt: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model_type"] == "gpt_oss"
    assert cfg["layer_types"] == ["sliding_attention", "full_attention"] * 2
    assert cfg["sliding_window"] < gs.PROMPT_LEN
    q = cfg["quantization"]
    assert q == cfg["quantization_config"]
    assert (q["group_size"], q["bits"], q["mode"]) == (64, 8, "affine")
    w = tensors(ckpt)
    n_exp, hid, ff = cfg["num_local_experts"], cfg["hidden_size"], cfg["intermediate_size"]
    for il in range(cfg["num_hidden_layers"]):
        lp = f"model.layers.{il}"
        for proj, n_in, n_out in (("gate_proj", hid, ff), ("up_proj", hid, ff),
                                  ("down_proj", ff, hid)):
            p = f"{lp}.mlp.experts.{proj}"
            assert q[p] == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
            assert w[f"{p}.weight"].dtype == mx.uint32
            assert w[f"{p}.weight"].shape == (n_exp, n_out, n_in // 8)
            assert w[f"{p}.scales"].dtype == mx.uint8
            assert w[f"{p}.scales"].shape == (n_exp, n_out, n_in // 32)
            assert f"{p}.biases" not in w                   # MXFP4: no affine biases
            assert w[f"{p}.bias"].shape == (n_exp, n_out)   # the linear's own bias
        for p in (f"{lp}.self_attn.q_proj", f"{lp}.self_attn.o_proj", f"{lp}.mlp.router"):
            assert q[p] == {"group_size": 64, "bits": 8, "mode": "affine"}
            assert w[f"{p}.scales"].dtype == mx.bfloat16 and f"{p}.biases" in w
            assert f"{p}.bias" in w
        assert w[f"{lp}.self_attn.sinks"].shape == (cfg["num_attention_heads"],)
        assert w[f"{lp}.self_attn.sinks"].dtype == mx.bfloat16


def test_mlx_lm_loads_it_with_mxfp4_experts(ckpt: Path) -> None:
    from mlx_lm.utils import load_model

    model, _ = load_model(ckpt, strict=True)
    experts = model.model.layers[0].mlp.experts
    for proj in (experts.gate_proj, experts.up_proj, experts.down_proj):
        assert type(proj).__name__ == "QuantizedSwitchLinear"
        assert (proj.mode, proj.bits, proj.group_size) == ("mxfp4", 4, 32)
    assert model.model.layers[0].self_attn.q_proj.mode == "affine"
    assert type(model.make_cache()[0]).__name__ == "RotatingKVCache"


def test_reference_is_mlx_lm_and_self_consistent(ckpt: Path) -> None:
    ref = np.load(ckpt / "reference.npz")
    prompt, tokens = [int(t) for t in ref["prompt"]], [int(t) for t in ref["tokens"]]
    assert len(prompt) == gs.PROMPT_LEN and len(tokens) == gs.N_DECODE
    again = gs.reference_run(ckpt, prompt, 2)
    np.testing.assert_array_equal(again["prefill"], ref["prefill"])
    np.testing.assert_array_equal(again["decode"], ref["decode"][:3])
    # The cached path (RotatingKVCache on sliding layers, one token at a time) against
    # one uncached prefill of prompt + continuation with mlx-lm's windowed mask.
    full = gs.reference_run(ckpt, prompt + tokens, 0)["prefill"]
    dec = ref["decode"]
    scale = float(np.abs(full).max())
    err = float(np.abs(dec - full[gs.PROMPT_LEN - 1:]).max())
    assert err <= 1e-5 * scale, (err, scale)
    np.testing.assert_array_equal(dec[:-1].argmax(-1), ref["tokens"])


def test_sliding_window_shapes_the_outputs(ckpt: Path, tmp_path: Path) -> None:
    # Same weights with a window longer than everything: other logits past the window.
    cfg = json.loads((ckpt / "config.json").read_text())
    w = cfg["sliding_window"]
    wide = tmp_path / "wide"
    wide.mkdir()
    for f in ckpt.iterdir():
        if f.name != "config.json":
            (wide / f.name).symlink_to(f)
    cfg["sliding_window"] = 4096
    (wide / "config.json").write_text(json.dumps(cfg))
    ref = np.load(ckpt / "reference.npz")
    prompt = [int(t) for t in ref["prompt"]]
    other = gs.reference_run(wide, prompt, 0)["prefill"]
    np.testing.assert_array_equal(other[:w], ref["prefill"][:w])   # inside the window
    assert np.abs(other[w:] - ref["prefill"][w:]).max() > 1e-2


def test_cpu_mxfp4_kernels_on_the_fixture_experts(ckpt: Path) -> None:
    w = tensors(ckpt)
    p = "model.layers.1.mlp.experts.down_proj"
    wq, s = w[f"{p}.weight"][3], w[f"{p}.scales"][3]       # expert 3: [hid, ff]
    n_out, n_in = wq.shape[0], wq.shape[1] * 8
    x = np.random.default_rng(0).standard_normal((2, n_in)).astype(np.float32)
    qmm = np.array(mx.quantized_matmul(mx.array(x), wq, s, None, transpose=True,
                                       group_size=32, bits=4, mode="mxfp4"))
    for kernels in _kernsets.available():
        out = np.empty((2, n_out), np.float32)
        _diag.matmul("matmul", out, w=np.array(wq), x=x, n_out=n_out, n_in=n_in, n_tok=2,
                     wdtype="MXFP4", scales=np.array(s), kernels=kernels)
        err = float(np.abs(out - qmm).max())
        assert err <= 1e-5 * float(np.abs(qmm).max()), (kernels, err)
        _kernsets.note(kernels)


def test_greedy_tokens_are_well_separated(ckpt: Path) -> None:
    # The model work asserts argmax equality at every step: the default fixture keeps
    # the top two logits of every reference row apart by more than the 1e-3 tier.
    ref = np.load(ckpt / "reference.npz")
    for name in ("prefill", "decode"):
        top2 = np.sort(ref[name], axis=-1)[:, -2:]
        gap = (top2[:, 1] - top2[:, 0]) / np.abs(ref[name]).max()
        assert gap.min() > 2e-3, (name, float(gap.min()))
