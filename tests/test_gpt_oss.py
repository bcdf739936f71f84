"""The gpt_oss forward pass (csrc/models/gpt_oss.c) against mlx-lm in float32, through
the public Python API.

The model is the synthetic mlx-community MXFP4-Q8 checkpoint of tests/gptoss_synth.py
(MXFP4 experts with per-expert biases, 8-bit affine attention / router / embedding /
head, attention sinks, sliding window 8 alternating with full attention, YaRN rope,
top-k-then-softmax routing, clamped SwiGLU) converted by ``moeflux.prep.convert``. The
oracle is mlx-lm itself: the fixture's stored reference.npz (its prompt of 21 tokens
and 32 greedy decode steps through mlx-lm's RotatingKVCache) and, for other token
sequences, tests/reference.py. Every comparison holds the CPU regression tier
(RTOL_CPU, which implies the RTOL acceptance bar) and equal argmax at every position.

The sliding layers keep their window in a ring of sliding_window + 127 rows: the long
prompts here (150 and 200 tokens) wrap it, run in internal 64-token chunks, and are
where snapshots (the ring's last sliding_window positions) and truncation (exact back
to 127 tokens, refused beyond) are checked.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import gptoss_synth as gs
import moeflux
from _helpers import (RTOL_CPU, assert_close, check_failed_eval_recovers, continuation,
                      converted)
from reference import reference_decode, reference_logits

__all__ = ["converted"]  # the fixture is used by name

ARCH = "gpt_oss"
WINDOW = 8
RING_EXTRA = 127          # ring rows beyond the window (gpt_oss.c GPTOSS_RING_EXTRA)


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, converted model dir) of gptoss_synth's default checkpoint."""
    from moeflux.prep.convert import convert

    root = tmp_path_factory.mktemp("gpt_oss")
    ckpt = gs.write_gptoss_checkpoint(root / "ckpt")
    convert(ckpt, root / "model", progress=False)
    return ckpt, root / "model"


def _open(model_dir: Path, **kw: Any) -> moeflux.Model:
    return moeflux.Model(model_dir, threads=2, **kw)


def test_prompt_and_32_decode_steps_match_mlx_lm(fixture: tuple[Path, Path]) -> None:
    ckpt, model_dir = fixture
    ref = np.load(ckpt / "reference.npz")
    prompt = ref["prompt"].tolist()
    with _open(model_dir) as m:
        assert m.arch == ARCH
        ours = m.eval(prompt, all_logits=True)
        assert_close(ours, ref["prefill"], "prefill (every position)")
        rows = [ours[-1]] + [m.eval([int(t)]) for t in ref["tokens"]]
        assert_close(np.stack(rows), ref["decode"], "decode (32 greedy steps)")
        assert m.n_past == len(prompt) + gs.N_DECODE


def test_converted_layout_is_mxfp4_with_biases(fixture: tuple[Path, Path]) -> None:
    """What the test above ran: MXFP4 experts with their biases in layout version 2,
    the rest of the model's linears affine 8-bit with their own biases and sinks."""
    _, model_dir = fixture
    lay = json.loads((model_dir / "packed_experts" / "layout.json").read_text())
    comps = {c["name"]: c for c in lay["components"]}
    assert lay["version"] == 2 and lay["moe_layers"] == [0, 1, 2, 3]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert comps[f"{proj}.weight"]["mode"] == "mxfp4"
        assert comps[f"{proj}.scales"]["dtype"] == "U8"
        assert f"{proj}.biases" not in comps and f"{proj}.bias" in comps
    t = json.loads((model_dir / "model_weights.json").read_text())["tensors"]
    for name in ("self_attn.sinks", "self_attn.o_proj.bias", "mlp.router.bias"):
        assert f"model.layers.0.{name}" in t
    assert not any(".mlp.experts." in n for n in t)


def test_chunked_prefill_equals_one_shot(fixture: tuple[Path, Path]) -> None:
    """A 150-token prompt in one call (internal 64-token chunks, the ring wrapped) and
    in uneven pieces agree with each other and with mlx-lm at every position."""
    ckpt, model_dir = fixture
    prompt = continuation(320, 150, seed=3)
    ref = reference_logits(ckpt, prompt)
    with _open(model_dir) as m:
        one = m.eval(prompt, all_logits=True)
    with _open(model_dir) as m:
        cuts = [0, 1, 9, 30, 95, 150]
        pieces = np.concatenate([m.eval(prompt[a:b], all_logits=True)
                                 for a, b in zip(cuts, cuts[1:])])
    assert_close(one, ref, "150 tokens in one call")
    assert_close(pieces, ref, f"150 tokens in pieces at {cuts[1:-1]}")
    scale = np.abs(one).max(axis=-1, keepdims=True)
    assert (np.abs(pieces - one) <= RTOL_CPU * scale).all()


