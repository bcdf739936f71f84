"""Helpers shared by the state, generation, CLI, thread and example tests: converted
synthetic model directories (made once per session) and the logits comparison with
the mlx-lm oracle.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

# Every architecture moeflux targets. A test over them runs each one; an architecture
# this build cannot open is reported as an expected failure (UnsupportedError), never
# skipped.
ARCHS = ["qwen3_5_moe", "qwen3_next", "deepseek_v3", "qwen3_moe"]
HYBRID = {"qwen3_5_moe", "qwen3_next"}

# Logits agreement with mlx-lm: max |ours - ref| <= RTOL * max |ref| (the forward-pass
# tests use the same bound).
RTOL = 1e-3

PROMPT = [17, 301, 5, 88, 450, 2, 199, 76, 333, 12, 401]
CONT = [64, 9, 270, 3, 140]


@pytest.fixture(scope="session")
def model_dir(synth_checkpoint: Callable[..., Path]) -> Callable[..., Path]:
    """Factory: (arch, seed=0, **overrides) -> (checkpoint dir, moeflux model dir).

    The moeflux dir is the checkpoint converted by moeflux.prep.convert, next to it in
    the session's synthetic cache, made once.
    """
    def make(arch: str, seed: int = 0, **overrides: Any) -> tuple[Path, Path]:
        from moeflux.prep.convert import convert

        src = synth_checkpoint(arch, seed=seed, **overrides)
        dst = src.with_name(src.name + "-moeflux")
        if not (dst / "config.json").exists():
            tmp = dst.with_name(dst.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            convert(src, tmp, progress=False)
            shutil.rmtree(dst, ignore_errors=True)
            os.replace(tmp, dst)
        return src, dst

    return make


def open_model(path: Path, **kwargs: Any) -> Any:
    """moeflux.Model(path), turning UnsupportedError into an expected failure."""
    import moeflux
    from moeflux.errors import UnsupportedError

    try:
        return moeflux.Model(path, **kwargs)
    except UnsupportedError as exc:
        pytest.xfail(f"this build cannot open {path.name}: {exc}")


def assert_close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    """max |ours - ref| <= RTOL * max |ref| and the same argmax on every row."""
    ours = np.atleast_2d(ours)
    ref = np.atleast_2d(ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    assert np.isfinite(ours).all(), f"{what}: non-finite logits"
    err = float(np.max(np.abs(ours - ref)))
    scale = float(np.max(np.abs(ref)))
    assert err <= RTOL * scale, (
        f"{what}: max |ours - ref| = {err:.3e} > {RTOL} * max |ref| ({scale:.3e})")
    assert (ours.argmax(-1) == ref.argmax(-1)).all(), f"{what}: argmax differs"
