"""CUDA graphs (csrc/backends/cuda/cuda_graph.c): the CUDA backend holds kernel
launches back in segments and replays a segment it has met before as a graph, only the
nodes whose arguments changed updated. The replay must run exactly what launching one
by one runs: every family, both expert modes, prefill, decode steps (whose positions
change the attention and rope nodes), a few tokens at once and a truncate give the
logits of MOEFLUX_GPU_GRAPHS=0 bit for bit. And graphs must really be replayed in a
decode loop (counted by MOEFLUX_GPU_GRAPHS=verbose). The mlx-lm goldens of the GPU
families run with graphs on, the default (test_cuda_golden.py). Skipped without a
CUDA device.

Programmatic dependent launch (sm_90 and later): each kernel may start while the one
before it ends, and waits for it (mf_dep_wait in shaders/mf_prelude.h). A kernel that
read or wrote too early would race; the same runs must give the logits of
MOEFLUX_GPU_PDL=0 bit for bit, and on such a GPU it must really be on, in streams and
as graph edges.

The fusions (MOEFLUX_GPU_FUSE): every one on gives the logits of none, bit for bit, in
every family (test_backend_ops checks each fused op alone), and a switch the backend
cannot read fails the open. So do a prompt's attention blocks (MOEFLUX_GPU_ATTN_BLOCK):
blocks of a few queries give the logits of the blocks by size.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import moeflux
from _helpers import ARCHS, FWD_PROMPT, continuation, converted  # noqa: F401

pytestmark = pytest.mark.skipif("cuda" not in moeflux.backends(), reason="no CUDA device")


def _run(m: moeflux.Model) -> list[np.ndarray]:
    out = [m.eval(FWD_PROMPT, all_logits=True)]
    out += [m.eval(t) for t in continuation(m.n_vocab, 12)]
    out.append(m.eval(continuation(m.n_vocab, 3, seed=11), all_logits=True))
    m.truncate(m.n_past - 4)   # back to a decode step's end (held by hybrid models)
    out += [m.eval(t) for t in continuation(m.n_vocab, 6, seed=5)]
    return out


def _equal_without(env: str, arch: str, experts: str,
                   converted: Callable[..., tuple[Path, Path]],
                   monkeypatch: pytest.MonkeyPatch, value: str | None = None) -> None:
    """_run with env=0, then with env=value (None: the default): the same logits bit for
    bit."""
    _, model_dir = converted(arch)
    kw = {"threads": 2, "backend": "cuda", "gpu_experts": experts}
    if experts == "stream":
        kw["gpu_cache"] = 0.25
    monkeypatch.setenv(env, "0")   # read when the context is made
    with moeflux.Model(model_dir, **kw) as m:
        ref = _run(m)
    if value is None:
        monkeypatch.delenv(env)
    else:
        monkeypatch.setenv(env, value)
    with moeflux.Model(model_dir, **kw) as m:
        got = _run(m)
    assert np.isfinite(ref[0]).all()
    for i, (a, b) in enumerate(zip(ref, got)):
        assert np.array_equal(a, b), f"{arch} {experts}: eval {i} differs: {env}=0, {value}"


@pytest.mark.parametrize("experts", ["resident", "stream"])
@pytest.mark.parametrize("arch", ARCHS)
def test_graphs_equal_launches(arch: str, experts: str,
                               converted: Callable[..., tuple[Path, Path]],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    _equal_without("MOEFLUX_GPU_GRAPHS", arch, experts, converted, monkeypatch)


@pytest.mark.parametrize("experts", ["resident", "stream"])
@pytest.mark.parametrize("arch", ARCHS)
def test_programmatic_launch_equals_plain(arch: str, experts: str,
                                          converted: Callable[..., tuple[Path, Path]],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _equal_without("MOEFLUX_GPU_PDL", arch, experts, converted, monkeypatch)


@pytest.mark.parametrize("experts", ["resident", "stream"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fusions_equal_ops_apart(arch: str, experts: str,
                                 converted: Callable[..., tuple[Path, Path]],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Every fusion on (MOEFLUX_GPU_FUSE=all: the input norms inside the products, the
    residual adds, the attention combine, the routing, the experts' combine, a prompt's
    q, k and v in one launch; not all on by default) against none: whole models give
    the same logits bit for bit."""
    _equal_without("MOEFLUX_GPU_FUSE", arch, experts, converted, monkeypatch, "all")


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_blocks_equal(arch: str, converted: Callable[..., tuple[Path, Path]],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt's attention in blocks of 3 queries (MOEFLUX_GPU_ATTN_BLOCK=3, many
    launch pairs) and in blocks by size (one pair): the same logits bit for bit."""
    _, model_dir = converted(arch)
    got = []
    for block in ("3", None):
        if block is None:
            monkeypatch.delenv("MOEFLUX_GPU_ATTN_BLOCK")
        else:
            monkeypatch.setenv("MOEFLUX_GPU_ATTN_BLOCK", block)
        with moeflux.Model(model_dir, threads=2, backend="cuda",
                           gpu_experts="resident") as m:
            got.append(_run(m))
    for i, (a, b) in enumerate(zip(*got)):
        assert np.array_equal(a, b), f"{arch}: eval {i} differs with 3-query blocks"


@pytest.mark.parametrize("env, value", [("MOEFLUX_GPU_FUSE", "norm,rope"),
                                        ("MOEFLUX_GPU_ATTN_BLOCK", "0")])
def test_switch_refused(env: str, value: str, converted: Callable[..., tuple[Path, Path]],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A MOEFLUX_GPU_FUSE or MOEFLUX_GPU_ATTN_BLOCK the backend cannot read fails the
    model's open, naming it."""
    _, model_dir = converted("qwen3_moe")
    monkeypatch.setenv(env, value)
    with pytest.raises(moeflux.MoefluxError, match=f"{env}={value}"):
        moeflux.Model(model_dir, threads=2, backend="cuda", gpu_experts="resident")


def _compute_capability() -> float | None:
    """The first GPU's compute capability from nvidia-smi, None where it cannot say."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=60)
        return float(r.stdout.split()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


_DECODE = """
import sys, moeflux
with moeflux.Model(sys.argv[1], threads=2, backend="cuda", gpu_experts="resident") as m:
    m.eval([1, 5, 77, 300, 12])
    for t in range(24):
        m.eval([(7 * t + 3) % m.n_vocab])
"""


def test_decode_replays_graphs(converted: Callable[..., tuple[Path, Path]]) -> None:
    _, model_dir = converted("qwen3_moe")
    env = dict(os.environ, MOEFLUX_GPU_GRAPHS="verbose")
    r = subprocess.run([sys.executable, "-c", _DECODE, str(model_dir)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = re.search(r"(\d+) graph launches, (\d+) kernels launched one by one, (\d+) "
                  r"graphs made, (\d+) nodes updated; programmatic launch (on|off), "
                  r"edges (on|off)", r.stderr)
    assert m, r.stderr
    graphs, direct, made, updated = map(int, m.groups()[:4])
    cc = _compute_capability()
    if cc is not None and cc >= 9.0:   # the driver of CUDA 12.3 or later has the edges
        assert m.group(5) == "on" and m.group(6) == "on", r.stderr
    # 24 decode steps: each segment of a step is met again in the next one, so from
    # the third step on every segment of at least MF_GRAPH_MIN launches is one graph
    # launch (made once), and the positions change nodes in every step
    assert made >= 1 and graphs >= 20 * made, r.stderr
    assert updated >= 20, r.stderr
    assert direct > 0, r.stderr   # the prompt and the first two steps
