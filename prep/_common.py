"""Shared pieces of the prep commands: reading the source checkpoint's facts
(architecture, quantization, MoE layers), atomic hashed output files, the resume
journal, disk-space checks, progress bars, and the command-line plumbing the commands
share.

Everything that decides *what* a model directory contains lives in the command
modules; this file only knows how to read a source safely and how to write a file so
that a crash never leaves something that looks finished.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import json
import mmap
import os
import queue
import re
import shutil
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from moeflux.errors import FormatError, MoefluxIOError, ShapeError
from moeflux.prep.archs import Family, families, family
from moeflux.prep.safetensors_io import DTYPE_SIZES, Checkpoint, TensorInfo

# The families prep converts, one module each in prep/archs/ (by model_type).
ARCHITECTURES = tuple(sorted(families()))
FLOAT_DTYPES = ("F32", "BF16", "F16")
JOURNAL_NAME = ".moeflux-prep-journal.json"
LOCK_NAME = ".moeflux-prep.lock"
JOURNAL_VERSION = 1
# The 9 parts of an expert blob, in blob order (reference-system §2.2); a projection
# may also carry a per-expert output ``bias`` (layout version 2).
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PARTS = ("weight", "scales", "biases")
COMPONENTS = tuple(f"{p}.{q}" for p in PROJECTIONS for q in PARTS)
# Reads and writes move in pieces of this size: big enough that syscalls cost nothing,
# small enough that RAM use stays flat whatever the checkpoint.
CHUNK_BYTES = 16 << 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "vocab.json",
                   "merges.txt")

# Stacked routed experts: mlx-lm's SwitchGLU under the layer's FFN module (mlp, or a
# family's own ffn_module such as minimax's block_sparse_moe) as switch_mlp, or
# mlp.experts (gpt_oss; other families' mlp.experts tensors are raw HF ones, refused by
# Source).
_FFN_MODULES = "|".join(sorted({re.escape(f.ffn_module) for f in families().values()}))
_EXPERT_RE = re.compile(r"^(?:language_model\.)?model\.layers\.(\d+)\."
                        rf"(?:{_FFN_MODULES})\.(?:switch_mlp|experts)\."
                        r"(gate_proj|up_proj|down_proj)\.(weight|scales|biases|bias)$")
_LAYER_RE = re.compile(r"^(?:language_model\.)?model\.layers\.(\d+)\.")
# Per-expert or fused expert tensors of a raw Hugging Face checkpoint (minimax's
# per-expert w1 / w2 / w3 under block_sparse_moe.experts.N).
_HF_EXPERT_RE = re.compile(r"\.mlp\.experts\.(\d+\.(gate|up|down)_proj|gate_up_proj|"
                           r"down_proj|gate_proj|up_proj)\b|"
                           r"\.block_sparse_moe\.experts\.\d+\.w[123]\b")


class PrepIOError(MoefluxIOError):
    """The destination cannot take the output (no space left)."""


# ==== names ====

def strip_name(name: str) -> str:
    """Manifest name of a checkpoint tensor: the VLM ``language_model.`` prefix cut."""
    return name[len("language_model."):] if name.startswith("language_model.") else name


def expert_key(name: str) -> tuple[int, str, str] | None:
    """(layer, projection, part) of a routed-expert tensor name, else None."""
    m = _EXPERT_RE.match(name)
    return (int(m.group(1)), m.group(2), m.group(3)) if m else None


def layer_of(name: str) -> int | None:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def layer_file_name(il: int) -> str:
    return f"layer_{il:02d}.bin"


# ==== the source checkpoint ====

@dataclass(frozen=True)
class Quant:
    """Quantization of one module: ``bits`` per code, ``group_size`` codes per
    (scale, bias) pair (affine), or mode ``mxfp4``: 4-bit E2M1 codes, one U8 E8M0
    scale per 32 and no biases."""

    bits: int
    group_size: int
    mode: str = "affine"


class ModelConfig:
    """The facts of a checkpoint's config.json prep relies on: architecture (one of
    ARCHITECTURES, else FormatError), LM keys (``text``: text_config when nested, as
    mlx-lm reads it), the quantization block (affine only) and which layers are MoE."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        cfg_path = self.dir / "config.json"
        try:
            self.config: dict[str, Any] = json.loads(cfg_path.read_text())
        except FileNotFoundError:
            raise MoefluxIOError(errno.ENOENT, f"{cfg_path}: missing; an MLX checkpoint "
                                 "directory has config.json beside its safetensors "
                                 "files") from None
        except json.JSONDecodeError as exc:
            raise FormatError(f"{cfg_path}: not JSON ({exc})") from None
        self.arch = self._detect_arch()
        self.family: Family = families()[self.arch]
        # qwen3_5_moe nests the LM keys in text_config (mlx-lm reads it the same way).
        self.text: dict[str, Any] = self.config.get("text_config") or self.config
        self.qblock: dict[str, Any] = (self.config.get("quantization")
                                       or self.config.get("quantization_config") or {})
        self._check_quant_mode()

    def _detect_arch(self) -> str:
        """The family's model_type (an alias such as minimax_m2 names its family)."""
        mt = self.config.get("model_type")
        fam = family(mt) if isinstance(mt, str) else None
        if fam is None:
            raise FormatError(f"{self.dir / 'config.json'}: model_type {mt!r} is not "
                              f"supported; expected one of {', '.join(ARCHITECTURES)}")
        return fam.model_type

    def _check_quant_mode(self) -> None:
        mode = self.qblock.get("mode", "affine")
        if mode != "affine":
            raise FormatError(f"{self.dir / 'config.json'}: quantization mode {mode!r}; "
                              "only 'affine' (scales + biases) is supported")
        experts = f".{self.family.ffn_module}.{self.family.expert_module}."
        for key, val in self.qblock.items():
            if not isinstance(val, dict) or val.get("mode", "affine") == "affine":
                continue
            if val["mode"] in self.family.expert_modes and experts in f"{key}.":
                continue
            raise FormatError(f"{self.dir / 'config.json'}: quantization of {key!r} uses "
                              f"mode {val['mode']!r}; only 'affine' is supported"
                              + (f" (and {val['mode']!r} for the routed experts of "
                                 f"{self.arch})" if val["mode"] in self.family.expert_modes
                                 else ""))

    def cfg_int(self, *keys: str, default: int | None = None) -> int:
        for k in keys:
            v = self.text.get(k)
            if v is not None:
                return int(v)
        if default is not None:
            return default
        raise FormatError(f"{self.dir / 'config.json'}: missing {' / '.join(keys)}")

    @property
    def num_layers(self) -> int:
        return self.cfg_int("num_hidden_layers")

    @property
    def num_experts(self) -> int:
        return self.cfg_int(self.family.experts_key, default=0)

    def moe_layers_expected(self) -> list[int]:
        """Layers the config says are MoE (mlx-lm's rule of the family, prep/archs)."""
        return self.family.moe_layers(self.text, self.num_layers, self.num_experts)


