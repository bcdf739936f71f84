"""extract-weights: every non-expert tensor of an MLX checkpoint -> model_weights.bin
+ model_weights.json (the resident part of the model; DESIGN.md "on-disk contract",
reference-system §2.1).

Tensors are laid out in sorted order of their original names, each at the next 64-byte
boundary with zero padding, bytes copied verbatim (the engine reads the MLX format
directly), except ``*.linear_attn.A_log`` which is widened to F32 because the engine
reads it as f32 whatever the source stored. Skipped: MTP heads, vision towers and the
routed experts (those go to packed_experts/, see repack_experts.py).

    python -m moeflux.prep extract-weights SRC DST [--no-progress]
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeflux.errors import FormatError, MoefluxIOError, ShapeError
from moeflux.prep._common import (Command, add_src_dst_arguments, FLOAT_DTYPES,
                                  BufferPool, CopyFile, DirLock, HashedFile, Journal,
                                  SourceMaps, kernel_copy_works, Progress, Quant,
                                  Source, StepResult, check_disk, expert_key,
                                  json_bytes, layer_of, nbytes_of, preadv_exact,
                                  source_key, strip_name, tensor_fd, write_small_file,
                                  CHUNK_BYTES)
from moeflux.prep.safetensors_io import TensorInfo

ALIGN = 64
# Tensors up to this size are prefetched in file order before the bin is written.
PREFETCH_MAX_BYTES = 4 << 20
# Copy tensors inside the kernel (os.sendfile) where the platform can; the buffered
# path is the portable fallback.
USE_KERNEL_COPY = True
BIN_NAME = "model_weights.bin"
JSON_NAME = "model_weights.json"


@dataclass
class WeightEntry:
    """One tensor of model_weights.bin: where it comes from and where it goes."""

    src_name: str
    name: str            # manifest name (language_model. stripped)
    info: TensorInfo
    dtype: str           # output dtype (F32 for a widened A_log)
    shape: tuple[int, ...]
    size: int            # output bytes
    offset: int = 0
    quant: Quant | None = None
    widen: bool = False


def is_skipped(src: Source, name: str) -> bool:
    """Tensors the engine never reads: MTP heads, vision towers, and (families whose
    prep rules say so: DeepSeek, GLM) the extra MTP layers numbered past
    num_hidden_layers, which mlx-lm drops too."""
    short = strip_name(name)
    if short.startswith(("mtp.", "model.mtp.")) or ".mtp." in short:
        return True
    if short.startswith(("vision_tower", "model.visual", "visual.")) or \
            name.startswith(("vision_tower", "model.visual")):
        return True
    il = layer_of(name)
    if il is not None and il >= src.num_layers:
        if src.family.drops_extra_layers:
            return True
        raise ShapeError(f"{name}: layer {il} but config.json num_hidden_layers is "
                         f"{src.num_layers}")
    return False


def plan_weights(src: Source) -> tuple[list[WeightEntry], int]:
    """Every non-expert tensor with its output offset, dtype and quantization;
    returns (entries, bin size). Raises FormatError / ShapeError on anything the
    engine could not read."""
    entries: list[WeightEntry] = []
    quants: dict[str, Quant | None] = {}
    offset = 0
    for name in sorted(src.ckpt.tensors):
        if expert_key(name) is not None or is_skipped(src, name):
            continue
        info = src.ckpt.info(name)
        ent = WeightEntry(name, strip_name(name), info, info.dtype, info.shape,
                          info.nbytes)
        module, _, part = name.rpartition(".")
        if info.dtype == "U32" or (part in ("scales", "biases") and
                                   f"{module}.weight" in src.ckpt and
                                   src.ckpt.info(f"{module}.weight").dtype == "U32"):
            if info.dtype == "U32" and part != "weight":
                raise FormatError(f"{name}: U32 tensor that is not a module's .weight")
            if module not in quants:
                quants[module] = src.quant_of(module)
            ent.quant = quants[module]
        elif info.dtype not in FLOAT_DTYPES:
            raise FormatError(f"{name}: dtype {info.dtype}; expected U32 (quantized) "
                              f"or a float dtype ({', '.join(FLOAT_DTYPES)})")
        if name.endswith(".linear_attn.A_log") and info.dtype != "F32":
            ent.widen, ent.dtype = True, "F32"
            ent.size = nbytes_of("F32", info.shape)
        offset += -offset % ALIGN
        ent.offset = offset
        offset += ent.size
        entries.append(ent)
    if not entries:
        raise FormatError(f"{src.dir}: no non-expert tensors found")
    return entries, offset


def widen_to_f32(raw: bytes, dtype: str) -> bytes:
    """BF16 -> F32 is a 16-bit left shift (exact); F16 -> F32 is exact in numpy."""
    if dtype == "BF16":
        words = np.frombuffer(raw, dtype="<u2").astype("<u4") << 16
        return words.tobytes()
    if dtype == "F16":
        return np.frombuffer(raw, dtype="<f2").astype("<f4").tobytes()
    raise FormatError(f"cannot widen dtype {dtype} to F32")


def manifest(src: Source, entries: list[WeightEntry]) -> dict[str, Any]:
    """model_weights.json: offsets/sizes/shapes/dtypes (+ bits, group_size for every
    tensor of a quantized module) and the LM config for humans and tools."""
    tensors: dict[str, Any] = {}
    for e in entries:
        t: dict[str, Any] = {"offset": e.offset, "size": e.size, "shape": list(e.shape),
                             "dtype": e.dtype}
        if e.quant is not None:
            t["bits"], t["group_size"] = e.quant.bits, e.quant.group_size
        tensors[e.name] = t
    cfg = {k: v for k, v in src.text.items()
           if k not in ("quantization", "quantization_config", "vision_config",
                        "text_config")}
    cfg["model_type"] = src.arch
    cfg["default_bits"] = src.qblock.get("bits")
    cfg["default_group_size"] = src.qblock.get("group_size")
    return {"model": str(src.dir.resolve()), "num_tensors": len(entries),
            "tensors": tensors, "config": cfg}


class _Sink:
    """Fills pool buffers with consecutive output bytes and hands full ones to the
    writer thread: source reads go straight into the buffer (no extra copy)."""

    def __init__(self, out: HashedFile, pool: BufferPool, bar: Progress):
        self.out, self.pool, self.bar = out, pool, bar
        self.buf = pool.get()
        self.fill = 0

    def copy(self, fd: int, offset: int, length: int, path: Path) -> None:
        while length:
            n = min(len(self.buf) - self.fill, length)
            preadv_exact(fd, [memoryview(self.buf)[self.fill:self.fill + n]], offset,
                         path)
            self._advance(n)
            offset += n
            length -= n

    def put(self, data: bytes) -> None:
        view = memoryview(data)
        while len(view):
            n = min(len(self.buf) - self.fill, len(view))
            self.buf[self.fill:self.fill + n] = view[:n]
            self._advance(n)
            view = view[n:]

    def _advance(self, n: int) -> None:
        self.fill += n
        if self.fill == len(self.buf):
            self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        buf = self.buf
        self.out.write(memoryview(buf)[:self.fill], done=lambda b=buf: self.pool.put(b))
        self.bar.update(self.fill)
        self.buf = self.pool.get()
        self.fill = 0

    def close(self) -> None:
        self.flush()
        self.pool.put(self.buf)


def _prefetch_small(src: Source, entries: list[WeightEntry]) -> None:
    """The bin is written in name order, which visits the shards out of order: for
    the many small tensors (norms, biases, small projections) each read would be a
    separate cold seek. Ask the kernel to fetch them all now, in file order, so those
    reads come from the page cache; large tensors stream well on their own."""
    if not hasattr(os, "posix_fadvise"):
        return
    small = sorted((e.info.path, e.info.begin, e.info.nbytes) for e in entries
                   if e.info.nbytes <= PREFETCH_MAX_BYTES)
    for path, begin, nbytes in small:
        os.posix_fadvise(src.ckpt.files[path].fileno(), begin, nbytes,
                         os.POSIX_FADV_WILLNEED)


def _write_bin(src: Source, entries: list[WeightEntry], path: Path, size: int,
               progress: bool) -> str:
    _prefetch_small(src, entries)
    bar = Progress(size, "model_weights.bin", progress)
    try:
        if USE_KERNEL_COPY and kernel_copy_works(path.parent,
                                                 tensor_fd(src, entries[0].info)):
            return _write_bin_kernel(src, entries, path, size, bar)
        return _write_bin_buffered(src, entries, path, size, bar)
    finally:
        bar.close()


def _write_bin_kernel(src: Source, entries: list[WeightEntry], path: Path, size: int,
                      bar: Progress) -> str:
    """Tensors copied inside the kernel (os.sendfile), padding and widened tensors
    written from here; sha256 alongside (CopyFile)."""
    maps = SourceMaps()
    try:
        with CopyFile(path, maps) as out:
            pos = 0
            for e in entries:
                if e.offset > pos:
                    out.write(bytes(e.offset - pos))
                if e.widen:
                    out.write(widen_to_f32(src.ckpt.read(e.src_name), e.info.dtype))
                else:
                    out.copy(e.info.path, tensor_fd(src, e.info), e.info.begin,
                             e.info.nbytes)
                bar.update(e.offset + e.size - pos)
                pos = e.offset + e.size
            return out.seal(lambda tmp: _check_written(src, entries, tmp, size))
    finally:
        maps.close()


def _write_bin_buffered(src: Source, entries: list[WeightEntry], path: Path,
                        size: int, bar: Progress) -> str:
    """Portable path: reads into pool buffers, a thread writes and hashes them."""
    with HashedFile(path) as out:
        sink = _Sink(out, BufferPool(3, CHUNK_BYTES), bar)
        pos = 0
        for e in entries:
            sink.put(bytes(e.offset - pos))
            if e.widen:
                sink.put(widen_to_f32(src.ckpt.read(e.src_name), e.info.dtype))
            else:
                sink.copy(tensor_fd(src, e.info), e.info.begin, e.info.nbytes,
                          e.info.path)
            pos = e.offset + e.size
        sink.close()
        return out.seal(lambda tmp: _check_written(src, entries, tmp, size))


def _check_written(src: Source, entries: list[WeightEntry], tmp: Path, size: int
                   ) -> None:
    """Before the rename: the file has the planned size and every tensor's first
    bytes read back equal to the source (catches a misplaced or dropped write)."""
    actual = tmp.stat().st_size
    if actual != size:
        raise MoefluxIOError(f"{tmp}: {actual} bytes written, expected {size}")
    with open(tmp, "rb") as f:
        for e in entries:
            n = min(e.info.nbytes, 4096)
            want = src.ckpt.read(e.src_name, 0, n)
            if e.widen:
                want = widen_to_f32(want, e.info.dtype)
            f.seek(e.offset)
            if f.read(len(want)) != want:
                raise MoefluxIOError(f"{tmp}: tensor {e.name} at offset {e.offset} "
                                     "reads back different from the source")


def run_extract(src: Source, dst: Path, journal: Journal, *, progress: bool = True,
                check_space: bool = True) -> StepResult:
    """Write model_weights.bin/.json into ``dst`` unless the journal shows them done."""
    res = StepResult()
    entries, size = plan_weights(src)
    man = json_bytes(manifest(src, entries))
    done_bin = journal.done(BIN_NAME)
    if check_space and done_bin is None:
        check_disk(dst, size + len(man))
    if done_bin is None:
        journal.record(BIN_NAME, _write_bin(src, entries, dst / BIN_NAME, size,
                                            progress))
    else:
        res.skipped.append(BIN_NAME)
    done_json = journal.done(JSON_NAME)
    if done_json is None or done_json["sha256"] != _sha(man):
        journal.record(JSON_NAME, write_small_file(dst / JSON_NAME, man))
    res.files[BIN_NAME] = journal.files[BIN_NAME]["sha256"]
    res.files[JSON_NAME] = journal.files[JSON_NAME]["sha256"]
    res.stats["num_tensors"] = len(entries)
    res.stats["bin_bytes"] = size
    return res


def _sha(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()


def extract_weights(src: str | Path, dst: str | Path, *, progress: bool = True) -> Path:
    """Write ``dst``/model_weights.bin and model_weights.json from the MLX checkpoint
    ``src``. Resumable; returns ``dst``.

    Raises:
        FormatError, ShapeError: the checkpoint is not one the engine can read.
        PrepIOError: not enough free space at ``dst``.
    """
    dst = Path(dst)
    with Source(src) as source:
        _, size = plan_weights(source)  # refusals before dst is touched
        if not dst.exists():   # nothing to resume: the whole size, checked first
            check_disk(dst, size)
        with DirLock(dst):
            journal = Journal(dst, source_key(source))
            run_extract(source, dst, journal, progress=progress)
    return dst


def _cli(args: argparse.Namespace) -> int:
    extract_weights(args.src, args.dst, progress=not args.no_progress)
    return 0


COMMAND = Command("extract-weights",
                  "non-expert tensors -> model_weights.bin + model_weights.json",
                  __doc__ or "", add_src_dst_arguments, _cli)
register = COMMAND.register
main = COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
