"""repack-experts: the routed experts of an MLX checkpoint -> one file per MoE layer,
packed_experts/layer_NN.bin, plus packed_experts/layout.json (DESIGN.md "on-disk
contract", reference-system §2.2).

MLX stores each projection of a layer's experts stacked ([E, rows, cols], expert e a
contiguous slice). The engine wants the opposite grouping: everything one expert
needs in one contiguous blob, so a routed expert costs ONE pread. Layer file = E blobs
back to back, expert e at e * expert_size; blob = [gate W|S|B, up W|S|B, down W|S|B],
bytes verbatim. Mixed recipes (per-module bits / group sizes from config.json's
quantization block, projections mlx-lm left in float, per-expert ``.bias``) keep each
projection's own format and get a version-2 layout.json: per-component mode / bits /
group_size, components 16-byte aligned, and a table per layer where the recipe
changes with the layer (expert_size is then the largest blob).

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
from moeflux.prep._common import (Command, add_src_dst_arguments, COMPONENTS,
                                  FLOAT_DTYPES, PROJECTIONS, BufferPool, CopyFile, DirLock,
                                  HashedFile, SourceMaps, kernel_copy_works, Journal,
                                  Progress, Quant, Source, StepResult, check_disk,
                                  remove_stale_layers,
                                  expert_key, json_bytes, layer_file_name, nbytes_of,
                                  preadv_exact, source_key, tensor_fd, write_small_file)
from moeflux.prep.safetensors_io import NUMPY_VIEWS, TensorInfo

LAYOUT_FORMAT = "moeflux-experts"
# Version 1: the reference system's nine components, one affine format for all.
# Version 2: per-projection formats (mixed recipes, float components), per-expert
# output biases, per-layer component tables; written only when version 1 cannot say it.
LAYOUT_VERSION = 1
LAYOUT_VERSION_MIXED = 2
# Component offsets of a version-2 blob are aligned to this many bytes (the GPU
# kernels read 16-byte vectors; every element type divides it).
COMPONENT_ALIGN = 16
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
    """One part of an expert blob: per-expert shape and where it sits in the blob;
    weight components also say how the projection is stored (mode "affine" with its
    bits / group_size, or "float")."""

    name: str               # "gate_proj.weight", ...
    offset: int
    size: int
    dtype: str
    shape: tuple[int, ...]  # per expert
    mode: str | None = None
    bits: int = 0
    group_size: int = 0

    def as_json(self, version: int) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "offset": self.offset,
                               "size": self.size, "dtype": self.dtype,
                               "shape": list(self.shape)}
        if version >= LAYOUT_VERSION_MIXED and self.mode is not None:
            out["mode"] = self.mode
            if self.mode in ("affine", "mxfp4"):
                out["bits"], out["group_size"] = self.bits, self.group_size
        return out


@dataclass(frozen=True)
class ProjFormat:
    """How one projection of a layer's experts is stored in the source."""

    quant: Quant | None      # None: float weight
    wdtype: str              # U32, or the float dtype
    sdtype: str | None       # scales / biases dtype (affine)
    bias_dtype: str | None   # per-expert output bias, None when absent


