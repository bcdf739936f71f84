"""Damaged files and files changed under an open model: each gives a clear moeflux
error naming the file or layer, never a crash, a hang or silent garbage, and a failed
eval leaves the sequence unchanged.

Models are tiny qwen3_moe checkpoints written by moeflux.prep.synth in the
mlx-community layout and converted by moeflux.prep.convert; each test damages its own
copy. Cases that could crash or hang the interpreter if the guard regressed (SIGBUS
from a truncated mapping, open() of a FIFO) run in a child process with a timeout, so a
regression fails the test instead of the whole session.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import moeflux
from moeflux import FormatError, MoefluxIOError, NumericError
from moeflux.prep.convert import convert

NAN_BITS = {"F32": np.uint32(0x7FC00000), "F16": np.uint16(0x7E00),
            "BF16": np.uint16(0x7FC0)}


@pytest.fixture(scope="module")
def model_dir(synth_checkpoint: Callable[..., Path],
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = synth_checkpoint("qwen3_moe")
    return convert(src, tmp_path_factory.mktemp("robust") / "qwen3_moe", progress=False)


@pytest.fixture
def copy_dir(model_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(model_dir, dst)
    return dst


def _child(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter; returns the finished process."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout)


def _manifest(d: Path) -> dict:
    return json.loads((d / "model_weights.json").read_text())["tensors"]


def _poison_tensor(d: Path, name: str) -> None:
    """Overwrite every element of float tensor `name` in model_weights.bin with NaN."""
    t = _manifest(d)[name]
    bits = NAN_BITS[t["dtype"]]
    n = t["size"] // bits.nbytes
    with open(d / "model_weights.bin", "r+b") as f:
        f.seek(t["offset"])
        f.write(np.full(n, bits).tobytes())


@pytest.mark.parametrize("change", ["truncate", "rewrite"])
def test_weights_changed_while_open(copy_dir: Path, change: str) -> None:
    """A notebook keeps a model open while a new conversion is copied over its
    model_weights.bin: the next eval says so instead of dying of SIGBUS (truncated) or
    reading other bytes (rewritten in place)."""
    r = _child(f"""
        import os, time, moeflux
        m = moeflux.Model({str(copy_dir)!r}, threads=1, n_ctx=32)
        m.eval([1, 2, 3])
        p = {str(copy_dir / "model_weights.bin")!r}
        time.sleep(0.02)   # a later mtime even on coarse clocks
        if {change!r} == "truncate":
            os.truncate(p, os.path.getsize(p) // 2)
        else:
            data = open(p, "rb").read()
            with open(p, "r+b") as f:
                f.write(data)
        try:
            m.eval([4])
        except moeflux.MoefluxIOError as e:
            print("ERR", m.n_past, e)
        """)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "ERR 3" in r.stdout and "model_weights.bin was changed on disk" in r.stdout, \
        r.stdout


def test_fifo_in_place_of_weights(copy_dir: Path) -> None:
    (copy_dir / "model_weights.bin").unlink()
    os.mkfifo(copy_dir / "model_weights.bin")
    r = _child(f"""
        import moeflux
        try:
            moeflux.Model({str(copy_dir)!r}, threads=1)
        except moeflux.MoefluxIOError as e:
            print("ERR", e)
        """, timeout=30)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ERR" in r.stdout and "not a regular file" in r.stdout, r.stdout


def test_fifo_in_place_of_expert_file(copy_dir: Path) -> None:
    layer = copy_dir / "packed_experts" / "layer_01.bin"
    layer.unlink()
    os.mkfifo(layer)
    r = _child(f"""
        import moeflux
        try:
            moeflux.Model({str(copy_dir)!r}, threads=1)
        except moeflux.MoefluxIOError as e:
            print("ERR", e)
        """, timeout=30)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ERR" in r.stdout and "layer_01.bin" in r.stdout and \
        "not a regular file" in r.stdout, r.stdout


def test_overlapping_manifest_offsets(copy_dir: Path) -> None:
    path = copy_dir / "model_weights.json"
    data = json.loads(path.read_text())
    names = sorted(data["tensors"], key=lambda n: data["tensors"][n]["offset"])
    a, b = names[3], names[4]
    data["tensors"][b]["offset"] = data["tensors"][a]["offset"] + 4
    path.write_text(json.dumps(data))
    with pytest.raises(FormatError) as info:
        moeflux.Model(copy_dir, threads=1)
    msg = str(info.value)
    assert "overlap" in msg and a in msg and b in msg, msg


def test_nan_weights_name_the_layer(copy_dir: Path) -> None:
    _poison_tensor(copy_dir, "model.layers.1.post_attention_layernorm.weight")
    with moeflux.Model(copy_dir, threads=1, n_ctx=32) as m:
        with pytest.raises(NumericError, match=r"output of layer 1 of"):
            m.eval([3, 4, 5])
        assert m.n_past == 0   # the sequence is as it was


def test_nan_head_weights(copy_dir: Path) -> None:
    _poison_tensor(copy_dir, "model.norm.weight")
    with moeflux.Model(copy_dir, threads=1, n_ctx=32) as m:
        with pytest.raises(NumericError, match="logits"):
            m.eval([1])
        assert m.n_past == 0


def test_nan_expert_scales_name_the_layer(copy_dir: Path) -> None:
    """NaN scales in every expert of MoE layer 1's file (flipped bytes in an expert
    file): the eval names layer 1, whichever experts the router picks."""
    exp = copy_dir / "packed_experts"
    layout = json.loads((exp / "layout.json").read_text())
    comp = next(c for c in layout["components"] if c["name"] == "down_proj.scales")
    bits = NAN_BITS[comp["dtype"]]
    size, n_exp = layout["expert_size"], layout["num_experts"]
    with open(exp / "layer_01.bin", "r+b") as f:
        for e in range(n_exp):
            f.seek(e * size + comp["offset"])
            f.write(np.full(comp["size"] // bits.nbytes, bits).tobytes())
    with moeflux.Model(copy_dir, threads=1, n_ctx=32) as m:
        with pytest.raises(NumericError, match=r"output of layer 1 of"):
            m.eval([1, 2, 3])
        assert m.n_past == 0