class Source(ModelConfig):
    """A source MLX checkpoint: its tensors (bounded reads) and config facts, checked
    for the things that would make a conversion silently wrong (raw HF layouts,
    non-affine modes, unknown model types)."""

    def __init__(self, directory: str | os.PathLike):
        super().__init__(directory)
        try:
            self.ckpt = Checkpoint(self.dir)
        except FileNotFoundError as exc:
            raise MoefluxIOError(errno.ENOENT, str(exc)) from None
        except ValueError as exc:  # SafetensorsError
            raise FormatError(str(exc)) from None
        try:
            self._refuse_raw_hf()
        except BaseException:
            self.ckpt.close()
            raise

    def close(self) -> None:
        self.ckpt.close()

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _refuse_raw_hf(self) -> None:
        """A raw HF checkpoint has per-expert or fused expert tensors and [C,1,K] conv
        weights; copying it would give the engine a layout it does not read."""
        stacked = f".{self.family.ffn_module}.{self.family.expert_module}."
        for name, info in self.ckpt.tensors.items():
            if stacked == ".mlp.experts." and stacked in name:
                if expert_key(name) is None:
                    raise FormatError(
                        f"{name}: raw Hugging Face {self.arch} expert tensor; expected "
                        "stacked '...mlp.experts.{gate,up,down}_proj.{weight,scales,bias}' "
                        "tensors of an MLX checkpoint (convert it with mlx_lm.convert "
                        "first)")
                continue
            if _HF_EXPERT_RE.search(name):
                raise FormatError(
                    f"{name}: raw Hugging Face expert tensor; expected stacked "
                    f"'...{self.family.ffn_module}.switch_mlp.{{gate,up,down}}_proj.*' "
                    "tensors of an MLX "
                    "checkpoint (convert it with mlx_lm.convert first)")
            if name.endswith("conv1d.weight") and len(info.shape) == 3 and \
                    info.shape[-1] != 1:
                raise FormatError(
                    f"{name}: shape {list(info.shape)} is the raw Hugging Face "
                    "[C, 1, K] conv layout; expected MLX [C, K, 1] (convert it with "
                    "mlx_lm.convert first)")

    # ---- quantization ----

    def quant_of(self, module: str) -> Quant | None:
        """Quantization of module path ``module`` (original name, no suffix), resolved
        as mlx-lm's loader does (model-math §1.5): explicit entry, else default when
        ``module.scales`` exists, else float. Shapes are checked against it."""
        wname = f"{module}.weight"
        entry = self.qblock.get(module)
        has_scales = f"{module}.scales" in self.ckpt
        if entry is False or (entry is None and not has_scales):
            if wname in self.ckpt and self.ckpt.info(wname).dtype == "U32":
                raise FormatError(f"{wname}: U32 packed weight but config.json "
                                  "quantization marks module as float (no entry and no "
                                  ".scales)")
            return None
        mode = "affine"
        if isinstance(entry, dict):
            bits, gs = entry.get("bits"), entry.get("group_size")
            mode = entry.get("mode", "affine")
        else:
            bits, gs = self.qblock.get("bits"), self.qblock.get("group_size")
        if mode == "mxfp4":
            q = Quant(4, 32, "mxfp4")
            self._check_mxfp4_shapes(module, bits, gs)
            return q
        if bits is None or gs is None:
            defaults = {k: v for k, v in self.qblock.items() if not isinstance(v, dict)}
            raise FormatError(f"{module}: quantized (has .scales) but config.json has no "
                              f"quantization bits/group_size for it (block: {defaults})")
        q = Quant(int(bits), int(gs))
        self._check_quant_shapes(module, q)
        return q

    def _check_mxfp4_shapes(self, module: str, bits: Any, gs: Any) -> None:
        """MXFP4: U32 codes [..., n_in/8], U8 scales [..., n_in/32], no biases."""
        if (bits, gs) not in ((None, None), (4, 32)):
            raise FormatError(f"{module}: mode mxfp4 with bits={bits} group_size={gs}; "
                              "mxfp4 is 4 bits in groups of 32")
        wn, sn = f"{module}.weight", f"{module}.scales"
        for n in (wn, sn):
            if n not in self.ckpt:
                raise FormatError(f"{n}: missing; an mxfp4 module has weight and scales")
        if f"{module}.biases" in self.ckpt:
            raise FormatError(f"{module}.biases: present, but mode mxfp4 has no affine "
                              "biases")
        w, s = self.ckpt.info(wn), self.ckpt.info(sn)
        if w.dtype != "U32" or s.dtype != "U8":
            raise FormatError(f"{module}: mxfp4 needs U32 codes and U8 E8M0 scales, got "
                              f"{w.dtype} / {s.dtype}")
        if len(w.shape) < 2 or w.shape[:-1] != s.shape[:-1] or \
                w.shape[-1] * 8 != s.shape[-1] * 32:
            raise ShapeError(f"{wn}: shape {list(w.shape)} and {sn} {list(s.shape)} are "
                             "not mxfp4 codes [..., n_in/8] with scales [..., n_in/32]")

    def _check_quant_shapes(self, module: str, q: Quant) -> None:
        names = {p: f"{module}.{p}" for p in PARTS}
        for p in PARTS:
            if names[p] not in self.ckpt:
                what = ("only affine quantization (scales + biases) is supported"
                        if p == "biases" else "a quantized module has weight, scales "
                        "and biases")
                raise FormatError(f"{names[p]}: missing; {what}")
        w, s, b = (self.ckpt.info(names[p]) for p in PARTS)
        if w.dtype != "U32":
            raise FormatError(f"{w.name}: dtype {w.dtype}, expected U32 packed codes "
                              f"({q.bits}-bit)")
        if s.dtype not in FLOAT_DTYPES:
            raise FormatError(f"{s.name}: dtype {s.dtype}; affine scales are float "
                              f"({'/'.join(FLOAT_DTYPES)}); non-affine modes are not "
                              "supported")
        if b.dtype != s.dtype or b.shape != s.shape:
            raise ShapeError(f"{b.name}: {b.dtype}{list(b.shape)} differs from "
                             f"{s.name}: {s.dtype}{list(s.shape)}")
        if len(w.shape) < 2 or w.shape[:-1] != s.shape[:-1]:
            raise ShapeError(f"{w.name}: shape {list(w.shape)} does not match "
                             f"{s.name} shape {list(s.shape)} (leading dims differ)")
        if q.bits not in (2, 3, 4, 5, 6, 8) or q.group_size <= 0:
            raise FormatError(f"{module}: quantization bits={q.bits} group_size="
                              f"{q.group_size} not supported (bits 2,3,4,5,6,8)")
        packed = w.shape[-1] * 32
        if packed % q.bits:
            raise ShapeError(f"{w.name}: {w.shape[-1]} packed words * 32 is not a "
                             f"multiple of bits={q.bits}")
        n_in = packed // q.bits
        if s.shape[-1] * q.group_size != n_in:
            raise ShapeError(f"{s.name}: {s.shape[-1]} groups * group_size "
                             f"{q.group_size} != {n_in} inputs implied by {w.name} "
                             f"{list(w.shape)} at {q.bits} bits")