def test_decode_after_the_ring_wrapped(fixture: tuple[Path, Path]) -> None:
    """200 tokens (past the 135-row ring) then 16 decode steps match mlx-lm's cached
    decode (its RotatingKVCache)."""
    ckpt, model_dir = fixture
    prompt, cont = continuation(320, 200, seed=4), continuation(320, 16, seed=6)
    ref = reference_decode(ckpt, prompt, cont)
    with _open(model_dir) as m:
        last = m.eval(prompt)
        rows = [last] + [m.eval([t]) for t in cont]
    assert_close(np.stack(rows), ref, "decode after 200 tokens")


def test_snapshot_round_trips_bit_exactly(fixture: tuple[Path, Path]) -> None:
    """A snapshot taken after the ring wrapped restores bit for bit, in the same ctx and
    in a fresh one, and holds the sliding layers' last WINDOW positions only."""
    _, model_dir = fixture
    prompt, cont = continuation(320, 150, seed=7), continuation(320, 5, seed=8)
    with _open(model_dir) as m:
        m.eval(prompt)
        snap = m.save_state()
        first = np.stack([m.eval([t]) for t in cont])
        m.load_state(snap)
        assert m.n_past == len(prompt)
        again = np.stack([m.eval([t]) for t in cont])
        small = m.state_size
    np.testing.assert_array_equal(again, first)
    with _open(model_dir, n_ctx=256) as m:
        m.load_state(snap)
        fresh = np.stack([m.eval([t]) for t in cont])
    np.testing.assert_array_equal(fresh, first)
    # 2 full layers x K,V x 155 positions + 2 sliding layers x K,V x 8 positions, of
    # 2 heads x 16 floats: far less than every layer's 155 positions.
    row = 2 * 16 * 4
    assert small - 2 * 2 * 155 * row - 2 * 2 * WINDOW * row < 4096


def test_truncate_exact_within_the_ring_refused_beyond(fixture: tuple[Path, Path]) -> None:
    ckpt, model_dir = fixture
    prompt, cont = continuation(320, 150, seed=9), continuation(320, 4, seed=10)
    keep = len(prompt) - RING_EXTRA
    ref = reference_decode(ckpt, prompt[:keep], cont)
    with _open(model_dir) as m:
        m.eval(prompt)
        with pytest.raises(moeflux.StateError, match=r"cannot be exact.*ring"):
            m.truncate(keep - 1)
        assert m.n_past == len(prompt)
        m.truncate(keep)
        rows = [m.eval([t]) for t in cont]
        m.truncate(0)
        assert m.n_past == 0
    assert_close(np.stack(rows), ref[1:], f"decode after truncate({keep})")


def test_reset_equals_fresh(fixture: tuple[Path, Path]) -> None:
    ckpt, model_dir = fixture
    prompt = continuation(320, 20, seed=11)
    with _open(model_dir) as m:
        m.eval(continuation(320, 90, seed=12))
        m.reset()
        assert m.n_past == 0
        ours = m.eval(prompt, all_logits=True)
    assert_close(ours, reference_logits(ckpt, prompt), "after reset")


IO_SETTINGS: dict[str, dict[str, Any]] = {
    "pread": {"io_mode": "pread"},
    "mmap": {"io_mode": "mmap"},
    "direct": {"io_mode": "direct"},
    "one_io_thread": {"io_mode": "pread", "io_threads": 1},
    "cache": {"io_mode": "pread", "expert_cache_bytes": 64 << 20},
    "prefetch": {"io_mode": "pread", "prefetch": True},
}


def test_every_io_mode_bitwise_equal(fixture: tuple[Path, Path]) -> None:
    _, model_dir = fixture
    prompt, cont = continuation(320, 70, seed=13), continuation(320, 6, seed=14)

    def run(**kw: Any) -> np.ndarray:
        with _open(model_dir, **kw) as m:
            rows = [m.eval(prompt, all_logits=True)]
            rows += [m.eval([t])[None] for t in cont]
            return np.concatenate(rows)

    base = run()
    for name, kw in IO_SETTINGS.items():
        assert np.array_equal(run(**kw), base), f"{name}: logits differ from default"


