"""Whole models against mlx-lm float32 on every backend of this build, in both expert
modes: the logits tests/make_cuda_goldens.py saved (mlx-lm cannot run on the CUDA
test machine), prompt + 32 decode steps, for every family (ARCHS). Acceptance as
everywhere (tests/_helpers.assert_close): max |ours - ref| <= 1e-3 of the largest
reference logit (the CPU backend: its 5e-5 regression tier) and the same argmax at
every position. Skipped when the goldens were not generated (CI), failed then under
`make test-cuda` (MOEFLUX_CUDA_GOLDENS_REQUIRED); the checkpoint rebuilt here must hash
as the one the goldens came from.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import moeflux
from _helpers import ARCHS, assert_close, converted, open_model  # noqa: F401
from make_cuda_goldens import DEFAULT_OUT, checkpoint_digest
from test_mixed import IDS as MIXED_IDS

GOLDENS = Path(os.environ.get("MOEFLUX_CUDA_GOLDENS", DEFAULT_OUT))
BACKENDS = ["cpu"] + (["cuda"] if "cuda" in moeflux.backends() else [])


# stream_cache25 / stream_cache0: streaming with the device expert cache at 25% of the
# routed experts / none (on the CPU through MOEFLUX_TEST_DEV_CACHE=1); on a GPU the
# automatic I/O mode copies from the page-locked expert mappings. stream_pread: 25%,
# copies from the reader's pinned slots instead.
CACHE = {"stream_cache25": 0.25, "stream_cache0": 0, "stream_pread": 0.25}
IO = {"stream_pread": "pread"}


def _golden(f: Path) -> dict:
    """The saved reference at f; skipped when it was not generated (failed instead
    under MOEFLUX_CUDA_GOLDENS_REQUIRED)."""
    if not f.exists():
        msg = f"no golden {f}: run tests/make_cuda_goldens.py where mlx-lm is"
        if os.environ.get("MOEFLUX_CUDA_GOLDENS_REQUIRED"):
            pytest.fail(msg)
        pytest.skip(msg)
    return dict(np.load(f))


def _check_logits(m: moeflux.Model, g: dict, what: str, backend: str) -> None:
    """Prompt (all positions) and the cached decode steps against the golden."""
    prefill = m.eval([int(t) for t in g["prompt"]], all_logits=True)
    assert_close(prefill, g["prefill"], f"{what} prefill", backend)
    assert_close(prefill[-1], g["decode"][0], f"{what} prefill vs cached", backend)
    rows = np.stack([m.eval(int(t)) for t in g["cont"]])
    assert_close(rows, g["decode"][1:], f"{what} decode", backend)


@pytest.mark.parametrize("mode", ["resident", "stream", "stream_cache25", "stream_cache0",
                                  "stream_pread"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_golden(arch: str, backend: str, mode: str,
                converted: Callable[..., tuple[Path, Path]],
                monkeypatch: pytest.MonkeyPatch) -> None:
    g = _golden(GOLDENS / f"{arch}.npz")
    ckpt, model_dir = converted(arch)
    assert checkpoint_digest(ckpt) == str(g["digest"]), (
        f"{arch}: the synthetic checkpoint built here differs from the goldens' one "
        "(another moeflux.prep.synth or numpy?): regenerate the goldens")
    if mode in CACHE and backend == "cpu":
        monkeypatch.setenv("MOEFLUX_TEST_DEV_CACHE", "1")
    io = {"io_mode": IO[mode]} if mode in IO else {}
    m = open_model(model_dir, backend=backend, gpu_experts=mode.split("_")[0], threads=2,
                   gpu_cache=CACHE.get(mode), **io)
    try:
        assert (m.stats()["io_mode"] == "resident") == (mode == "resident")
        what = f"{arch} {backend} {mode}"
        _check_logits(m, g, what, backend)
        st = m.stats()
        if mode in CACHE or (mode == "stream" and backend != "cpu"):
            assert st["gpu_cache_misses"] > 0, f"{what}: the device cache was not used"
            assert (st["gpu_cache_hits"] == 0) == (mode == "stream_cache0"), st
        if backend == "cuda" and mode != "resident":   # which copy path ran
            locked = mode not in IO
            assert ("page-locked" in st["io_fallback"]) == locked, st["io_fallback"]
            assert st["io_mode"] == ("mmap" if locked else "pread"), st["io_mode"]
    finally:
        m.close()


@pytest.mark.parametrize("mode", ["resident", "stream_cache25"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", MIXED_IDS)
def test_golden_mixed(case_id: str, backend: str, mode: str,
                      tmp_path_factory: pytest.TempPathFactory,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Mixed-precision expert recipes (tests/test_mixed.py's checkpoints, written by
    mlx-lm and carried with the goldens): gate/up in one format and down_proj in
    another (6-bit codes in some layers, or float), resident and streamed."""
    from moeflux.prep.convert import convert

    g = _golden(GOLDENS / "mixed" / f"{case_id}.npz")
    ckpt = GOLDENS / "mixed" / case_id
    assert checkpoint_digest(ckpt) == str(g["digest"]), (
        f"{case_id}: the checkpoint differs from the one its golden came from")
    model_dir = convert(ckpt, tmp_path_factory.mktemp(case_id) / "model", progress=False)
    if mode in CACHE and backend == "cpu":
        monkeypatch.setenv("MOEFLUX_TEST_DEV_CACHE", "1")
    m = open_model(model_dir, backend=backend, gpu_experts=mode.split("_")[0], threads=2,
                   gpu_cache=CACHE.get(mode))
    try:
        assert (m.stats()["io_mode"] == "resident") == (mode == "resident")
        _check_logits(m, g, f"{case_id} {backend} {mode}", backend)
        if mode in CACHE:
            assert m.stats()["gpu_cache_misses"] > 0, f"{case_id}: the cache was not used"
    finally:
        m.close()