# ==== output files ====

def fsync_dir(path: Path) -> None:
    """Make a rename durable (the directory entry lives in the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def preadv_exact(fd: int, views: list[memoryview], offset: int, path: Path) -> None:
    """Scatter-read consecutive file bytes at ``offset`` into ``views`` (one syscall
    for the common case), looping over short reads."""
    iov_max = 512
    i = 0
    while i < len(views):
        batch = views[i:i + iov_max]
        want = sum(len(v) for v in batch)
        got = os.preadv(fd, batch, offset)
        if got == want:
            offset += got
            i += len(batch)
            continue
        if got <= 0:
            raise MoefluxIOError(errno.EIO, f"{path}: short read at offset {offset} "
                                 "(file truncated while being read?)")
        offset += got
        # drop what was filled and retry with the remainder of a partial view
        while got >= len(views[i]):
            got -= len(views[i])
            i += 1
        views = views[:i] + [views[i][got:]] + views[i + 1:]


class BufferPool:
    """A few reusable byte buffers: the reader fills one while the writer thread
    drains another, so RAM use is n * size whatever the file."""

    def __init__(self, n: int, size: int):
        self.size = size
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(n):
            self._free.put(bytearray(size))

    def get(self) -> bytearray:
        return self._free.get()

    def put(self, buf: bytearray) -> None:
        self._free.put(buf)


class _Countdown:
    """Calls ``done`` once ``n`` workers have released a shared buffer."""

    def __init__(self, n: int, done: Callable[[], None] | None):
        self._n, self._done, self._lock = n, done, threading.Lock()

    def release(self) -> None:
        with self._lock:
            self._n -= 1
            last = self._n == 0
        if last and self._done is not None:
            self._done()


class _TmpOutput:
    """An output file written under ``name.tmp`` by the caller and background threads
    (each fed by its own queue, stopped by a None item; subclasses start them).
    ``finish`` waits for them, fsyncs and returns the sha256; ``commit`` renames to
    the final name; ``abort`` stops the threads and removes the temporary, which a
    ``with`` block does on any exception."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.hasher = hashlib.sha256()
        self.size = 0
        self._error: BaseException | None = None   # first failure of a thread
        self._queues: list[queue.Queue] = []
        self._threads: list[threading.Thread] = []

    def _stop(self) -> None:
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()

    def finish(self) -> str:
        """Wait for all writes, fsync, close; return the hex sha256."""
        self._stop()
        if self._error is not None:
            err = self._error
            self.abort()
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                raise PrepIOError(errno.ENOSPC, f"{self.tmp}: no space left on device")
            raise err
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        return self.hasher.hexdigest()

    def commit(self) -> None:
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)

    def seal(self, check: Callable[[Path], None]) -> str:
        """``finish``, then ``check(tmp)`` (read-back checks before the rename), then
        ``commit``; returns the file's hex sha256."""
        digest = self.finish()
        check(self.tmp)
        self.commit()
        return digest

    def __enter__(self) -> "_TmpOutput":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:   # any failure, Ctrl-C included: no stray .tmp
            self.abort()

    def abort(self) -> None:
        if any(t.is_alive() for t in self._threads):
            self._error = self._error or RuntimeError("aborted")
            self._stop()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


