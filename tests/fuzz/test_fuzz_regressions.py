"""Regression tests for the bugs the fuzzers of tests/fuzz/ found, outside the fuzzers
(each input is the minimized crash, written out; the expected behaviour is a clean
refusal naming the file and the problem)."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from moeflux.prep.safetensors_io import SafetensorsError, SafetensorsFile


def _file(tmp_path: Path, header: bytes, data: bytes = bytes(8)) -> Path:
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return p


@pytest.mark.parametrize("header, what", [
    # int(inf) raised OverflowError out of the parser
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,1e400]}}', "malformed"),
    (b'{"a":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,8]}}', "malformed"),
    # an unhashable dtype raised TypeError at the dtype lookup
    (b'{"a":{"dtype":["F32"],"shape":[2],"data_offsets":[0,8]}}', "malformed"),
    # a negative begin pointed the tensor into the header, and was accepted
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}}', "malformed"),
    # negative dimensions with a positive product were accepted
    (b'{"a":{"dtype":"F32","shape":[-1,-2],"data_offsets":[0,8]}}', "malformed"),
    # floats were truncated to integers
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8.5]}}', "malformed"),
    (b'{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', "malformed"),
    # deep nesting raised RecursionError out of json.loads
    (b"[" * 100000 + b"]" * 100000, "not JSON"),
])
def test_safetensors_header_refused(tmp_path: Path, header: bytes, what: str) -> None:
    with pytest.raises(SafetensorsError, match=what):
        SafetensorsFile(_file(tmp_path, header))


def test_safetensors_header_still_read(tmp_path: Path) -> None:
    """The checks refuse only what is wrong: a plain one-tensor file still opens."""
    hdr = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{}}'
    with SafetensorsFile(_file(tmp_path, hdr)) as f:
        t = f.tensors["a"]
        assert (t.dtype, t.shape, t.nbytes) == ("F32", (2,), 8)
