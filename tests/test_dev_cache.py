"""The device expert cache (csrc/models/dev_cache.c) on the CPU backend.

MOEFLUX_TEST_DEV_CACHE=1 makes a streaming context treat the CPU as a device with its
own memory: every landed expert is copied (upload_async, fences, a slot of the cache)
before it runs, as on CUDA. Checked on every family:
  - logits bitwise equal to the plain streaming path, with the cache at 0 (no
    retention), 25% and 100% of the routed experts;
  - hits, misses and uploaded bytes equal to a model of the cache computed here from
    mlx-lm's routing of the same tokens (expert_cache.h's LFRU rules replayed on each
    call's distinct experts in ascending order: every lookup, then the misses'
    inserts), not from the engine's counters.
Under `make asan-pytest PYTEST_ARGS=tests/test_dev_cache.py` the same runs check that
no slot is read after its release.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from _helpers import ARCHS, PROMPT, converted  # noqa: F401 (fixture)

CONT = [64, 9, 270, 3, 140, 64, 9]
LFRU_W = 10   # MF_EXPERT_CACHE_W (io/expert_cache.h)


def _run(model_dir: Path, monkeypatch: pytest.MonkeyPatch, cache: Any,
         io_mode: str = "pread") -> tuple[np.ndarray, dict]:
    """Prompt logits, then one row per decode token, and the stats."""
    import moeflux

    kw = {} if cache is None else {"gpu_cache": cache}
    if cache is None:
        monkeypatch.delenv("MOEFLUX_TEST_DEV_CACHE", raising=False)
    else:
        monkeypatch.setenv("MOEFLUX_TEST_DEV_CACHE", "1")
    with moeflux.Model(model_dir, threads=2, io_mode=io_mode, **kw) as m:
        rows = [m.eval(PROMPT, all_logits=True)]
        rows += [m.eval([t])[None, :] for t in CONT]
        return np.concatenate(rows), m.stats()


def _routing(ckpt: Path) -> list[tuple[int, list[int]]]:
    """(layer, distinct experts ascending) of every MoE call of the prompt and the
    decode tokens, in call order, from mlx-lm's own routers (each MoE block's gate
    wrapped to record what it chose)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    mx.set_default_device(mx.cpu)
    model, _ = load_model(ckpt, strict=True)
    model.set_dtype(mx.float32)
    calls: list[tuple[int, list[int]]] = []
    for name, mod in model.named_modules():
        parts = name.split(".")
        if hasattr(mod, "switch_mlp") and hasattr(mod, "gate") and "layers" in parts:
            il = int(parts[parts.index("layers") + 1])
            k = getattr(mod, "top_k", None) or getattr(mod, "num_experts_per_tok", None)
            # minimax's block holds the correction bias its sigmoid choice adds
            bias = getattr(mod, "e_score_correction_bias", None)
            mod.gate = _Recorder(mod.gate, il, k, calls, bias)
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([PROMPT], dtype=mx.int32), cache=cache))
    for t in CONT:
        mx.eval(model(mx.array([[t]], dtype=mx.int32), cache=cache))
    return calls


class _Recorder:
    """Calls the gate and records the experts chosen (a softmax router's top-k logits,
    the (inds, scores) a noaux_tc MoEGate returns, or, given the block's correction
    bias (minimax), the top-k of sigmoid(logits) + bias)."""

    def __init__(self, gate: Any, il: int, k: int | None, calls: list,
                 bias: Any = None) -> None:
        self.gate, self.il, self.k, self.calls = gate, il, k, calls
        self.bias = None if bias is None else np.array(bias, np.float32)

    def __call__(self, x: Any) -> Any:
        out = self.gate(x)
        if isinstance(out, tuple):
            inds = np.array(out[0]).reshape(-1)
        else:
            logits = np.array(out).reshape(-1, out.shape[-1])
            if self.bias is not None:
                logits = 1.0 / (1.0 + np.exp(-logits)) + self.bias
            inds = np.argsort(-logits, axis=-1, kind="stable")[:, :self.k].reshape(-1)
        self.calls.append((self.il, sorted({int(e) for e in inds})))
        return out


class _LFRU:
    """expert_cache.h's rules: lookup ticks the clock; a hit bumps count and last;
    insert takes the lowest empty slot, else the lowest count * W + last (lowest
    index on ties)."""

    def __init__(self, n: int) -> None:
        self.key: list[Any] = [None] * n
        self.count, self.last = [0] * n, [0] * n
        self.clock = 0

    def lookup(self, key: tuple[int, int]) -> bool:
        self.clock += 1
        if key not in self.key:
            return False
        s = self.key.index(key)
        self.count[s] += 1
        self.last[s] = self.clock
        return True

    def insert(self, key: tuple[int, int]) -> None:
        empty = [s for s, k in enumerate(self.key) if k is None]
        s = empty[0] if empty else min(range(len(self.key)), key=lambda i: (
            self.count[i] * LFRU_W + self.last[i], i))
        self.key[s], self.count[s], self.last[s] = key, 1, self.clock