class HashedFile(_TmpOutput):
    """An output file written under ``name.tmp``. Two background threads take each
    buffer: one writes it, one adds it to the file's sha256, so writing, hashing and
    the caller's next reads all overlap. ``finish`` fsyncs; ``commit`` renames to the
    final name; ``abort`` removes the temporary."""

    def __init__(self, path: Path):
        super().__init__(path)
        self._queues = [queue.Queue(maxsize=2), queue.Queue(maxsize=2)]
        self._threads = [
            threading.Thread(target=self._run, args=(q, job), daemon=True,
                             name=f"moeflux-prep-{job.__name__}")
            for q, job in zip(self._queues, (self._write_all, self._hash))]
        for t in self._threads:
            t.start()

    def _write_all(self, data: memoryview) -> None:
        view = data
        while len(view):
            n = os.write(self.fd, view)
            view = view[n:]
        self.size += len(data)

    def _hash(self, data: memoryview) -> None:
        self.hasher.update(data)

    def _run(self, q: queue.Queue, job: Callable[[memoryview], None]) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            data, countdown = item
            try:
                if self._error is None:
                    job(data)
            except BaseException as exc:  # surfaced by finish()
                self._error = exc
            finally:
                countdown.release()

    def write(self, data: bytes | memoryview, done: Callable[[], None] | None = None
              ) -> None:
        """Queue ``data`` (not to be modified until ``done`` is called)."""
        if self._error is not None:
            raise self._error
        countdown = _Countdown(len(self._queues), done)
        view = memoryview(data)
        for q in self._queues:
            q.put((view, countdown))


