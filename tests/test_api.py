"""The Python API's error behaviour with real files on disk.

A tiny qwen3_next checkpoint in the mlx-community layout is written by
moeflux.prep.synth and converted by moeflux.prep.convert; each test corrupts a copy
(missing or truncated files, edited JSON) and checks that loading or evaluating raises
the documented exception class with a message naming the file or tensor at fault, and
that a failed call leaves the sequence unchanged. Numerical agreement with mlx-lm is
tested per architecture elsewhere (test_qwen3_next.py, ...).
"""
from __future__ import annotations

import json
import pickle
import shutil
import threading
import time
import _thread
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import moeflux
from _helpers import run_in_threads
from moeflux import (AbortedError, ArgumentError, BackendError, FormatError,
                     MoefluxError, MoefluxIOError, ShapeError)
from moeflux.prep.convert import convert


@pytest.fixture(scope="module")
def model_dir(synth_checkpoint: Callable[..., Path],
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted tiny qwen3_next model directory (shared, never modified)."""
    src = synth_checkpoint("qwen3_next")
    return convert(src, tmp_path_factory.mktemp("api") / "qwen3_next", progress=False)


@pytest.fixture
def copy_dir(model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the model directory for a test to corrupt."""
    dst = tmp_path / "model"
    shutil.copytree(model_dir, dst)
    return dst


def _edit_json(path: Path, fn: Callable[[Any], Any]) -> None:
    """Rewrite the JSON file at `path` after `fn` mutated its parsed content."""
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _raises(cls: type, path: Path, *needles: str, **kw: Any) -> BaseException:
    with pytest.raises(cls) as info:
        moeflux.Model(path, threads=1, **kw)
    msg = str(info.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return info.value


# ---- exception classes

def test_exception_hierarchy() -> None:
    assert issubclass(MoefluxIOError, OSError) and issubclass(MoefluxIOError, MoefluxError)
    assert issubclass(ShapeError, FormatError) and issubclass(FormatError, ValueError)
    assert issubclass(ArgumentError, ValueError) and issubclass(ArgumentError, MoefluxError)
    assert issubclass(moeflux.MoefluxMemoryError, MemoryError)
    for name in ("StateError", "UnsupportedError", "BackendError", "AbortedError"):
        assert issubclass(getattr(moeflux, name), MoefluxError)
    assert moeflux.__version__ == "0.1.0" == moeflux._core.version


# ---- loading: missing and short files

def test_missing_dir(tmp_path: Path) -> None:
    err = _raises(MoefluxIOError, tmp_path / "nope", "nope")
    assert isinstance(err, OSError)


def test_missing_config(copy_dir: Path) -> None:
    (copy_dir / "config.json").unlink()
    _raises(MoefluxIOError, copy_dir, "config.json")


def test_corrupt_config(copy_dir: Path) -> None:
    p = copy_dir / "config.json"
    p.write_text(p.read_text()[:-40])
    _raises(FormatError, copy_dir, "config.json", "byte")


def test_unknown_model_type(copy_dir: Path) -> None:
    _edit_json(copy_dir / "config.json", lambda c: c.update(model_type="llama"))
    _raises(FormatError, copy_dir, "llama", "qwen3_next", "deepseek_v3")


def test_non_affine_quantization(copy_dir: Path) -> None:
    _edit_json(copy_dir / "config.json", lambda c: c["quantization"].update(mode="mxfp4"))
    _raises(FormatError, copy_dir, "mxfp4", "config.json")


def test_missing_required_key(copy_dir: Path) -> None:
    _edit_json(copy_dir / "config.json", lambda c: c.pop("num_attention_heads"))
    _raises(FormatError, copy_dir, "num_attention_heads")


def test_missing_weights_bin(copy_dir: Path) -> None:
    (copy_dir / "model_weights.bin").unlink()
    _raises(MoefluxIOError, copy_dir, "model_weights.bin")


def test_tensor_past_end_of_bin(copy_dir: Path) -> None:
    """A truncated model_weights.bin: the tensor that no longer fits is named."""
    manifest = json.loads((copy_dir / "model_weights.json").read_text())
    last = max(manifest["tensors"], key=lambda n: manifest["tensors"][n]["offset"])
    bin_path = copy_dir / "model_weights.bin"
    with open(bin_path, "r+b") as f:
        f.truncate(manifest["tensors"][last]["offset"] + 1)
    _raises(MoefluxIOError, copy_dir, last, "model_weights.bin")


def test_manifest_offset_past_bin(copy_dir: Path) -> None:
    size = (copy_dir / "model_weights.bin").stat().st_size
    _edit_json(copy_dir / "model_weights.json",
               lambda m: m["tensors"]["model.norm.weight"].update(offset=size))
    _raises(MoefluxIOError, copy_dir, "model.norm.weight")


def test_manifest_size_disagrees_with_shape(copy_dir: Path) -> None:
    _edit_json(copy_dir / "model_weights.json",
               lambda m: m["tensors"]["model.norm.weight"].update(size=2))
    _raises(ShapeError, copy_dir, "model.norm.weight")


def test_tensor_shape_disagrees_with_config(copy_dir: Path) -> None:
    """A tensor consistent with the bin but not with config.json (hidden_size)."""
    def halve(m: dict) -> None:
        t = m["tensors"]["model.norm.weight"]
        t["shape"] = [t["shape"][0] // 2]
        t["size"] //= 2
    _edit_json(copy_dir / "model_weights.json", halve)
    _raises(ShapeError, copy_dir, "model.norm.weight")


def test_tensor_missing_from_manifest(copy_dir: Path) -> None:
    def drop(m: dict) -> None:
        del m["tensors"]["model.norm.weight"]
        m["num_tensors"] -= 1
    _edit_json(copy_dir / "model_weights.json", drop)
    _raises(MoefluxError, copy_dir, "model.norm.weight")


def test_quantized_bits_disagree_with_config(copy_dir: Path) -> None:
    """The router is stored at 8 bits; a config saying 4 must be refused."""
    def drop_override(c: dict) -> None:
        for key in list(c["quantization"]):
            if key.endswith("layers.0.mlp.gate"):
                del c["quantization"][key]
    _edit_json(copy_dir / "config.json", drop_override)
    _raises(ShapeError, copy_dir, "model.layers.0.mlp.gate", "8")


def test_corrupt_manifest(copy_dir: Path) -> None:
    (copy_dir / "model_weights.json").write_text('{"tensors": {"a": 1,}}')
    _raises(FormatError, copy_dir, "model_weights.json")


def test_short_expert_file(copy_dir: Path) -> None:
    p = copy_dir / "packed_experts" / "layer_01.bin"
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 1)
    _raises(MoefluxIOError, copy_dir, "layer_01.bin")


def test_missing_expert_file(copy_dir: Path) -> None:
    (copy_dir / "packed_experts" / "layer_02.bin").unlink()
    _raises(MoefluxIOError, copy_dir, "layer_02.bin")


def test_missing_expert_dir(copy_dir: Path) -> None:
    shutil.rmtree(copy_dir / "packed_experts")
    _raises(MoefluxIOError, copy_dir, "packed_experts")


def test_layout_disagrees_with_config(copy_dir: Path) -> None:
    _edit_json(copy_dir / "packed_experts" / "layout.json",
               lambda l: l.update(num_experts=l["num_experts"] // 2))
    _raises(MoefluxError, copy_dir, "layout.json", "num_experts")


def test_layout_component_outside_expert(copy_dir: Path) -> None:
    def grow(l: dict) -> None:
        l["components"][-1]["offset"] = l["expert_size"]
    _edit_json(copy_dir / "packed_experts" / "layout.json", grow)
    _raises(FormatError, copy_dir, "layout.json", "down_proj.biases")


def test_unknown_backend(model_dir: Path) -> None:
    _raises(BackendError, model_dir, "nosuch", backend="nosuch")


def test_bad_context_args(model_dir: Path) -> None:
    with pytest.raises(ArgumentError, match="n_ctx"):
        moeflux.Model(model_dir, n_ctx=10**9)
    with pytest.raises(ArgumentError):
        moeflux.Model(model_dir, threads=0)


# ---- evaluation

@pytest.fixture(scope="module")
def model(model_dir: Path) -> moeflux.Model:
    m = moeflux.Model(model_dir, threads=1, n_ctx=16)
    yield m
    m.close()


def test_facts(model: moeflux.Model, model_dir: Path) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    assert model.config == cfg
    assert model.path == model_dir
    assert model.n_vocab == cfg["vocab_size"] and model.n_ctx == 16
    assert model.n_layer == cfg["num_hidden_layers"] and model.arch == "qwen3_next"
    assert "qwen3_next" in repr(model)


def test_bad_token_ids(model: moeflux.Model) -> None:
    model.reset()
    model.eval([1, 2])
    for bad in ([model.n_vocab], [3, -1], [2**31], []):
        with pytest.raises(ArgumentError):
            model.eval(bad)
        assert model.n_past == 2, "a failed eval must leave the sequence unchanged"
    with pytest.raises(ArgumentError, match="vocabulary"):
        model.eval(np.array([0, model.n_vocab], dtype=np.int32))
    with pytest.raises(TypeError):
        model.eval([1.5])
    with pytest.raises(ArgumentError, match="dimension"):
        model.eval(np.zeros((2, 2), dtype=np.int32))
    assert model.n_past == 2


def test_eval_past_n_ctx(model: moeflux.Model) -> None:
    model.reset()
    model.eval(list(range(10)))
    with pytest.raises(ArgumentError, match="n_ctx"):
        model.eval(list(range(7)))
    assert model.n_past == 10
    model.eval(list(range(6)))
    assert model.n_past == 16
    with pytest.raises(ArgumentError):
        model.eval([1])
    # Too long with all_logits: refused for n_ctx before any n_tokens x n_vocab output
    # is allocated (2**26 x vocab floats would be a MemoryError instead).
    model.reset()
    with pytest.raises(ArgumentError, match="n_ctx"):
        model.eval(np.zeros(1 << 26, dtype=np.int32), all_logits=True)
    assert model.n_past == 0


def test_token_inputs_and_shapes(model: moeflux.Model) -> None:
    """int32 buffer, int64 array, list and int inputs all evaluate the same tokens."""
    outs = []
    for toks in ([5, 6, 7], np.array([5, 6, 7], dtype=np.int32),
                 np.array([5, 6, 7], dtype=np.int64), (5, 6, 7)):
        model.reset()
        outs.append(model.eval(toks))
        assert model.n_past == 3
    for o in outs:
        assert o.dtype == np.float32 and o.shape == (model.n_vocab,)
        np.testing.assert_array_equal(o, outs[0])
    model.reset()
    full = model.eval([5, 6, 7], all_logits=True)
    assert full.shape == (3, model.n_vocab) and full.dtype == np.float32
    assert model.eval(8).shape == (model.n_vocab,) and model.n_past == 4


def test_stats(model: moeflux.Model) -> None:
    model.reset()
    model.stats_reset()
    model.eval([1, 2, 3])
    s = model.stats()
    assert s["n_tokens_evaluated"] == 3
    assert s["expert_reads"] > 0 and s["expert_bytes_read"] > 0 and s["compute_s"] > 0
    # Phases of the eval: each was entered (every layer of this model has a mixer and
    # a MoE FFN with a shared expert), and together they are the eval's time, less
    # the few steps outside any phase (checks, the call itself).
    phases = ["attention_s", "routing_s", "io_wait_s", "experts_s", "shared_s", "head_s"]
    assert all(s[k] > 0 for k in phases), {k: s[k] for k in phases}
    assert s["io_wait_s"] == s["expert_read_s"]
    total = sum(s[k] for k in phases)
    assert total <= s["compute_s"] * (1 + 1e-9), (total, s["compute_s"])
    assert total >= 0.5 * s["compute_s"], (total, s["compute_s"])


def test_closed_model(model_dir: Path) -> None:
    m = moeflux.Model(model_dir, threads=1)
    m.eval([1])
    m.close()
    m.close()  # idempotent
    assert m.closed
    for call in (lambda: m.eval([1]), m.reset, m.stats, lambda: m.n_past):
        with pytest.raises(ValueError, match="closed"):
            call()
    assert "closed" in repr(m)
    with moeflux.Model(model_dir, threads=1) as m2:
        m2.eval([1])
    with pytest.raises(ValueError, match="closed"):
        m2.eval([1])


def test_pickle_refused(model: moeflux.Model) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(model)
    with pytest.raises(TypeError):
        pickle.dumps(model._ctx)


def test_shared_model(model_dir: Path) -> None:
    """Two sequences on one loaded model are independent."""
    with moeflux.Model(model_dir, threads=1) as a:
        b = moeflux.Model.share(a)
        ref = a.eval([3, 4, 5])
        b.eval([9])
        np.testing.assert_array_equal(b.eval([7]).shape, (a.n_vocab,))
        a.reset()
        np.testing.assert_array_equal(a.eval([3, 4, 5]), ref)
        assert b.n_past == 2
        assert b.config == a.config and b.config is not a.config
    # The first Model closed: the shared model stays loaded for the second.
    assert b.eval([1]).shape == (b.n_vocab,) and b.n_past == 3
    b.close()


# ---- interruption

def _long_eval(m: moeflux.Model, act: Callable[[], None], delay_s: float) -> BaseException:
    """Run a long prefill (4000 tokens: about a second, attention being quadratic)
    while `act` fires from another thread every millisecond, starting `delay_s` after
    the eval is about to begin; return what the eval raised."""
    tokens = (np.arange(4000) % m.n_vocab).astype(np.int32)
    started = threading.Event()
    done = threading.Event()

    def fire() -> None:
        started.wait()
        time.sleep(delay_s)
        while not done.is_set():
            act()
            time.sleep(0.001)

    t = threading.Thread(target=fire)
    t.start()
    try:
        with pytest.raises(BaseException) as info:
            started.set()
            m.eval(tokens)
    finally:
        done.set()
        t.join()
    return info.value


def test_abort_from_thread(model_dir: Path) -> None:
    with moeflux.Model(model_dir, threads=1) as m:
        m.eval([1, 2])
        # Aborts that land before the eval starts are cleared by it; later ones stop it.
        err = _long_eval(m, m.abort, 0.0)
        assert isinstance(err, AbortedError)
        assert m.n_past == 2, "an aborted eval leaves the sequence unchanged"
        assert m.eval([3]).shape == (m.n_vocab,) and m.n_past == 3


def test_ctrl_c(model_dir: Path, sigint_raises_keyboardinterrupt) -> None:
    with moeflux.Model(model_dir, threads=1) as m:
        fired = []

        def interrupt() -> None:
            if not fired:
                fired.append(1)
                _thread.interrupt_main()

        err = _long_eval(m, interrupt, 0.05)
        assert isinstance(err, KeyboardInterrupt)
        assert m.n_past == 0
        assert m.eval([3]).shape == (m.n_vocab,) and m.n_past == 1


# ---- expert variants and threads

def test_use_2bit_selection(copy_dir: Path) -> None:
    _raises(MoefluxIOError, copy_dir, "packed_experts_2bit", use_2bit=1)
    _raises(ArgumentError, copy_dir, "use_2bit", use_2bit=5)
    with moeflux.Model(copy_dir, threads=1, use_2bit=-1) as m:  # 4-bit present: used
        assert m.eval([1]).shape == (m.n_vocab,)
    (copy_dir / "packed_experts").rename(copy_dir / "packed_experts_2bit")
    _raises(MoefluxIOError, copy_dir, "packed_experts", use_2bit=0)


def test_concurrent_contexts(model_dir: Path) -> None:
    """Two threads driving two sequences over one loaded model get what each gets
    alone (contexts share only the immutable model)."""
    seqs = [[1, 2, 3, 4, 5, 6], [9, 8, 7, 6, 5, 4]]
    with moeflux.Model(model_dir, threads=1) as base:
        alone = []
        for s in seqs:
            base.reset()
            alone.append([base.eval([t]) for t in s])
        models = [moeflux.Model.share(base, threads=1) for _ in seqs]
        results: list[list[np.ndarray]] = [[], []]

        def run(i: int) -> None:
            for _ in range(3):
                models[i].reset()
                results[i] = [models[i].eval([t]) for t in seqs[i]]

        run_in_threads(run, 2)
        for i in range(2):
            for a, b in zip(alone[i], results[i]):
                np.testing.assert_array_equal(a, b)
            models[i].close()
