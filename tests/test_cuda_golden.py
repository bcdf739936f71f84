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

GOLDENS = Path(os.environ.get("MOEFLUX_CUDA_GOLDENS", DEFAULT_OUT))
BACKENDS = ["cpu"] + (["cuda"] if "cuda" in moeflux.backends() else [])


# stream_cache25 / stream_cache0: streaming with the device expert cache at 25% of the
# routed experts / none (on the CPU through MOEFLUX_TEST_DEV_CACHE=1); on a GPU the
# automatic I/O mode copies from the page-locked expert mappings. stream_pread: 25%,
# copies from the reader's pinned slots instead.
CACHE = {"stream_cache25": 0.25, "stream_cache0": 0, "stream_pread": 0.25}
IO = {"stream_pread": "pread"}


@pytest.mark.parametrize("mode", ["resident", "stream", "stream_cache25", "stream_cache0",
                                  "stream_pread"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_golden(arch: str, backend: str, mode: str,
                converted: Callable[..., tuple[Path, Path]],
                monkeypatch: pytest.MonkeyPatch) -> None:
    f = GOLDENS / f"{arch}.npz"
    if not f.exists():
        msg = f"no golden {f}: run tests/make_cuda_goldens.py where mlx-lm is"
        if os.environ.get("MOEFLUX_CUDA_GOLDENS_REQUIRED"):
            pytest.fail(msg)
        pytest.skip(msg)
    g = np.load(f)
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
        prefill = m.eval([int(t) for t in g["prompt"]], all_logits=True)
        assert_close(prefill, g["prefill"], f"{what} prefill", backend)
        assert_close(prefill[-1], g["decode"][0], f"{what} prefill vs cached", backend)
        rows = np.stack([m.eval(int(t)) for t in g["cont"]])
        assert_close(rows, g["decode"][1:], f"{what} decode", backend)
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
