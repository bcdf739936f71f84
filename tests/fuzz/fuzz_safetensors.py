"""Fuzz prep's safetensors header parser (moeflux.prep.safetensors_io).

Each input is a whole .safetensors file (and, framed, a header; see test_one), written
to a memfd and opened through its
/proc/self/fd path with SafetensorsFile, exactly as prep opens a shard. The parser may
refuse it only with SafetensorsError; anything else escaping is a bug. An accepted file
must describe what prep relies on: a known dtype, non-negative dimensions, and each
tensor's bytes inside the data section (after the header, before the end of the file)
with exactly numel x dtype size bytes.

Run under atheris with libFuzzer flags (``python fuzz_safetensors.py -max_total_time=20
CORPUS...``); without flags, or where atheris is not installed, it replays the files
and directories given once each (so the corpus always runs).
"""
from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

try:
    import atheris
except ImportError:  # replay mode only
    atheris = None

def _load_parser():
    """prep/safetensors_io.py by path: it needs only numpy, and importing the moeflux
    package would need its compiled core (absent where only the fuzzer runs)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "prep" / "safetensors_io.py"
    spec = importlib.util.spec_from_file_location("safetensors_io", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["safetensors_io"] = mod  # dataclasses look the module up by name
    spec.loader.exec_module(mod)
    return mod


st = _load_parser()

if atheris is not None:
    # Coverage of the parser's own module only (instrumenting numpy would cost seconds
    # at start and dilute the feedback).
    atheris.instrument_func(st.SafetensorsFile._parse_header)


def check_accepted(f: "st.SafetensorsFile", size: int) -> None:
    (hlen,) = struct.unpack("<Q", os.pread(f.fileno(), 8, 0))
    data_start = 8 + hlen
    for name, t in f.tensors.items():
        if t.dtype not in st.DTYPE_SIZES:
            raise AssertionError(f"{name}: dtype {t.dtype!r} accepted")
        if any(d < 0 for d in t.shape):
            raise AssertionError(f"{name}: negative dimension in {t.shape}")
        if not data_start <= t.begin <= t.end <= size:
            raise AssertionError(f"{name}: bytes [{t.begin}, {t.end}) outside the data "
                                 f"section [{data_start}, {size})")
        if t.nbytes != t.numel * st.DTYPE_SIZES[t.dtype]:
            raise AssertionError(f"{name}: {t.nbytes} bytes for {t.numel} elements")


def test_one(data: bytes) -> None:
    """The input as a whole file, then framed: the input as the JSON header, after its
    true length and before DATA_BYTES of data (a mutated header rarely keeps the length
    prefix of a whole file right, which would stop the fuzzer at the first check)."""
    test_file(data)
    test_file(struct.pack("<Q", len(data)) + data + bytes(DATA_BYTES))


DATA_BYTES = 64


def test_file(data: bytes) -> None:
    fd = os.memfd_create("fuzz.safetensors")
    try:
        os.write(fd, data)
        try:
            f = st.SafetensorsFile(f"/proc/self/fd/{fd}")
        except st.SafetensorsError:
            return
        with f:
            check_accepted(f, len(data))
    finally:
        os.close(fd)


def replay(paths: list[str]) -> int:
    n = 0
    for p in map(Path, paths):
        for q in sorted(p.iterdir()) if p.is_dir() else [p]:
            if q.is_file():
                test_one(q.read_bytes())
                n += 1
    print(f"fuzz_safetensors: replayed {n} input(s)")
    return 0


def main() -> int:
    flags = [a for a in sys.argv[1:] if a.startswith("-")]
    if atheris is None or not flags:
        return replay([a for a in sys.argv[1:] if not a.startswith("-")])
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
