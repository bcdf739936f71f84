"""Expert files larger than 4 GiB (every layer file of a real 397B / 671B model is),
read through the whole model in every I/O mode.

A converted synthetic deepseek_v3 model (8 experts of 1.7 MB) is rewritten as one of
2440 experts per MoE layer: each layer file is a sparse file of 4.3 GB (truncated to
size, the 8 real experts written with pwrite at their new offsets, one straddling
4 GiB and the others past it; the rest is a hole of zero bytes). The router grows to
match: the real experts keep their rows and correction biases at the new indices, the
others get bias -1e9, so noaux_tc routing (which selects on sigmoid score + bias and
weighs by the score alone) selects exactly the experts it did before, in the same
order. The logits must therefore match mlx-lm's float32 reference of the original
checkpoint (the CPU tier); had any expert been read from a wrong offset (e.g. one cut
to 32 bits), it would have come from the hole and the logits would differ. Every mode
must also give bitwise the same logits. The files take ~30 MB of disk.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import moeflux
from _helpers import CONT, PROMPT, assert_close, converted  # noqa: F401 (fixture)
from reference import reference_decode

# 4096 x 256 experts at 4 bits, group 64: 1,769,472 bytes (a multiple of 4096, so
# direct mode applies); 2^32 / that = 2427.3, so expert 2427 straddles 4 GiB.
OVERRIDES = {"moe_intermediate_size": 4096, "n_group": 1, "topk_group": 1}
N_BIG = 2440
NEW_INDEX = [2427, 2430, 2432, 2433, 2434, 2436, 2438, 2439]   # increasing: same order
ALIGN = 64


def _grow_router(name: str, t: dict[str, Any], data: bytes) -> tuple[bytes, list[int]]:
    """The router weight [8, hid] or correction bias [8] of one layer, spread over
    N_BIG experts (others: zero rows, bias -1e9)."""
    if name.endswith("mlp.gate.e_score_correction_bias"):
        assert t["dtype"] == "F32", t
        old = np.frombuffer(data, np.float32)
        new = np.full(N_BIG, -1e9, np.float32)
        new[NEW_INDEX] = old
        return new.tobytes(), [N_BIG]
    n, hid = t["shape"]
    width = len(data) // (n * hid)
    rows = np.frombuffer(data, np.uint8).reshape(n, hid * width)
    new = np.zeros((N_BIG, hid * width), np.uint8)
    new[NEW_INDEX] = rows
    return new.tobytes(), [N_BIG, hid]


def _rewrite_weights(src: Path, dst: Path) -> None:
    man = json.loads((src / "model_weights.json").read_text())
    tensors = man["tensors"]
    blob = (src / "model_weights.bin").read_bytes()
    out, off = bytearray(), 0
    for name in sorted(tensors, key=lambda k: tensors[k]["offset"]):
        t = dict(tensors[name])
        data = blob[t["offset"]:t["offset"] + t["size"]]
        if name.endswith(("mlp.gate.weight", "mlp.gate.e_score_correction_bias")):
            data, t["shape"] = _grow_router(name, t, data)
        off = (len(out) + ALIGN - 1) // ALIGN * ALIGN
        out += b"\0" * (off - len(out)) + data
        t["offset"], t["size"] = off, len(data)
        tensors[name] = t
    (dst / "model_weights.bin").write_bytes(bytes(out))
    (dst / "model_weights.json").write_text(json.dumps(man))


def _sparse_experts(src: Path, dst: Path) -> list[int]:
    """Layer files of N_BIG experts: holes, and the real experts at NEW_INDEX."""
    lay = json.loads((src / "packed_experts" / "layout.json").read_text())
    es, ne = lay["expert_size"], lay["num_experts"]
    assert ne == len(NEW_INDEX) and NEW_INDEX[0] * es < 2**32 < (NEW_INDEX[0] + 1) * es
    (dst / "packed_experts").mkdir()
    layers = lay["moe_layers"]
    for il in layers:
        name = f"layer_{il:02d}.bin"
        old = (src / "packed_experts" / name).read_bytes()
        fd = os.open(dst / "packed_experts" / name, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, N_BIG * es)
            for ie, new in enumerate(NEW_INDEX):
                blob = old[ie * es:(ie + 1) * es]
                assert os.pwrite(fd, blob, new * es) == es
        finally:
            os.close(fd)
    lay["num_experts"] = N_BIG
    (dst / "packed_experts" / "layout.json").write_text(json.dumps(lay))
    return layers


@pytest.fixture(scope="module")
def big_model(converted: Callable[..., tuple[Path, Path]],
              tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    ckpt, small = converted("deepseek_v3", **OVERRIDES)
    dst = tmp_path_factory.mktemp("bigfile") / "model"
    dst.mkdir()
    cfg = json.loads((small / "config.json").read_text())
    assert cfg["n_routed_experts"] == len(NEW_INDEX) and cfg["n_group"] == 1
    cfg["n_routed_experts"] = N_BIG
    (dst / "config.json").write_text(json.dumps(cfg))
    _rewrite_weights(small, dst)
    layers = _sparse_experts(small, dst)
    for il in layers:
        st = os.stat(dst / "packed_experts" / f"layer_{il:02d}.bin")
        assert st.st_size > 2**32, st.st_size
        if st.st_blocks * 512 > 2**30:
            pytest.skip(f"this file system stores holes ({st.st_blocks * 512} bytes "
                        "on disk for a sparse file)")
    yield ckpt, dst
    shutil.rmtree(dst)


def _run(path: Path, mode: str) -> tuple[np.ndarray, dict]:
    with moeflux.Model(path, threads=2, n_ctx=64, io_mode=mode) as m:
        rows = [m.eval(PROMPT)[None]]
        rows += [m.eval([t])[None] for t in CONT]
        return np.concatenate(rows), m.stats()


def test_experts_past_4gib_every_mode(big_model: tuple[Path, Path]) -> None:
    ckpt, path = big_model
    ref = reference_decode(ckpt, PROMPT, CONT)
    first = None
    for mode in ("pread", "mmap", "direct"):
        got, st = _run(path, mode)
        print(f"{mode}: in effect {st['io_mode']} ({st.get('io_fallback')})")
        assert_close(got, ref, f"experts past 4 GiB, {mode}")
        assert st["expert_bytes_read"] > 0 or st.get("expert_bytes_mapped", 0) > 0, st
        if first is None:
            first = got
        else:
            assert np.array_equal(got, first), f"{mode} differs from pread"
