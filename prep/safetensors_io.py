"""Bounded-memory safetensors reading and streaming writing.

The container (8-byte little-endian header length, a JSON header, then raw row-major
tensor data) is simple enough to handle directly, and doing so lets prep work on
checkpoints of hundreds of GB on a machine with a few GB of RAM: the reader never
loads a shard, it ``pread``s the byte ranges asked for; the writer lays the header out
first and then takes tensor data in pieces. It also keeps BF16 as raw 16-bit words,
which numpy has no dtype for.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

DTYPE_SIZES = {"U32": 4, "F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I32": 4,
               "I64": 8, "F64": 8, "U16": 2, "I16": 2, "I8": 1, "BOOL": 1}
# numpy views of each dtype's raw data (BF16 as its raw uint16 words).
NUMPY_VIEWS = {"U32": np.uint32, "F32": np.float32, "F16": np.float16,
               "BF16": np.uint16, "U8": np.uint8, "I32": np.int32, "I64": np.int64,
               "F64": np.float64, "U16": np.uint16, "I16": np.int16, "I8": np.int8,
               "BOOL": np.bool_}

MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file is malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``path`` bytes [begin, end) hold it, row-major."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _header_entry(path: Path, name: str, ent: object) -> tuple[str, tuple[int, ...],
                                                              int, int]:
    """dtype, shape and data offsets of one header entry, checked to be what the format
    says: a string and non-negative integers (JSON floats, Infinity, negative offsets
    before the data section or negative dimensions are refused, not coerced)."""
    def count(v: object) -> bool:
        return type(v) is int and v >= 0

    if (not isinstance(ent, dict) or not isinstance(ent.get("dtype"), str)
            or not isinstance(ent.get("shape"), list)
            or not isinstance(ent.get("data_offsets"), list)
            or len(ent["data_offsets"]) != 2
            or not all(map(count, ent["shape"] + ent["data_offsets"]))):
        raise SafetensorsError(f"{path}: tensor {name!r}: malformed header entry "
                               f"{repr(ent)[:200]} (needs a dtype string, a shape and two "
                               "data_offsets of non-negative integers)")
    b, e = ent["data_offsets"]
    return ent["dtype"], tuple(ent["shape"]), b, e


class SafetensorsFile:
    """One .safetensors file opened for ranged reads (no mapping of the data)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self.file_size = os.fstat(self._fd).st_size
            self.metadata, self.tensors = self._parse_header()
        except BaseException:
            os.close(self._fd)
            raise

    def _parse_header(self) -> tuple[dict, dict[str, TensorInfo]]:
        if self.file_size < 8:
            raise SafetensorsError(f"{self.path}: {self.file_size} bytes, too short for "
                                   "a safetensors header")
        (hlen,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        if hlen > MAX_HEADER_BYTES or 8 + hlen > self.file_size:
            raise SafetensorsError(f"{self.path}: header length {hlen} does not fit the "
                                   f"file of {self.file_size} bytes")
        raw = os.pread(self._fd, hlen, 8)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise SafetensorsError(f"{self.path}: header is not JSON: {exc}") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: header is not a JSON object")
        data_start = 8 + hlen
        metadata = header.pop("__metadata__", {}) or {}
        tensors: dict[str, TensorInfo] = {}
        for name, ent in header.items():
            dtype, shape, b, e = _header_entry(self.path, name, ent)
            if dtype not in DTYPE_SIZES:
                raise SafetensorsError(f"{self.path}: tensor {name!r}: unknown dtype "
                                       f"{dtype!r}")
            info = TensorInfo(name, dtype, shape, self.path, data_start + b,
                              data_start + e)
            want = info.numel * DTYPE_SIZES[dtype]
            if e < b or info.nbytes != want or info.end > self.file_size:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r}: data_offsets [{b}, {e}) hold "
                    f"{e - b} bytes inside a file of {self.file_size}; shape {list(shape)}"
                    f" {dtype} needs {want}")
            tensors[name] = info
        return metadata, tensors

    def read(self, info: TensorInfo, start: int = 0, length: int | None = None) -> bytes:
        """Bytes [start, start+length) of a tensor's data (default: all of it)."""
        if length is None:
            length = info.nbytes - start
        if start < 0 or length < 0 or start + length > info.nbytes:
            raise ValueError(f"{info.name}: range [{start}, {start + length}) outside "
                             f"{info.nbytes} bytes")
        return pread_exact(self._fd, length, info.begin + start, self.path)

    def fileno(self) -> int:
        """The open descriptor, for callers that scatter-read (os.preadv) themselves."""
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def pread_exact(fd: int, length: int, offset: int, path: Path) -> bytes:
    """pread that loops over short reads and fails loudly at end of file."""
    parts = []
    got = 0
    while got < length:
        chunk = os.pread(fd, min(length - got, 1 << 30), offset + got)
        if not chunk:
            raise OSError(f"{path}: short read at offset {offset + got} "
                          f"({got} of {length} bytes)")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts) if len(parts) != 1 else parts[0]


