"""repack-experts: the routed experts of an MLX checkpoint -> one file per MoE layer,
packed_experts/layer_NN.bin, plus packed_experts/layout.json (DESIGN.md "on-disk
contract", reference-system §2.2).

MLX stores each projection of a layer's experts stacked ([E, rows, cols], expert e a
contiguous slice). The engine wants the opposite grouping: everything one expert
needs in one contiguous blob, so a routed expert costs ONE pread. Layer file = E blobs
back to back, expert e at e * expert_size; blob = [gate W|S|B, up W|S|B, down W|S|B],
bytes verbatim.

Reading: for a batch of experts, each of the 9 stacked source tensors is read with one
scatter-read (os.preadv) straight into its places in the output buffer, so the
sources are read sequentially and nothing is copied twice; a writer thread writes and
hashes the previous batch meanwhile.

With ``--expert-bits 2`` the experts are requantized to 2-bit (requant.py) into
packed_experts_2bit/ instead, with the same blob layout.

    python -m moeflux.prep repack-experts SRC DST [--expert-bits 2] [--no-progress]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeflux.errors import ArgumentError, FormatError, MoefluxIOError, ShapeError
from moeflux.prep import requant
from moeflux.prep._common import (Command, add_src_dst_arguments, COMPONENTS, PARTS,
                                  PROJECTIONS, BufferPool, CopyFile, DirLock,
                                  HashedFile, SourceMaps, kernel_copy_works, Journal,
                                  Progress, Quant, Source, StepResult, check_disk,
                                  remove_stale_layers,
                                  expert_key, json_bytes, layer_file_name, nbytes_of,
                                  preadv_exact, source_key, tensor_fd, write_small_file)
from moeflux.prep.safetensors_io import NUMPY_VIEWS, TensorInfo

LAYOUT_FORMAT = "moeflux-experts"
LAYOUT_VERSION = 1
# Output buffers hold this many bytes of whole experts (at least one expert).
BATCH_BYTES = 32 << 20
# 2-bit requantization works on f32 copies of this many bytes per projection and
# thread at most, on this many threads.
REQUANT_F32_BYTES = 32 << 20
REQUANT_THREADS = max(1, min(os.cpu_count() or 1, 16))
# Copy verbatim experts inside the kernel (os.sendfile) where the platform can; the
# portable path (scatter-read into buffers, write from a thread) is the fallback.
USE_KERNEL_COPY = True


def expert_dir_name(expert_bits: int) -> str:
    return "packed_experts_2bit" if expert_bits == 2 else "packed_experts"


@dataclass(frozen=True)
class Component:
    """One part of an expert blob: per-expert shape and where it sits in the blob."""

    name: str               # "gate_proj.weight", ...
    offset: int
    size: int
    dtype: str
    shape: tuple[int, int]  # per expert


@dataclass
class ExpertPlan:
    """Everything repacking needs: which layers, which source tensors, the layout."""

    arch: str
    num_layers: int
    num_experts: int
    moe_layers: list[int]
    quant: Quant                  # of the source experts
    src_components: list[Component]
    out_bits: int
    out_components: list[Component]
    expert_size: int
    tensors: dict[tuple[int, str], TensorInfo] = field(default_factory=dict)

    def layout(self) -> dict[str, Any]:
        lay: dict[str, Any] = {
            "format": LAYOUT_FORMAT, "version": LAYOUT_VERSION,
            "expert_size": self.expert_size, "num_layers": self.num_layers,
            "num_experts": self.num_experts, "moe_layers": self.moe_layers,
            "bits": self.out_bits, "group_size": self.quant.group_size,
            "components": [{"name": c.name, "offset": c.offset, "size": c.size,
                            "dtype": c.dtype, "shape": list(c.shape)}
                           for c in self.out_components]}
        if self.out_bits != self.quant.bits:
            lay["requantized_from"] = {"bits": self.quant.bits,
                                       "group_size": self.quant.group_size}
        return lay

    @property
    def file_bytes(self) -> int:
        return self.expert_size * self.num_experts


def _components(dims: dict[str, tuple[int, int]], bits: int, gs: int, sdtype: str
                ) -> list[Component]:
    """The 9 blob components for projections of (rows, n_in) at bits / gs."""
    out, off = [], 0
    for proj in PROJECTIONS:
        rows, n_in = dims[proj]
        for part in PARTS:
            if part == "weight":
                dtype, shape = "U32", (rows, n_in * bits // 32)
            else:
                dtype, shape = sdtype, (rows, n_in // gs)
            size = nbytes_of(dtype, shape)
            out.append(Component(f"{proj}.{part}", off, size, dtype, shape))
            off += size
    return out


def plan_experts(src: Source, expert_bits: int = 4) -> ExpertPlan:
    """Find and check every routed-expert tensor against config.json; raises
    FormatError / ShapeError naming the tensor and what was expected."""
    if expert_bits not in (2, 4):
        raise ArgumentError(f"expert_bits={expert_bits}: 4 (copy the source's experts "
                          "as they are) or 2 (requantize to 2-bit) are supported")
    found: dict[int, dict[str, str]] = {}
    for name in src.ckpt.tensors:
        k = expert_key(name)
        if k is not None:
            found.setdefault(k[0], {})[f"{k[1]}.{k[2]}"] = name
    expected = src.moe_layers_expected()
    if sorted(found) != expected:
        extra = sorted(set(found) - set(expected))
        missing = sorted(set(expected) - set(found))
        raise FormatError(
            f"{src.dir}: routed experts (mlp.switch_mlp.*) found in layers "
            f"{sorted(found)} but config.json ({src.arch}) makes layers {expected} MoE"
            + (f"; missing in {missing}" if missing else "")
            + (f"; unexpected in {extra}" if extra else ""))
    E = src.num_experts
    hid = src.cfg_int("hidden_size")
    inter = src.cfg_int("moe_intermediate_size")
    dims = {"gate_proj": (inter, hid), "up_proj": (inter, hid), "down_proj": (hid, inter)}
    quant: Quant | None = None
    sdtype: str | None = None
    tensors: dict[tuple[int, str], TensorInfo] = {}
    for il in expected:
        names = found[il]
        for comp in COMPONENTS:
            if comp not in names:
                raise FormatError(f"layer {il}: mlp.switch_mlp.{comp} missing "
                                  f"(have {sorted(names)})")
        for proj in PROJECTIONS:
            module = names[f"{proj}.weight"][:-len(".weight")]
            q = src.quant_of(module)
            if q is None:
                raise FormatError(f"{module}.weight: routed experts must be "
                                  "affine-quantized (U32 + scales + biases); found "
                                  f"{src.ckpt.info(module + '.weight').dtype}")
            rows, n_in = dims[proj]
            w = src.ckpt.info(f"{module}.weight")
            s = src.ckpt.info(f"{module}.scales")
            want_w = (E, rows, n_in * q.bits // 32)
            want_s = (E, rows, n_in // q.group_size)
            if w.shape != want_w:
                raise ShapeError(f"{w.name}: shape {list(w.shape)}, expected "
                                 f"{list(want_w)} from config num_experts={E}, "
                                 f"hidden_size={hid}, moe_intermediate_size={inter} at "
                                 f"{q.bits} bits")
            if s.shape != want_s:
                raise ShapeError(f"{s.name}: shape {list(s.shape)}, expected "
                                 f"{list(want_s)} (group_size {q.group_size})")
            if quant is None:
                quant, sdtype = q, s.dtype
            elif q != quant or s.dtype != sdtype:
                raise FormatError(
                    f"{module}: experts quantized {q.bits}-bit gs{q.group_size} "
                    f"{s.dtype} but earlier ones {quant.bits}-bit gs{quant.group_size}"
                    f" {sdtype}; one layout.json describes one quantization for all")
            for part in PARTS:
                tensors[(il, f"{proj}.{part}")] = src.ckpt.info(f"{module}.{part}")
    if quant is None or sdtype is None:
        raise FormatError(f"{src.dir}: no routed experts (config.json gives "
                          f"num_experts={E})")
    src_comps = _components(dims, quant.bits, quant.group_size, sdtype)
    if expert_bits == 2:
        out_comps = _components(dims, 2, quant.group_size, "BF16")
    else:
        out_comps = src_comps
    return ExpertPlan(src.arch, src.num_layers, E, expected, quant, src_comps,
                      expert_bits if expert_bits == 2 else quant.bits, out_comps,
                      sum(c.size for c in out_comps), tensors)


# ==== filling output buffers ====

def fill_verbatim(src: Source, plan: ExpertPlan, il: int, e0: int, e1: int,
                  view: memoryview) -> None:
    """Experts [e0, e1) of layer ``il`` into ``view`` (blobs back to back): one
    scatter-read per source tensor."""
    es = plan.expert_size
    for c in plan.src_components:
        info = plan.tensors[(il, c.name)]
        parts = [view[(e - e0) * es + c.offset:(e - e0) * es + c.offset + c.size]
                 for e in range(e0, e1)]
        preadv_exact(tensor_fd(src, info), parts, info.begin + e0 * c.size, info.path)


def read_stacked(src: Source, plan: ExpertPlan, il: int, comp: Component, e0: int,
                 e1: int) -> np.ndarray:
    """Source component of experts [e0, e1) as numpy [n, rows, cols]."""
    info = plan.tensors[(il, comp.name)]
    raw = src.ckpt.read(info.name, e0 * comp.size, (e1 - e0) * comp.size)
    return np.frombuffer(raw, dtype=NUMPY_VIEWS[comp.dtype]).reshape(
        e1 - e0, *comp.shape)


def requant_experts(src: Source, plan: ExpertPlan, il: int, e0: int, e1: int
                    ) -> tuple[dict[str, np.ndarray], dict[str, tuple[float, int]]]:
    """2-bit components of experts [e0, e1) and, per projection, (sum of squared
    error vs the source's dequantized values, count)."""
    out: dict[str, np.ndarray] = {}
    err: dict[str, tuple[float, int]] = {}
    srcc = {c.name: c for c in plan.src_components}
    gs, bits = plan.quant.group_size, plan.quant.bits
    for proj in PROJECTIONS:
        w = read_stacked(src, plan, il, srcc[f"{proj}.weight"], e0, e1)
        s = read_stacked(src, plan, il, srcc[f"{proj}.scales"], e0, e1)
        b = read_stacked(src, plan, il, srcc[f"{proj}.biases"], e0, e1)
        sd = srcc[f"{proj}.scales"].dtype
        x = requant.dequantize(w, requant.to_f32(s, sd), requant.to_f32(b, sd), bits, gs)
        w2, s2, b2, x2 = requant.quantize_2bit(x, gs)
        x2 -= x
        np.square(x2, out=x2)
        err[proj] = (float(x2.sum(dtype=np.float64)), int(x2.size))
        out[f"{proj}.weight"], out[f"{proj}.scales"], out[f"{proj}.biases"] = w2, s2, b2
    return out, err


def fill_requant(src: Source, plan: ExpertPlan, il: int, e0: int, e1: int,
                 view: memoryview, workers: ThreadPoolExecutor | None = None
                 ) -> dict[str, tuple[float, int]]:
    """2-bit blobs of experts [e0, e1) into ``view``; returns per projection (sum of
    squared error, count). Sub-ranges run on ``workers`` (numpy releases the GIL)."""
    es = plan.expert_size
    arr = np.frombuffer(view, dtype=np.uint8).reshape(e1 - e0, es)

    def one(a: int, b: int) -> dict[str, tuple[float, int]]:
        parts, err = requant_experts(src, plan, il, a, b)
        for c in plan.out_components:
            data = np.ascontiguousarray(parts[c.name]).view(np.uint8).reshape(b - a, -1)
            arr[a - e0:b - e0, c.offset:c.offset + c.size] = data
        return err

    n = REQUANT_THREADS if workers is not None else 1
    step = -(-(e1 - e0) // n)
    ranges = [(a, min(e1, a + step)) for a in range(e0, e1, step)]
    if workers is None or len(ranges) == 1:
        errs = [one(a, b) for a, b in ranges]
    else:
        errs = list(workers.map(lambda r: one(*r), ranges))
    return {p: (sum(e[p][0] for e in errs), sum(e[p][1] for e in errs))
            for p in PROJECTIONS}


def expected_blob(src: Source, plan: ExpertPlan, il: int, ie: int) -> bytes:
    """Expert ``ie`` of layer ``il`` as it must appear in the output, built from
    per-component source reads (a different path from the batched fill)."""
    if plan.out_bits == plan.quant.bits:
        return b"".join(src.ckpt.read(plan.tensors[(il, c.name)].name, ie * c.size,
                                      c.size) for c in plan.src_components)
    parts, _ = requant_experts(src, plan, il, ie, ie + 1)
    return b"".join(np.ascontiguousarray(parts[c.name]).tobytes()
                    for c in plan.out_components)


def sample_experts(n: int) -> list[int]:
    return sorted({0, 1 % n, n // 2, n - 1})


# ==== per-layer files ====

def _after_layer(il: int) -> None:
    """Called once layer ``il`` is committed and journaled (tests inject failures)."""


def _batch_experts(plan: ExpertPlan) -> int:
    """Experts per output buffer: ~BATCH_BYTES, and bounded f32 work when
    requantizing (a few f32 copies of each projection are alive at once)."""
    per = max(1, min(plan.num_experts, BATCH_BYTES // plan.expert_size, 256))
    if plan.out_bits != plan.quant.bits:
        rows, cols = plan.src_components[0].shape
        n_in = cols * 32 // plan.quant.bits
        per_thread = max(1, REQUANT_F32_BYTES // (4 * rows * n_in))
        per = max(1, min(plan.num_experts, per_thread * REQUANT_THREADS))
    return per


def _write_layer(src: Source, plan: ExpertPlan, il: int, path: Path, bar: Progress,
                 pool: BufferPool, workers: ThreadPoolExecutor | None
                 ) -> tuple[str, dict[str, tuple[float, int]]]:
    es, E = plan.expert_size, plan.num_experts
    per = pool.size // es
    err: dict[str, list[float]] = {p: [0.0, 0] for p in PROJECTIONS}
    with HashedFile(path) as out:
        for e0 in range(0, E, per):
            e1 = min(E, e0 + per)
            buf = pool.get()
            view = memoryview(buf)[:(e1 - e0) * es]
            if plan.out_bits == plan.quant.bits:
                fill_verbatim(src, plan, il, e0, e1, view)
            else:
                for p, (s, n) in fill_requant(src, plan, il, e0, e1, view,
                                              workers).items():
                    err[p][0] += s
                    err[p][1] += n
            out.write(view, done=lambda b=buf: pool.put(b))
            bar.update(len(view))
        digest = out.seal(lambda tmp: _check_layer(src, plan, il, tmp))
    return digest, {p: (v[0], int(v[1])) for p, v in err.items()}


def _prefetch(src: Source, plan: ExpertPlan, il: int, e0: int, e1: int) -> None:
    """Ask for experts [e0, e1) of every source tensor in one large read each
    (readahead alone would see 9 interleaved streams on one file and stay small)."""
    for c in plan.src_components:
        info = plan.tensors[(il, c.name)]
        os.posix_fadvise(tensor_fd(src, info), info.begin + e0 * c.size,
                         (e1 - e0) * c.size, os.POSIX_FADV_WILLNEED)


def _write_layer_kernel(src: Source, plan: ExpertPlan, il: int, path: Path,
                        bar: Progress, maps: SourceMaps) -> str:
    """Verbatim layer file by in-kernel copies, expert by expert, component by
    component, so the output is written strictly in order; the next batch of
    experts is prefetched while the current one is copied."""
    es, E = plan.expert_size, plan.num_experts
    per = max(1, min(E, BATCH_BYTES // es))
    comps = [(plan.tensors[(il, c.name)], c.size) for c in plan.src_components]
    with CopyFile(path, maps) as out:
        _prefetch(src, plan, il, 0, min(E, per))
        for e0 in range(0, E, per):
            e1 = min(E, e0 + per)
            if e1 < E:
                _prefetch(src, plan, il, e1, min(E, e1 + per))
            for ie in range(e0, e1):
                for info, size in comps:
                    out.copy(info.path, tensor_fd(src, info), info.begin + ie * size,
                             size)
            bar.update((e1 - e0) * es)
        return out.seal(lambda tmp: _check_layer(src, plan, il, tmp))


def _check_layer(src: Source, plan: ExpertPlan, il: int, tmp: Path) -> None:
    """Before the rename: size, and experts {0, 1, mid, last} read back equal to the
    source (catches misplaced offsets or a lost write)."""
    want_size = plan.file_bytes
    if tmp.stat().st_size != want_size:
        raise MoefluxIOError(f"{tmp}: {tmp.stat().st_size} bytes, expected "
                             f"{want_size}")
    with open(tmp, "rb") as f:
        for ie in sample_experts(plan.num_experts):
            f.seek(ie * plan.expert_size)
            if f.read(plan.expert_size) != expected_blob(src, plan, il, ie):
                raise MoefluxIOError(f"{tmp}: layer {il} expert {ie} reads back "
                                     "different from the source")


def run_repack(src: Source, dst: Path, journal: Journal, *, expert_bits: int = 4,
               progress: bool = True, check_space: bool = True) -> StepResult:
    """Write every MoE layer file and layout.json under ``dst``, skipping layers the
    journal shows finished. stats["rmse"] holds per-projection RMSE for 2-bit."""
    plan = plan_experts(src, expert_bits)
    sub = expert_dir_name(expert_bits)
    (dst / sub).mkdir(parents=True, exist_ok=True)
    res = StepResult()
    todo = [il for il in plan.moe_layers
            if journal.done(f"{sub}/{layer_file_name(il)}") is None]
    if check_space:
        check_disk(dst, len(todo) * plan.file_bytes)
    bar = Progress(len(todo) * plan.file_bytes, sub, progress)
    requantize = plan.out_bits != plan.quant.bits
    workers = ThreadPoolExecutor(REQUANT_THREADS) if requantize and \
        REQUANT_THREADS > 1 else None
    first = plan.tensors[(plan.moe_layers[0], COMPONENTS[0])]
    kernel = (USE_KERNEL_COPY and not requantize and bool(todo) and
              kernel_copy_works(dst / sub, tensor_fd(src, first)))
    # buffered path: one buffer being filled, one being written and hashed, a spare
    pool = BufferPool(3, _batch_experts(plan) * plan.expert_size) \
        if todo and not kernel else None
    maps = SourceMaps()
    try:
        for il in plan.moe_layers:
            rel = f"{sub}/{layer_file_name(il)}"
            if il not in todo:
                res.skipped.append(rel)
                continue
            if kernel:
                digest = _write_layer_kernel(src, plan, il, dst / rel, bar, maps)
                journal.record(rel, digest)
            else:
                assert pool is not None
                digest, err = _write_layer(src, plan, il, dst / rel, bar, pool,
                                           workers)
                journal.record(rel, digest,
                               sq_err={p: list(v) for p, v in err.items()})
            _after_layer(il)
    finally:
        bar.close()
        maps.close()
        if workers is not None:
            workers.shutdown()
    lay = json_bytes(plan.layout())
    rel = f"{sub}/layout.json"
    journal.record(rel, write_small_file(dst / rel, lay))
    remove_stale_layers(dst / sub, {layer_file_name(il) for il in plan.moe_layers})
    for il in plan.moe_layers:
        r = f"{sub}/{layer_file_name(il)}"
        res.files[r] = journal.files[r]["sha256"]
    res.files[rel] = journal.files[rel]["sha256"]
    res.stats["expert_size"] = plan.expert_size
    res.stats["bytes"] = plan.file_bytes * len(plan.moe_layers)
    if plan.out_bits != plan.quant.bits:
        res.stats["rmse"] = _rmse(journal, sub, plan.moe_layers)
    return res


def _rmse(journal: Journal, sub: str, layers: list[int]) -> dict[str, float]:
    tot = {p: [0.0, 0] for p in PROJECTIONS}
    for il in layers:
        for p, (s, n) in journal.files[f"{sub}/{layer_file_name(il)}"]["sq_err"].items():
            tot[p][0] += s
            tot[p][1] += n
    return {p: math.sqrt(s / n) if n else 0.0 for p, (s, n) in tot.items()}


def repack_experts(src: str | Path, dst: str | Path, *, expert_bits: int = 4,
                   progress: bool = True) -> StepResult:
    """Write ``dst``/packed_experts (or packed_experts_2bit) from the MLX checkpoint
    ``src``. Resumable.

    Raises:
        FormatError, ShapeError: the experts do not match config.json or the format.
        PrepIOError: not enough free space at ``dst``.
    """
    dst = Path(dst)
    with Source(src) as source:
        plan = plan_experts(source, expert_bits)  # refusals before dst is touched
        if not dst.exists():   # nothing to resume: the whole size, checked first
            check_disk(dst, len(plan.moe_layers) * plan.file_bytes)
        with DirLock(dst):
            journal = Journal(dst, source_key(source))
            return run_repack(source, dst, journal, expert_bits=expert_bits,
                              progress=progress)


def print_rmse(rmse: dict[str, float]) -> None:
    print("2-bit requantization RMSE vs source: " +
          ", ".join(f"{p} {v:.6f}" for p, v in rmse.items()))


def _cli(args: argparse.Namespace) -> int:
    res = repack_experts(args.src, args.dst, expert_bits=args.expert_bits,
                         progress=not args.no_progress)
    if "rmse" in res.stats:
        print_rmse(res.stats["rmse"])
    return 0


COMMAND = Command("repack-experts",
                  "routed experts -> packed_experts/layer_NN.bin + layout.json",
                  __doc__ or "", lambda p: add_src_dst_arguments(p, expert_bits=True), _cli)
register = COMMAND.register
main = COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