class SourceMaps:
    """Read-only mappings of source files, opened on first use: CopyFile hashes the
    bytes it copies from them without bringing them through a read buffer."""

    def __init__(self) -> None:
        self._maps: dict[Path, tuple[mmap.mmap, memoryview]] = {}

    def view(self, path: Path, fd: int) -> memoryview:
        ent = self._maps.get(path)
        if ent is None:
            mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
            ent = self._maps[path] = (mm, memoryview(mm))
        return ent[1]

    def close(self) -> None:
        for mm, mv in self._maps.values():
            mv.release()
            mm.close()
        self._maps.clear()


class CopyFile(_TmpOutput):
    """An output file assembled in order from source byte ranges and literal bytes,
    written under ``name.tmp``.

    Source ranges are copied inside the kernel (``os.sendfile`` file to file: no
    copy through user space, which on a small machine is what limits a Python
    copy); a second thread computes the sha256 of the same bytes, in the same order,
    from read-only mappings of the sources (memory the copy just brought into the
    page cache, not a second read of the output). ``finish`` fsyncs and returns the
    digest; ``commit`` renames; ``abort`` removes the temporary.
    """

    def __init__(self, path: Path, maps: SourceMaps):
        super().__init__(path)
        self.maps = maps
        self._q: queue.Queue = queue.Queue()
        self._queues = [self._q]
        self._threads = [threading.Thread(target=self._hash_run, daemon=True,
                                          name="moeflux-prep-hash")]
        self._threads[0].start()

    def _hash_run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            try:
                if self._error is None:
                    self.hasher.update(item)
            except BaseException as exc:  # surfaced by finish()
                self._error = exc

    def copy(self, path: Path, fd: int, offset: int, length: int) -> None:
        """Append bytes [offset, offset+length) of the source file ``fd``."""
        if self._error is not None:
            raise self._error
        pos, end = offset, offset + length
        while pos < end:
            n = os.sendfile(self.fd, fd, pos, min(end - pos, 1 << 30))
            if n <= 0:
                raise MoefluxIOError(errno.EIO, f"{path}: short read at offset {pos} "
                                     "(file truncated while being read?)")
            pos += n
        self._q.put(self.maps.view(path, fd)[offset:end])
        self.size += length

    def write(self, data: bytes) -> None:
        """Append literal bytes (padding, converted tensors)."""
        view = memoryview(data)
        while len(view):
            n = os.write(self.fd, view)
            view = view[n:]
        self._q.put(data)
        self.size += len(data)


