"""Model(path, verify=True): every file moeflux.json lists is hashed before anything is
opened. A flipped byte in the dense weights or in an expert layer file is refused with
ChecksumError naming the file and both sums (the actual one recomputed here with
hashlib, independently of moeflux), nothing is left open, an intact model opens and
evaluates as without verification, and the default does no hashing at all.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import moeflux
from moeflux import ChecksumError, FormatError, MoefluxIOError, ArgumentError
from _helpers import PROMPT, converted  # noqa: F401 (fixture)

ARCH = "qwen3_moe"


@pytest.fixture
def model_copy(converted: Callable[..., tuple[Path, Path]], tmp_path: Path) -> Path:
    """A private copy of a converted model directory (the session's copy stays intact)."""
    _, dst = converted(ARCH)
    return Path(shutil.copytree(dst, tmp_path / "model"))


def _sums(path: Path) -> dict[str, str]:
    return json.loads((path / "moeflux.json").read_text())["checksums"]


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def _fds_into(path: Path) -> list[str]:
    """Open file descriptors of this process that point into ``path``."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(path)):
            out.append(target)
    return out


def _check_refused(model: Path, rel: str) -> None:
    target = model / rel
    _flip(target, target.stat().st_size // 2)
    want = _sums(model)[rel]
    actual = "sha256:" + hashlib.sha256(target.read_bytes()).hexdigest()
    assert actual != want
    with pytest.raises(ChecksumError) as ei:
        moeflux.Model(model, threads=1, verify=True)
    err = ei.value
    assert str(target) in str(err) and want in str(err) and actual in str(err), str(err)
    assert (err.file, err.expected, err.actual) == (str(target), want, actual)
    assert isinstance(err, FormatError)
    assert _fds_into(model) == [], "a refused verify left files open"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_flipped_byte_in_weights(model_copy: Path) -> None:
    _check_refused(model_copy, "model_weights.bin")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_flipped_byte_in_expert_file(model_copy: Path) -> None:
    rel = sorted(k for k in _sums(model_copy) if k.startswith("packed_experts/layer_"))
    assert rel, "the converted model lists no expert layer files"
    _check_refused(model_copy, rel[-1])


def test_intact_model_opens_with_progress(model_copy: Path) -> None:
    calls: list[tuple[int, int]] = []
    listed = _sums(model_copy)
    total = sum((model_copy / rel).stat().st_size for rel in listed)
    with moeflux.Model(model_copy, threads=1,
                       verify=lambda done, tot: calls.append((done, tot))) as m:
        got = m.eval(PROMPT)
    assert calls and calls[-1] == (total, total), (calls[-1:], total)
    assert all(a[0] < b[0] for a, b in zip(calls, calls[1:])), "progress went backwards"
    with moeflux.Model(model_copy, threads=1) as m:
        assert np.array_equal(m.eval(PROMPT), got)
    with moeflux.Model(model_copy, threads=1, verify=True) as m:   # the tqdm bar
        assert m.n_vocab == got.shape[0]


def test_default_reads_no_checksums(model_copy: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """verify=False (the default) hashes nothing: a damaged file opens (the damage is
    found only when used) and the hashing function is never called."""
    from moeflux.prep import checksums

    def boom(*a: object, **k: object) -> str:
        raise AssertionError("hashed a file without verify=True")

    monkeypatch.setattr(checksums, "sha256_file", boom)
    _flip(model_copy / "model_weights.bin", 0)
    with moeflux.Model(model_copy, threads=1) as m:
        assert m.n_past == 0
    with pytest.raises(AssertionError, match="without verify"):
        moeflux.Model(model_copy, threads=1, verify=True)


def test_missing_manifest_and_files(model_copy: Path) -> None:
    listed = sorted(_sums(model_copy))
    (model_copy / listed[0]).unlink()
    with pytest.raises(MoefluxIOError, match=f"{listed[0]}: missing"):
        moeflux.Model(model_copy, threads=1, verify=True)
    (model_copy / "moeflux.json").unlink()
    with pytest.raises(MoefluxIOError, match="moeflux.json"):
        moeflux.Model(model_copy, threads=1, verify=True)


def test_no_checksums_and_bad_argument(model_copy: Path) -> None:
    info = json.loads((model_copy / "moeflux.json").read_text())
    del info["checksums"]
    (model_copy / "moeflux.json").write_text(json.dumps(info))
    with pytest.raises(FormatError, match="checksums"):
        moeflux.Model(model_copy, threads=1, verify=True)
    with pytest.raises(ArgumentError, match="verify"):
        moeflux.Model(model_copy, threads=1, verify="yes")


def test_unused_expert_set_is_not_hashed(model_copy: Path) -> None:
    """Files of the expert directory not in use are skipped: a damaged 2-bit set does
    not stop a model that reads the 4-bit one."""
    info = json.loads((model_copy / "moeflux.json").read_text())
    info["checksums"]["packed_experts_2bit/layer_00.bin"] = "sha256:" + "0" * 64
    (model_copy / "moeflux.json").write_text(json.dumps(info))
    with moeflux.Model(model_copy, threads=1, verify=True, use_2bit=False) as m:
        assert m.n_past == 0