class Checkpoint:
    """All tensors of a checkpoint directory (sharded or single-file).

    Uses ``model.safetensors.index.json`` when present (every file it names must exist
    and hold the tensors it maps), else every ``model*.safetensors`` file, as mlx-lm's
    loader does.
    """

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.files: dict[Path, SafetensorsFile] = {}
        self.tensors: dict[str, TensorInfo] = {}
        index = self.dir / "model.safetensors.index.json"
        try:
            if index.exists():
                self._open_from_index(index)
            else:
                paths = sorted(self.dir.glob("model*.safetensors"))
                if not paths:
                    raise FileNotFoundError(f"{self.dir}: no model*.safetensors files "
                                            "and no model.safetensors.index.json")
                for p in paths:
                    self._add_file(p)
        except BaseException:
            self.close()
            raise

    def _open_from_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (KeyError, json.JSONDecodeError) as exc:
            raise SafetensorsError(f"{index}: not a safetensors index ({exc})") from None
        for fname in sorted(set(weight_map.values())):
            self._add_file(self.dir / fname)
        for name, fname in weight_map.items():
            if name not in self.tensors:
                raise SafetensorsError(f"{index}: maps {name!r} to {fname}, which does "
                                       "not hold it")

    def _add_file(self, path: Path) -> None:
        f = SafetensorsFile(path)
        self.files[path] = f
        for name, info in f.tensors.items():
            if name in self.tensors:
                raise SafetensorsError(f"tensor {name!r} appears in both "
                                       f"{self.tensors[name].path} and {path}")
            self.tensors[name] = info

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.dir}: no tensor {name!r}") from None

    def read(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        info = self.info(name)
        return self.files[info.path].read(info, start, length)

    def array(self, name: str) -> np.ndarray:
        """Whole tensor as numpy (BF16 as raw uint16). For small tensors only."""
        info = self.info(name)
        buf = self.read(name)
        return np.frombuffer(buf, dtype=NUMPY_VIEWS[info.dtype]).reshape(info.shape)

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bf16_to_f32(words: np.ndarray) -> np.ndarray:
    """Raw bf16 words -> float32 (exact)."""
    return (words.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> raw bf16 words, round to nearest even (as mlx's astype does)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + 0x7FFF
    out = ((u + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


class SafetensorsWriter:
    """Streaming writer: the header (all names, dtypes, shapes) is fixed up front, then
    each tensor's bytes arrive in order, in as many pieces as the caller likes, so no
    tensor needs to be whole in memory. Writes to ``path`` + ".tmp" and renames on
    ``close()`` once every byte is there."""

    def __init__(self, path: str | os.PathLike,
                 specs: Iterable[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.order: list[tuple[str, int]] = []
        header: dict = {"__metadata__": metadata or {"format": "mlx"}}
        off = 0
        for name, dtype, shape in specs:
            n = DTYPE_SIZES[dtype]
            for d in shape:
                n *= int(d)
            header[name] = {"dtype": dtype, "shape": [int(d) for d in shape],
                            "data_offsets": [off, off + n]}
            self.order.append((name, n))
            off += n
        self.data_bytes = off
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._f = open(self.tmp, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._i = 0
        self._left = self.order[0][1] if self.order else 0

    def write(self, name: str, data: bytes | np.ndarray) -> None:
        """Append bytes of tensor ``name`` (must be the current one, in order)."""
        if isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data).tobytes()
        while self._i < len(self.order) and self._left == 0:
            self._advance()
        if self._i >= len(self.order) or self.order[self._i][0] != name:
            expect = self.order[self._i][0] if self._i < len(self.order) else None
            raise ValueError(f"{self.path}: got data for {name!r}, expected {expect!r}")
        if len(data) > self._left:
            raise ValueError(f"{self.path}: {name!r}: {len(data)} bytes given, "
                             f"{self._left} left")
        self._f.write(data)
        self._left -= len(data)

    def _advance(self) -> None:
        self._i += 1
        if self._i < len(self.order):
            self._left = self.order[self._i][1]

    def close(self) -> None:
        while self._i < len(self.order) and self._left == 0:
            self._advance()
        if self._i < len(self.order):
            self.abort()
            raise ValueError(f"{self.path}: closed before tensor "
                             f"{self.order[self._i][0]!r} was complete")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


def iter_chunks(length: int, chunk: int) -> Iterator[tuple[int, int]]:
    """(start, size) pieces covering [0, length)."""
    start = 0
    while start < length:
        n = min(chunk, length - start)
        yield start, n
        start += n
