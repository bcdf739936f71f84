"""Expert I/O modes, the RAM expert cache and decode prefetch change where expert bytes
come from, never the arithmetic: every setting gives bitwise the same logits as the
default on every architecture (prefill and decode), and stats() says what was used.
The expert files are real files read with real pread / mmap / O_DIRECT.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import moeflux
from _helpers import CPU_ARCHS, CONT, PROMPT, converted  # noqa: F401 (fixture)

SETTINGS: dict[str, dict[str, Any]] = {
    "pread": {"io_mode": "pread"},
    "mmap": {"io_mode": "mmap"},
    "direct": {"io_mode": "direct"},
    "one_io_thread": {"io_mode": "pread", "io_threads": 1},
    "cache": {"io_mode": "pread", "expert_cache_bytes": 64 << 20},
    "prefetch": {"io_mode": "pread", "prefetch": True},
    "mmap_prefetch": {"io_mode": "mmap", "prefetch": True},
    "mmap_cache": {"io_mode": "mmap", "expert_cache_bytes": 64 << 20},
}


def _run(path: Path, **kw: Any) -> tuple[np.ndarray, dict]:
    """Prompt (all positions) then each continuation token; logits stacked."""
    with moeflux.Model(path, threads=2, n_ctx=64, **kw) as m:
        rows = [m.eval(PROMPT, all_logits=True)]
        rows += [m.eval([t])[None] for t in CONT * 2]
        return np.concatenate(rows), m.stats()


@pytest.mark.parametrize("arch", CPU_ARCHS)
def test_settings_bitwise_equal(arch: str,
                                converted: Callable[..., tuple[Path, Path]]) -> None:
    _, path = converted(arch)
    base, st = _run(path)
    assert st["io_mode"] in ("mmap", "pread"), st   # auto on a tiny model: mmap
    for name, kw in SETTINGS.items():
        got, st = _run(path, **kw)
        assert np.array_equal(got, base), f"{arch} {name}: logits differ from default"
        want = kw["io_mode"] if kw["io_mode"] != "direct" else ("direct", "pread")
        assert st["io_mode"] in want, (name, st["io_mode"], st["io_fallback"])
        assert st["expert_reads"] > 0 and st["io_fallback"], (name, st)
        if "expert_cache_bytes" in kw:
            # decode reuses experts of earlier tokens: some come from the cache
            assert st["cache_hits"] > 0 and st["expert_bytes_cache"] > 0 or \
                kw["io_mode"] == "mmap", (name, st)
        if kw.get("prefetch"):
            assert st["prefetch_issued"] > 0, (name, st)


def test_env_override_and_bad_values(converted: Callable[..., tuple[Path, Path]],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _, path = converted("qwen3_moe")
    monkeypatch.setenv("MOEFLUX_IO", "pread")
    with moeflux.Model(path, threads=1, io_mode="mmap") as m:
        m.eval([1])
        assert m.stats()["io_mode"] == "pread"
    monkeypatch.setenv("MOEFLUX_IO", "fastest")
    with pytest.raises(moeflux.ArgumentError, match="fastest"):
        moeflux.Model(path, threads=1)
    monkeypatch.delenv("MOEFLUX_IO")
    for bad in ({"io_mode": "turbo"}, {"io_threads": 0}, {"expert_cache_bytes": -1}):
        with pytest.raises(moeflux.ArgumentError):
            moeflux.Model(path, threads=1, **bad)
