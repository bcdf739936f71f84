"""Sequence state on the CUDA backend: a snapshot taken on one backend loads on the
other (both directions) and continues like the backend that took it, truncate and
reset on CUDA equal what the CPU backend does, and 2-bit experts run on CUDA in both
expert modes. CUDA against the CPU at test_cuda.py's bound (5e-5 of the largest logit,
same argmax); same-backend replays bit for bit. Skipped without a CUDA device.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import moeflux
from _helpers import ARCHS, FWD_PROMPT, HYBRID, continuation, converted  # noqa: F401

pytestmark = pytest.mark.skipif("cuda" not in moeflux.backends(), reason="no CUDA device")


def close(gpu: np.ndarray, cpu: np.ndarray, what: str, rel: float = 5e-5) -> None:
    gpu, cpu = np.atleast_2d(gpu), np.atleast_2d(cpu)
    assert np.isfinite(gpu).all(), f"{what}: non-finite logits"
    err = float((np.abs(gpu - cpu).max(axis=-1) / np.abs(cpu).max(axis=-1)).max())
    assert err <= rel, f"{what}: relative error {err:.3g} > {rel}"
    assert (gpu.argmax(-1) == cpu.argmax(-1)).all(), f"{what}: argmax differs"


@pytest.mark.parametrize("arch", ARCHS)
def test_snapshot_across_backends(arch: str,
                                  converted: Callable[..., tuple[Path, Path]]) -> None:
    _, model_dir = converted(arch)
    cont = continuation(512, 4, seed=3)
    with moeflux.Model(model_dir, threads=2) as cpu, \
            moeflux.Model(model_dir, threads=2, backend="cuda") as gpu:
        cpu.eval(FWD_PROMPT)
        gpu.eval(FWD_PROMPT)
        snap_c, snap_g = cpu.save_state(), gpu.save_state()
        ref_c = np.stack([cpu.eval(t) for t in cont])
        ref_g = np.stack([gpu.eval(t) for t in cont])
        gpu.load_state(snap_c)   # CPU snapshot on the GPU
        close(np.stack([gpu.eval(t) for t in cont]), ref_c, f"{arch} cpu -> cuda")
        cpu.load_state(snap_g)   # GPU snapshot on the CPU
        close(ref_g, np.stack([cpu.eval(t) for t in cont]), f"{arch} cuda -> cpu")
        gpu.load_state(snap_g)   # and on its own backend, bit for bit
        assert np.array_equal(np.stack([gpu.eval(t) for t in cont]), ref_g)


@pytest.mark.parametrize("arch", ARCHS)
def test_truncate_and_reset_on_cuda(arch: str,
                                    converted: Callable[..., tuple[Path, Path]]) -> None:
    _, model_dir = converted(arch)
    cont = continuation(512, 4, seed=5)
    with moeflux.Model(model_dir, threads=2) as cpu, \
            moeflux.Model(model_dir, threads=2, backend="cuda") as gpu:
        fresh = gpu.eval(FWD_PROMPT, all_logits=True)
        gpu.reset()
        for m in (cpu, gpu):   # in two evals: hybrid models keep a checkpoint at 5
            m.eval(FWD_PROMPT[:5])
            m.eval(FWD_PROMPT[5:])
            m.truncate(5)
            assert m.n_past == 5
        close(np.stack([gpu.eval(t) for t in cont]), np.stack([cpu.eval(t) for t in cont]),
              f"{arch} decode after truncate")
        gpu.reset()
        assert gpu.n_past == 0
        assert np.array_equal(gpu.eval(FWD_PROMPT, all_logits=True), fresh)


@pytest.mark.parametrize("mode", ["resident", "stream"])
def test_2bit_experts_on_cuda(mode: str, synth_checkpoint: Callable[..., Path],
                              tmp_path_factory: pytest.TempPathFactory) -> None:
    from moeflux.prep.convert import convert
    dst = tmp_path_factory.getbasetemp() / "cuda-2bit"
    if not (dst / "moeflux.json").exists():
        convert(synth_checkpoint("qwen3_next"), dst, expert_bits=2, progress=False)
    with moeflux.Model(dst, threads=2) as cpu, \
            moeflux.Model(dst, threads=2, backend="cuda", gpu_experts=mode) as gpu:
        close(gpu.eval(FWD_PROMPT, all_logits=True), cpu.eval(FWD_PROMPT, all_logits=True),
              f"2-bit {mode} prompt")
        for t in continuation(512, 4, seed=8):
            close(gpu.eval(t), cpu.eval(t), f"2-bit {mode} decode")
