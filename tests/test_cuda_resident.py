"""Resident experts (Model(gpu_experts=...)): every expert in backend memory at load,
decode routed on the device (moe_experts_dev), prefill chunks in one grouped call per
layer. On the CPU backend (everywhere) and on CUDA (where present) the resident path
must give bitwise the logits of the streaming path, for every family, prompt and
decode steps: both sum the same per-expert rows in the same order (backend.h). The
mlx-lm goldens of both paths on the GPU are in test_cuda_golden.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import moeflux
from _helpers import ARCHS, FWD_PROMPT, continuation, converted, open_model  # noqa: F401

BACKENDS = ["cpu"] + (["cuda"] if "cuda" in moeflux.backends() else [])


# gpu_cache of the streaming model: default (auto: every expert fits on the test
# machines), 25% of the routed experts, none. On the CPU, MOEFLUX_TEST_DEV_CACHE=1 runs
# the device-cache path there (tests/test_dev_cache.py).
CACHES = [None, 0.25, 0]


@pytest.mark.parametrize("cache", CACHES, ids=["cache_auto", "cache_25", "cache_0"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_resident_equals_stream(arch: str, backend: str, cache: Any,
                                converted: Callable[..., tuple[Path, Path]],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    _, model_dir = converted(arch)
    kw: dict[str, Any] = {"threads": 2, "backend": backend}
    if backend == "cpu" and cache is not None:
        monkeypatch.setenv("MOEFLUX_TEST_DEV_CACHE", "1")
    stream = open_model(model_dir, gpu_experts="stream", gpu_cache=cache, **kw)
    res = open_model(model_dir, gpu_experts="resident", **kw)
    try:
        assert res.stats()["io_mode"] == "resident"
        assert "resident" in res.stats()["io_fallback"]
        assert stream.stats()["io_mode"] != "resident"
        a = stream.eval(FWD_PROMPT, all_logits=True)
        b = res.eval(FWD_PROMPT, all_logits=True)
        assert np.isfinite(b).all()
        assert np.array_equal(a, b), f"{arch} {backend}: prefill differs"
        for i, t in enumerate(continuation(res.n_vocab, 6)):
            assert np.array_equal(stream.eval(t), res.eval(t)), f"decode step {i}"
        # a few tokens at once (device routing) and a truncate back into them
        cont = continuation(res.n_vocab, 3, seed=11)
        assert np.array_equal(stream.eval(cont, all_logits=True),
                              res.eval(cont, all_logits=True))
        assert res.stats()["expert_reads"] == 0
        st = stream.stats()
        if backend != "cpu" or cache is not None:   # the device cache was in use
            assert st["gpu_cache_misses"] > 0
            assert st["gpu_bytes_uploaded"] % st["gpu_cache_misses"] == 0
            assert (st["gpu_cache_hits"] == 0) == (cache == 0)
    finally:
        stream.close()
        res.close()


def test_resident_shared_model_and_bad_value(
        converted: Callable[..., tuple[Path, Path]]) -> None:
    _, model_dir = converted("qwen3_moe")
    with pytest.raises(moeflux.ArgumentError, match="gpu_experts"):
        moeflux.Model(model_dir, gpu_experts="vram")
    # auto on a backend whose memory is the host's: streaming
    with moeflux.Model(model_dir, threads=2) as m:
        assert m.stats()["io_mode"] != "resident"
    with moeflux.Model(model_dir, threads=2, gpu_experts="resident") as m:
        other = moeflux.Model.share(m, threads=2)
        try:
            x = m.eval(FWD_PROMPT)
            y = other.eval(FWD_PROMPT)
            assert np.array_equal(x, y)
            assert other.stats()["io_mode"] == "resident"
        finally:
            other.close()


def test_resident_core_rejects_unknown_mode(
        converted: Callable[..., tuple[Path, Path]]) -> None:
    from moeflux import _core
    _, model_dir = converted("qwen3_moe")
    with pytest.raises(moeflux.MoefluxError, match="gpu_experts 'x' unknown"):
        _core.ModelHandle(str(model_dir), gpu_experts="x")