def kernel_copy_works(out_dir: Path, src_fd: int) -> bool:
    """Whether os.sendfile can copy from a source file into ``out_dir`` (Linux: any
    two files; elsewhere only to sockets) and the source can be mapped for hashing
    (not on every FUSE filesystem). Tried once, on one byte."""
    if not hasattr(os, "sendfile") or not sys.platform.startswith("linux"):
        return False
    try:
        mmap.mmap(src_fd, 0, prot=mmap.PROT_READ).close()
    except (OSError, ValueError):
        return False
    probe = out_dir / ".moeflux-prep-probe.tmp"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            return os.sendfile(fd, src_fd, 0, 1) == 1
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError:
        return False


class DirLock:
    """Exclusive lock on an output directory for the length of a prep command: two
    conversions writing the same files would corrupt each other's temporaries.
    Holding it also makes leftover ``*.tmp`` files (from a killed run) safe to
    delete, which ``__enter__`` does."""

    def __init__(self, dst: Path):
        self.dst = dst
        self.fd = -1

    def __enter__(self) -> "DirLock":
        self.dst.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.dst / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = -1
            raise MoefluxIOError(errno.EBUSY, f"{self.dst}: another moeflux.prep "
                                 "command is writing this directory") from None
        for sub in [self.dst, *self.dst.glob("packed_experts*")]:
            if sub.is_dir():
                for tmp in sub.glob("*.tmp"):
                    tmp.unlink(missing_ok=True)
        return self

    def remove_file(self) -> None:
        """Delete the lock file while the lock is held (at the end of a finished
        run, so the directory keeps no prep leftovers)."""
        (self.dst / LOCK_NAME).unlink(missing_ok=True)

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the flock
            self.fd = -1