@dataclass
class ExpertPlan:
    """Everything repacking needs: which layers, which source tensors, the layout
    (each MoE layer's components; uniform recipes share one table)."""

    arch: str
    num_layers: int
    num_experts: int
    moe_layers: list[int]
    quant: Quant | None            # of the source experts when uniform affine, else None
    layer_src: dict[int, list[Component]]
    out_bits: int                  # 2 when requantized, else quant.bits (0 when mixed)
    layer_out: dict[int, list[Component]]
    expert_size: int
    version: int = LAYOUT_VERSION
    requantize: bool = False
    tensors: dict[tuple[int, str], TensorInfo] = field(default_factory=dict)

    @property
    def src_components(self) -> list[Component]:
        return self.layer_src[self.moe_layers[0]]

    @property
    def out_components(self) -> list[Component]:
        return self.layer_out[self.moe_layers[0]]

    def layout(self) -> dict[str, Any]:
        first = self.out_components
        lay: dict[str, Any] = {
            "format": LAYOUT_FORMAT, "version": self.version,
            "expert_size": self.expert_size, "num_layers": self.num_layers,
            "num_experts": self.num_experts, "moe_layers": self.moe_layers}
        gate = first[0]
        if gate.mode == "affine":
            lay["bits"], lay["group_size"] = gate.bits, gate.group_size
        lay["components"] = [c.as_json(self.version) for c in first]
        other = {str(il): [c.as_json(self.version) for c in comps]
                 for il, comps in self.layer_out.items() if comps != first}
        if other:
            lay["layer_components"] = other
        if self.requantize:
            assert self.quant is not None
            lay["requantized_from"] = {"bits": self.quant.bits,
                                       "group_size": self.quant.group_size}
        return lay

    @property
    def file_bytes(self) -> int:
        return self.expert_size * self.num_experts


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _components(dims: dict[str, tuple[int, int]], fmts: dict[str, ProjFormat],
                align: int) -> list[Component]:
    """The blob components for projections of (rows, n_in) stored as ``fmts``, each
    at an offset aligned to ``align`` (1: back to back, the version-1 blob)."""
    out, off = [], 0

    def add(name: str, dtype: str, shape: tuple[int, ...], **fmt: Any) -> None:
        nonlocal off
        off = _align(off, align)
        size = nbytes_of(dtype, shape)
        out.append(Component(name, off, size, dtype, shape, **fmt))
        off += size

    for proj in PROJECTIONS:
        rows, n_in = dims[proj]
        f = fmts[proj]
        if f.quant is None:
            add(f"{proj}.weight", f.wdtype, (rows, n_in), mode="float")
        elif f.quant.mode == "mxfp4":   # E2M1 codes, U8 E8M0 scales, no biases
            add(f"{proj}.weight", "U32", (rows, n_in // 8), mode="mxfp4", bits=4,
                group_size=32)
            add(f"{proj}.scales", "U8", (rows, n_in // 32))
        else:
            q = f.quant
            add(f"{proj}.weight", "U32", (rows, n_in * q.bits // 32), mode="affine",
                bits=q.bits, group_size=q.group_size)
            assert f.sdtype is not None
            add(f"{proj}.scales", f.sdtype, (rows, n_in // q.group_size))
            add(f"{proj}.biases", f.sdtype, (rows, n_in // q.group_size))
        if f.bias_dtype is not None:
            add(f"{proj}.bias", f.bias_dtype, (rows,))
    return out


def _blob_size(comps: list[Component]) -> int:
    return max(c.offset + c.size for c in comps)


def _proj_format(src: Source, names: dict[str, str], il: int, proj: str,
                 dims: tuple[int, int], E: int) -> ProjFormat:
    """Check one projection's stacked source tensors against config.json and return
    its format: affine (the config's entry or default for the module), or float (a
    module mlx-lm left unquantized: no .scales, e.g. an input size that is not a
    multiple of the group size)."""
    rows, n_in = dims
    key = f"{proj}.weight"
    if key not in names:
        raise FormatError(f"layer {il}: {src.family.ffn_module}."
                          f"{src.family.expert_module}.{key} missing "
                          f"(have {sorted(names)})")
    module = names[key][:-len(".weight")]
    q = src.quant_of(module)
    w = src.ckpt.info(f"{module}.weight")
    bias = src.ckpt.info(f"{module}.bias") if f"{module}.bias" in src.ckpt else None
    if bias is not None and (bias.dtype not in FLOAT_DTYPES or bias.shape != (E, rows)):
        raise ShapeError(f"{bias.name}: {bias.dtype}{list(bias.shape)}, expected a float "
                         f"[{E}, {rows}] per-expert bias")
    bdt = bias.dtype if bias is not None else None
    if q is None:
        if w.dtype not in FLOAT_DTYPES or w.shape != (E, rows, n_in):
            raise ShapeError(f"{w.name}: {w.dtype}{list(w.shape)}, expected a float "
                             f"[{E}, {rows}, {n_in}] (not quantized: no .scales) from "
                             f"config num_experts={E}")
        return ProjFormat(None, w.dtype, None, bdt)
    s = src.ckpt.info(f"{module}.scales")
    want_w = (E, rows, n_in * q.bits // 32)
    want_s = (E, rows, n_in // q.group_size)
    if w.shape != want_w:
        raise ShapeError(f"{w.name}: shape {list(w.shape)}, expected {list(want_w)} from "
                         f"config num_experts={E}, hidden_size / {src.family.expert_ff_key} "
                         f"{rows}x{n_in} at {q.bits} bits")
    if s.shape != want_s:
        raise ShapeError(f"{s.name}: shape {list(s.shape)}, expected {list(want_s)} "
                         f"(group_size {q.group_size})")
    return ProjFormat(q, "U32", s.dtype, bdt)


def _found_experts(src: Source) -> dict[int, dict[str, str]]:
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
            f"{src.dir}: routed experts ({src.family.ffn_module}."
            f"{src.family.expert_module}.*) found in layers "
            f"{sorted(found)} but config.json ({src.arch}) makes layers {expected} MoE"
            + (f"; missing in {missing}" if missing else "")
            + (f"; unexpected in {extra}" if extra else ""))
    return found


def _uniform_quant(fmts: dict[int, dict[str, ProjFormat]]) -> Quant | None:
    """The one affine format of every projection of every layer (no biases), or
    None when the recipe mixes formats: then layout version 2 describes it."""
    all_f = [f for per in fmts.values() for f in per.values()]
    f0 = all_f[0]
    if f0.quant is None or f0.quant.mode != "affine" or \
            any(f != f0 or f.bias_dtype is not None for f in all_f):
        return None
    return f0.quant


def plan_experts(src: Source, expert_bits: int = 4) -> ExpertPlan:
    """Find and check every routed-expert tensor against config.json; raises
    FormatError / ShapeError naming the tensor and what was expected. Each
    projection keeps the format its source has (mixed recipes: per-module bits and
    group sizes, float components); uniform affine experts give the version-1 layout
    of the reference system."""
    if expert_bits not in (2, 4):
        raise ArgumentError(f"expert_bits={expert_bits}: 4 (copy the source's experts "
                          "as they are) or 2 (requantize to 2-bit) are supported")
    found = _found_experts(src)
    expected = src.moe_layers_expected()
    E = src.num_experts
    if not expected or E <= 0:
        raise FormatError(f"{src.dir}: no routed experts (config.json gives "
                          f"num_experts={E})")
    hid = src.cfg_int("hidden_size")
    inter = src.cfg_int(src.family.expert_ff_key)
    dims = {"gate_proj": (inter, hid), "up_proj": (inter, hid), "down_proj": (hid, inter)}
    fmts = {il: {p: _proj_format(src, found[il], il, p, dims[p], E) for p in PROJECTIONS}
            for il in expected}
    tensors: dict[tuple[int, str], TensorInfo] = {}
    for il in expected:
        for name in found[il].values():
            k = expert_key(name)
            assert k is not None
            tensors[(il, f"{k[1]}.{k[2]}")] = src.ckpt.info(name)
    quant = _uniform_quant(fmts)
    version = LAYOUT_VERSION if quant is not None else LAYOUT_VERSION_MIXED
    align = 1 if version == LAYOUT_VERSION else COMPONENT_ALIGN
    layer_src = {il: _components(dims, fmts[il], align) for il in expected}
    requantize = expert_bits == 2 and (quant is None or quant.bits != 2)
    if requantize and quant is None:
        raise FormatError(f"{src.dir}: expert_bits=2 requantizes experts of one affine "
                          "format; this checkpoint's experts mix formats (a mixed recipe, "
                          "float or mxfp4 components, per-expert biases): convert them as "
                          "they are (4)")
    layer_out = layer_src
    if requantize:
        assert quant is not None
        f2 = ProjFormat(Quant(2, quant.group_size), "U32", "BF16", None)
        layer_out = {il: _components(dims, {p: f2 for p in PROJECTIONS}, 1)
                     for il in expected}
    es = max(_align(_blob_size(c), align) for c in layer_out.values())
    out_bits = 2 if requantize else (quant.bits if quant is not None else 0)
    return ExpertPlan(src.arch, src.num_layers, E, expected, quant, layer_src, out_bits,
                      layer_out, es, version, requantize, tensors)


# ==== filling output buffers ====

def fill_verbatim(src: Source, plan: ExpertPlan, il: int, e0: int, e1: int,
                  view: memoryview) -> None:
    """Experts [e0, e1) of layer ``il`` into ``view`` (blobs back to back): one
    scatter-read per source tensor."""
    es = plan.expert_size
    comps = plan.layer_src[il]
    if plan.version != LAYOUT_VERSION:   # gaps between components stay zero
        view[:] = bytes(len(view))
    for c in comps:
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
    srcc = {c.name: c for c in plan.layer_src[il]}
    assert plan.quant is not None
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
        for c in plan.layer_out[il]:
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
    blob = bytearray(plan.expert_size)
    if not plan.requantize:
        for c in plan.layer_src[il]:
            blob[c.offset:c.offset + c.size] = src.ckpt.read(
                plan.tensors[(il, c.name)].name, ie * c.size, c.size)
        return bytes(blob)
    parts, _ = requant_experts(src, plan, il, ie, ie + 1)
    for c in plan.layer_out[il]:
        blob[c.offset:c.offset + c.size] = np.ascontiguousarray(parts[c.name]).tobytes()
    return bytes(blob)


def sample_experts(n: int) -> list[int]:
    return sorted({0, 1 % n, n // 2, n - 1})


# ==== per-layer files ====

def _after_layer(il: int) -> None:
    """Called once layer ``il`` is committed and journaled (tests inject failures)."""


def _batch_experts(plan: ExpertPlan) -> int:
    """Experts per output buffer: ~BATCH_BYTES, and bounded f32 work when
    requantizing (a few f32 copies of each projection are alive at once)."""
    per = max(1, min(plan.num_experts, BATCH_BYTES // plan.expert_size, 256))
    if plan.requantize:
        assert plan.quant is not None
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
            if not plan.requantize:
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
    for c in plan.layer_src[il]:
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
    # (source, offset in the blob, size); gaps between components written as zeros
    comps = [(plan.tensors[(il, c.name)], c.offset, c.size) for c in plan.layer_src[il]]
    with CopyFile(path, maps) as out:
        _prefetch(src, plan, il, 0, min(E, per))
        for e0 in range(0, E, per):
            e1 = min(E, e0 + per)
            if e1 < E:
                _prefetch(src, plan, il, e1, min(E, e1 + per))
            for ie in range(e0, e1):
                pos = 0
                for info, off, size in comps:
                    if off > pos:
                        out.write(bytes(off - pos))
                    out.copy(info.path, tensor_fd(src, info), info.begin + ie * size,
                             size)
                    pos = off + size
                if es > pos:
                    out.write(bytes(es - pos))
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
    requantize = plan.requantize
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
    if plan.requantize:
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