def _model_counts(calls: list[tuple[int, list[int]]], n_slots: int) -> tuple[int, int]:
    if n_slots == 0:
        return 0, sum(len(e) for _, e in calls)
    c, hits, misses = _LFRU(n_slots), 0, 0
    for il, experts in calls:   # every lookup of a call first, then the misses' inserts
        missed = [e for e in experts if not c.lookup((il, e))]
        hits += len(experts) - len(missed)
        misses += len(missed)
        for e in missed:
            c.insert((il, e))
    return hits, misses


@pytest.mark.parametrize("arch", ARCHS)
def test_dev_cache_bitwise_and_counts(arch: str, monkeypatch: pytest.MonkeyPatch,
                                      converted: Callable[..., tuple[Path, Path]]
                                      ) -> None:
    ckpt, model_dir = converted(arch)
    plain, st0 = _run(model_dir, monkeypatch, None)
    assert st0["gpu_cache_hits"] == st0["gpu_cache_misses"] == 0
    layout = json.loads((model_dir / "packed_experts" / "layout.json").read_text())
    size = int(layout["expert_size"])
    calls = _routing(ckpt)
    n_expert = max(max(e) for _, e in calls) + 1
    cfg = json.loads((model_dir / "config.json").read_text())
    n_expert = (cfg.get("num_experts") or cfg.get("n_routed_experts") or
                cfg.get("num_local_experts") or n_expert)
    total = len({il for il, _ in calls}) * n_expert
    for frac in (0.0, 0.25, 1.0):
        got, st = _run(model_dir, monkeypatch, frac)
        assert np.array_equal(got, plain), f"{arch}: logits differ with the cache at {frac}"
        hits, misses = _model_counts(calls, int(frac * total))
        print(f"{arch} cache {frac}: {int(frac * total)} of {total} slots, {hits} hits, "
              f"{misses} misses")
        assert (st["gpu_cache_hits"], st["gpu_cache_misses"]) == (hits, misses), (
            f"{arch} cache {frac}: engine {st['gpu_cache_hits']} hits / "
            f"{st['gpu_cache_misses']} misses, model {hits} / {misses}")
        assert st["gpu_bytes_uploaded"] == misses * size
        assert st["expert_reads"] + st["cache_hits"] == misses   # only misses are read
    if total > 2 * 8:   # the routing repeats enough for the full cache to hit
        assert _model_counts(calls, total)[0] > 0


def test_dev_cache_bytes_and_args(monkeypatch: pytest.MonkeyPatch,
                                  converted: Callable[..., tuple[Path, Path]]) -> None:
    """gpu_cache as bytes rounds down to whole experts (here: one expert short of two
    gives one slot); bad values are ArgumentErrors."""
    import moeflux

    _, model_dir = converted("qwen3_moe")
    size = int(json.loads((model_dir / "packed_experts" / "layout.json").read_text())
               ["expert_size"])
    plain, _ = _run(model_dir, monkeypatch, None)
    got, st = _run(model_dir, monkeypatch, 2 * size - 1)
    assert np.array_equal(got, plain)
    assert st["gpu_cache_misses"] > 0 and st["gpu_bytes_uploaded"] == \
        st["gpu_cache_misses"] * size
    # mmap mode: the bytes are the mapping's, copied by upload instead of upload_async
    got, st = _run(model_dir, monkeypatch, 0.25, io_mode="mmap")
    assert np.array_equal(got, plain) and st["io_mode"] == "mmap"
    assert st["gpu_bytes_uploaded"] == st["gpu_cache_misses"] * size
    for bad in (-1, 1.5, -0.1, "half", True):
        with pytest.raises(moeflux.ArgumentError):
            moeflux.Model(model_dir, gpu_cache=bad)


def test_dev_cache_failed_read_leaves_no_entry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                               converted: Callable[..., tuple[Path, Path]]
                                               ) -> None:
    """A call whose reads fail part way (a layer file cut in half after open) must not
    leave slots in the cache that were reserved but never filled: the same context,
    once the file is whole again, gives the plain path's logits bit for bit. (With
    those slots kept, the retry hits them and computes on bytes never copied.)"""
    import shutil

    import moeflux

    _, src = converted("qwen3_moe")
    model_dir = tmp_path / "model"
    shutil.copytree(src, model_dir)
    plain, _ = _run(model_dir, monkeypatch, None)
    layer = sorted((model_dir / "packed_experts").glob("layer_*.bin"))[0]
    whole = layer.read_bytes()
    monkeypatch.setenv("MOEFLUX_TEST_DEV_CACHE", "1")
    with moeflux.Model(model_dir, threads=2, io_mode="pread", gpu_cache=1.0) as m:
        layer.write_bytes(whole[:len(whole) // 2])
        with pytest.raises(moeflux.MoefluxError, match=layer.name):
            m.eval(PROMPT, all_logits=True)
        layer.write_bytes(whole)
        rows = [m.eval(PROMPT, all_logits=True)]
        rows += [m.eval([t])[None, :] for t in CONT]
        assert m.stats()["gpu_cache_hits"] > 0
    assert np.array_equal(np.concatenate(rows), plain)