def test_failed_eval_leaves_the_state_as_it_was(
        converted: Callable[..., tuple[Path, Path]], tmp_path: Path) -> None:
    """An expert read failing in the last layer (after every sliding layer wrote its
    ring) raises; decoding then continues exactly (the overwritten ring rows were put
    back)."""
    ckpt, model_dir = converted(ARCH)
    check_failed_eval_recovers(ckpt, model_dir, tmp_path)


def test_failed_long_eval_keeps_the_wrapped_ring(fixture: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    """After 150 tokens, an eval of 130 more (more than the ring's spare rows: it
    overwrites the rows of the window the next token needs) fails in the last layer;
    decoding then equals mlx-lm's as if that eval never happened."""
    import shutil

    ckpt, src = fixture
    model_dir = tmp_path / "model"
    shutil.copytree(src, model_dir)
    prompt, cont = continuation(320, 150, seed=15), continuation(320, 4, seed=16)
    ref = reference_decode(ckpt, prompt, cont)
    victim = model_dir / "packed_experts" / "layer_03.bin"
    blob = victim.read_bytes()
    with _open(model_dir) as m:
        m.eval(prompt)
        with open(victim, "r+b") as f:   # same inode: the open descriptor sees it
            f.truncate(0)
        with pytest.raises(OSError):
            m.eval(continuation(320, 130, seed=17))
        assert m.n_past == len(prompt)
        with open(victim, "r+b") as f:
            f.write(blob)
        rows = [m.eval([t]) for t in cont]
    assert_close(np.stack(rows), ref[1:], "decode after a failed 130-token eval")


# ==== prep: what it refuses in a gpt-oss checkpoint ====

def _prep_refuses(src: Path, dst: Path, match: str, **kw: Any) -> None:
    from moeflux.errors import FormatError
    from moeflux.prep.convert import convert

    with pytest.raises(FormatError, match=match):
        convert(src, dst, progress=False, **kw)


def test_prep_refuses_raw_hf_experts(fixture: tuple[Path, Path], tmp_path: Path) -> None:
    from test_prep import clone_checkpoint

    def rename(t: dict[str, Any]) -> None:
        t["model.layers.0.mlp.experts.gate_up_proj_blocks"] = t.pop(
            "model.layers.0.mlp.experts.gate_proj.weight")

    src = clone_checkpoint(fixture[0], tmp_path / "src", edit_tensors=rename)
    _prep_refuses(src, tmp_path / "out", r"gate_up_proj_blocks: raw Hugging Face gpt_oss")


def test_prep_refuses_mxfp4_outside_the_experts(fixture: tuple[Path, Path],
                                                tmp_path: Path) -> None:
    from test_prep import clone_checkpoint

    def edit(cfg: dict[str, Any]) -> None:
        cfg["quantization"]["model.layers.0.self_attn.q_proj"]["mode"] = "mxfp4"

    src = clone_checkpoint(fixture[0], tmp_path / "src", edit_config=edit)
    _prep_refuses(src, tmp_path / "out", r"self_attn\.q_proj' uses mode 'mxfp4'")


def test_prep_refuses_mxfp4_with_affine_biases(fixture: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    from test_prep import clone_checkpoint

    def add(t: dict[str, Any]) -> None:
        dt, shape, raw = t["model.layers.1.mlp.experts.down_proj.scales"]
        t["model.layers.1.mlp.experts.down_proj.biases"] = ("BF16", shape, raw * 2)

    src = clone_checkpoint(fixture[0], tmp_path / "src", edit_tensors=add)
    _prep_refuses(src, tmp_path / "out", r"down_proj\.biases: present, but mode mxfp4")


def test_prep_refuses_2bit_requant_of_mxfp4(fixture: tuple[Path, Path],
                                           tmp_path: Path) -> None:
    _prep_refuses(fixture[0], tmp_path / "out", r"expert_bits=2 .*mxfp4", expert_bits=2)


def test_gpu_backends_absent_fail_at_open(fixture: tuple[Path, Path]) -> None:
    """backend='cuda' / 'metal' where that backend has no device fail at open with a
    BackendError, never a model that opens and computes something else (where one is
    present, tests/test_cuda_golden.py runs the model against mlx-lm on it)."""
    _, model_dir = fixture
    for backend in ("cuda", "metal"):
        if backend in moeflux.backends():
            continue
        with pytest.raises(moeflux.BackendError):
            moeflux.Model(model_dir, backend=backend)