@pytest.mark.parametrize("mode", ["resident", "stream_cache25"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_gpt_oss(backend: str, mode: str, tmp_path_factory: pytest.TempPathFactory,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """gpt-oss (tests/gptoss_synth.py's checkpoint, written by mlx-lm with its
    reference.npz, carried with the goldens): MXFP4 experts with biases, the clamped
    SwiGLU, top-k-then-softmax routing, attention sinks and sliding-window layers. The
    prompt and 32 decode steps against mlx-lm; then a 150-token prompt (the ring of the
    sliding layers wrapped, prefill in chunks) against the CPU backend, itself held to
    mlx-lm on it by tests/test_gpt_oss.py."""
    from moeflux.prep.convert import convert

    ckpt = GOLDENS / "gpt_oss"
    ref = _golden(ckpt / "reference.npz")
    model_dir = convert(ckpt, tmp_path_factory.mktemp("gpt_oss") / "model", progress=False)
    if mode in CACHE and backend == "cpu":
        monkeypatch.setenv("MOEFLUX_TEST_DEV_CACHE", "1")
    m = open_model(model_dir, backend=backend, gpu_experts=mode.split("_")[0], threads=2,
                   gpu_cache=CACHE.get(mode))
    try:
        what = f"gpt_oss {backend} {mode}"
        prompt = ref["prompt"].tolist()
        ours = m.eval(prompt, all_logits=True)
        assert_close(ours, ref["prefill"], f"{what} prefill", backend)
        rows = [ours[-1]] + [m.eval([int(t)]) for t in ref["tokens"]]
        assert_close(np.stack(rows), ref["decode"], f"{what} decode", backend)
        if backend == "cpu":
            return
        long = [(7 * i + 3) % int(ref["prefill"].shape[-1]) for i in range(150)]
        m.reset()
        got = m.eval(long, all_logits=True)
        with open_model(model_dir, backend="cpu", threads=2) as cpu:
            want = cpu.eval(long, all_logits=True)
        assert_close(got, want, f"{what} 150-token prompt against the CPU", backend)
    finally:
        m.close()