def write_small_file(path: Path, data: bytes) -> str:
    """Write ``data`` atomically (tmp, fsync, rename); return its sha256."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return hashlib.sha256(data).hexdigest()


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()


# ==== resume journal ====

class Journal:
    """Which output files are finished: {relpath: {size, sha256, mtime_ns, key, ...}}.

    Written atomically after each finished file. A file is taken as done on a rerun
    only when it was made from the same source (``key``: every shard's name, size and
    mtime) and its size and mtime are unchanged since; its sha256 was computed while
    it was written. Entries of other sources stay in the file but count for nothing.
    """

    def __init__(self, dst: Path, key: dict[str, Any]):
        self.path = dst / JOURNAL_NAME
        self.dst = dst
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        self.files: dict[str, dict[str, Any]] = {}
        try:
            old = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return
        if old.get("version") == JOURNAL_VERSION and isinstance(old.get("files"), dict):
            self.files = old["files"]

    def done(self, rel: str) -> dict[str, Any] | None:
        """The entry of ``rel`` if that file is finished and untouched since."""
        ent = self.files.get(rel)
        if ent is None or ent.get("key") != self.key:
            return None
        try:
            st = (self.dst / rel).stat()
        except FileNotFoundError:
            return None
        if st.st_size != ent["size"] or st.st_mtime_ns != ent["mtime_ns"]:
            return None
        return ent

    def record(self, rel: str, sha256: str, **extra: Any) -> None:
        st = (self.dst / rel).stat()
        self.files[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                           "sha256": sha256, "key": self.key, **extra}
        write_small_file(self.path, json_bytes({"version": JOURNAL_VERSION,
                                                "files": self.files}))


def source_key(src: Source) -> dict[str, Any]:
    """What identifies a source: every file's name, size and mtime. A changed source
    invalidates all outputs made from it."""
    files = sorted(list(src.ckpt.files) + [src.dir / "config.json"])
    out = []
    for p in files:
        st = p.stat()
        out.append([p.name, st.st_size, st.st_mtime_ns])
    return {"source": str(src.dir.resolve()), "files": out}


# ==== disk space and progress ====

def remove_stale_layers(expert_dir: Path, keep: set[str]) -> None:
    """Delete layer files a previous, larger model left in ``expert_dir`` (the
    engine and ``info`` would otherwise see layers this model does not have)."""
    for f in expert_dir.glob("layer_*.bin"):
        if f.name not in keep:
            f.unlink(missing_ok=True)


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (for a free-space check made
    before the destination is created)."""
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_disk(dst: Path, need_bytes: int) -> None:
    """Refuse before writing anything when the destination cannot hold the output.
    ``dst`` need not exist yet: its nearest existing ancestor's file system counts."""
    free = shutil.disk_usage(existing_ancestor(dst)).free
    margin = 16 << 20
    if need_bytes + margin > free:
        raise PrepIOError(errno.ENOSPC,
                          f"{dst}: {need_bytes / 1e9:.3f} GB to write but only "
                          f"{free / 1e9:.3f} GB free")


class Progress:
    """A tqdm bar in bytes (rate in B/s) when wanted and tqdm is importable; else
    silent. tqdm is an optional dependency, so it is imported only here."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                             unit_divisor=1024, dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def tensor_fd(src: Source, info: TensorInfo) -> int:
    return src.ckpt.files[info.path].fileno()


def prod(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def nbytes_of(dtype: str, shape: Iterable[int]) -> int:
    return DTYPE_SIZES[dtype] * prod(shape)


@dataclass
class StepResult:
    """Files a step wrote (relative path -> sha256) and numbers worth reporting."""

    files: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


# ==== Command line ====

def add_src_dst_arguments(p: argparse.ArgumentParser, expert_bits: bool = False) -> None:
    """SRC, DST, --no-progress and (expert_bits) --expert-bits {4,2} of the commands
    that write a model directory from a checkpoint."""
    p.add_argument("src", help="MLX checkpoint directory (config.json + safetensors)")
    p.add_argument("dst", help="model directory to write")
    if expert_bits:
        p.add_argument("--expert-bits", type=int, choices=(4, 2), default=4,
                       help="4: copy the experts as they are (default); 2: requantize "
                       "them to 2-bit into packed_experts_2bit/")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


@dataclass(frozen=True)
class Command:
    """One prep command: a subcommand of ``python -m moeflux.prep`` (``register``) and
    the same command run as its own module (``main``, prog = the module name)."""

    name: str                                   # as typed: "repack-experts"
    help: str                                   # one line for the command list
    doc: str                                    # the module docstring: the description
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]    # exit status

    def _setup(self, p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        self.add_arguments(p)
        p.set_defaults(func=self.run)
        return p

    def register(self, subparsers: Any) -> None:
        """Add the command to moeflux.prep's CLI."""
        self._setup(subparsers.add_parser(
            self.name, help=self.help, description=self.doc,
            formatter_class=argparse.RawDescriptionHelpFormatter))

    def main(self, argv: list[str] | None = None) -> int:
        """Parse ``argv`` (default sys.argv[1:]) and run; the exit status."""
        from moeflux.clitools import run_cli

        prog = self.name.replace("-", "_")
        p = self._setup(argparse.ArgumentParser(
            prog=prog, description=self.doc,
            formatter_class=argparse.RawDescriptionHelpFormatter))
        args = p.parse_args(argv)
        return run_cli(lambda: self.run(args), prog,
                       resumable=self.name in ("convert", "extract-weights",
                                               "repack-experts"))
