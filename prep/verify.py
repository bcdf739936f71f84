"""verify: check a converted model directory, optionally against its source.

Checks, each reporting exactly what differs:
- model_weights.json vs model_weights.bin: every range inside the file, 64-byte
  aligned, non-overlapping, size = prod(shape) * dtype size, bits on packed tensors;
- the expert layout vs config.json: version 1 components in blob order and
  contiguous, version 2 (mixed recipes) components aligned, inside the blob and
  disjoint, in every layer's table; expert_size, per-expert shapes from hidden_size /
  moe_intermediate_size and each projection's format (bits / group_size, or float),
  num_experts, MoE layers, and every layer file's size;
- sha256 of every file listed in moeflux.json;
- with a source: every tensor of model_weights.bin byte for byte, and expert blobs
  (experts {0, 1, mid, last} and a few more per layer by default, all with --full;
  2-bit blobs against a fresh requantization of the source).

    python -m moeflux.prep verify DST [--src SRC] [--full]     (exit 1 on differences)
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeflux.errors import MoefluxError
from moeflux.prep import checksums
from moeflux.prep._common import (Command, COMPONENTS, ModelConfig, Source,
                                  layer_file_name, nbytes_of, CHUNK_BYTES)
from moeflux.prep.extract_weights import (ALIGN, BIN_NAME, JSON_NAME, plan_weights,
                                          widen_to_f32)
from moeflux.prep.repack_experts import (COMPONENT_ALIGN, expected_blob, plan_experts,
                                         sample_experts)
from moeflux.prep.safetensors_io import DTYPE_SIZES

MANIFEST_NAME = checksums.MANIFEST_NAME
EXTRA_SAMPLES = 4


@dataclass
class VerifyReport:
    """Outcome of ``verify``: ``problems`` lists every difference found (file, layer,
    expert, component, first differing offset where that applies)."""

    dst: Path
    problems: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, msg: str) -> None:
        self.problems.append(msg)

    def count(self, what: str, n: int = 1) -> None:
        self.checked[what] = self.checked.get(what, 0) + n

    def __str__(self) -> str:
        head = f"{self.dst}: " + ("OK" if self.ok else f"{len(self.problems)} problem(s)")
        counts = ", ".join(f"{v} {k}" for k, v in sorted(self.checked.items()))
        lines = [head + (f" ({counts} checked)" if counts else "")]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def _load_json(path: Path, rep: VerifyReport) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        rep.add(f"{path.name}: missing")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        rep.add(f"{path.name}: not JSON ({exc})")
    return None


def _check_manifest(dst: Path, rep: VerifyReport) -> dict[str, Any] | None:
    man = _load_json(dst / JSON_NAME, rep)
    bin_path = dst / BIN_NAME
    if man is None:
        return None
    if not bin_path.is_file():
        rep.add(f"{BIN_NAME}: missing")
        return None
    bin_size = bin_path.stat().st_size
    tensors = man.get("tensors", {})
    if man.get("num_tensors") != len(tensors):
        rep.add(f"{JSON_NAME}: num_tensors {man.get('num_tensors')} but "
                f"{len(tensors)} entries")
    spans = []
    for name, t in tensors.items():
        try:
            off, size, dtype, shape = t["offset"], t["size"], t["dtype"], t["shape"]
        except KeyError as exc:
            rep.add(f"{JSON_NAME}: tensor {name}: missing field {exc}")
            continue
        if dtype not in DTYPE_SIZES:
            rep.add(f"{JSON_NAME}: tensor {name}: unknown dtype {dtype!r}")
            continue
        if off % ALIGN:
            rep.add(f"{BIN_NAME}: tensor {name} at offset {off}, not {ALIGN}-byte "
                    "aligned")
        if size != nbytes_of(dtype, shape):
            rep.add(f"{JSON_NAME}: tensor {name}: size {size} but shape {shape} "
                    f"{dtype} is {nbytes_of(dtype, shape)} bytes")
        if off + size > bin_size:
            rep.add(f"{BIN_NAME}: tensor {name} [{off}, {off + size}) past the end of "
                    f"the file ({bin_size} bytes)")
        if dtype == "U32" and ("bits" not in t or "group_size" not in t):
            rep.add(f"{JSON_NAME}: packed tensor {name} has no bits/group_size")
        spans.append((off, off + size, name))
    spans.sort()
    for (a0, a1, an), (b0, _, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            rep.add(f"{BIN_NAME}: tensors {an} [{a0}, {a1}) and {bn} overlap at {b0}")
    rep.count("tensor ranges", len(spans))
    return man


def _expert_dir(dst: Path, info: dict[str, Any] | None) -> str:
    if info and info.get("expert_dir"):
        return str(info["expert_dir"])
    if (dst / "packed_experts").is_dir() or not (dst / "packed_experts_2bit").is_dir():
        return "packed_experts"
    return "packed_experts_2bit"


def _check_layout(dst: Path, sub: str, cfg: ModelConfig | None, rep: VerifyReport
                  ) -> dict[str, Any] | None:
    lay = _load_json(dst / sub / "layout.json", rep)
    if lay is None:
        return None
    version = lay.get("version", 1)
    if version not in (1, 2):
        rep.add(f"{sub}/layout.json: version {version!r}; this prep writes 1 or 2")
        return None
    tables = {"components": lay.get("components", [])}
    if version == 1:
        if not _check_v1_table(sub, tables["components"], lay, rep):
            return None
    else:
        for il, comps in (lay.get("layer_components") or {}).items():
            tables[f"layer_components[{il}]"] = comps
        for where, comps in tables.items():
            if not _check_v2_table(sub, where, comps, lay, rep):
                return None
    if cfg is not None:
        _check_layout_vs_config(sub, lay, tables, cfg, rep)
    es, ne = lay.get("expert_size", 0), lay.get("num_experts", 0)
    # the reference system's layouts have no moe_layers: config.json decides
    layers = lay.get("moe_layers")
    if layers is None:
        layers = cfg.moe_layers_expected() if cfg is not None else []
    for il in layers:
        p = dst / sub / layer_file_name(il)
        if not p.is_file():
            rep.add(f"{sub}/{p.name}: missing (layer {il} is MoE)")
        elif p.stat().st_size != es * ne:
            rep.add(f"{sub}/{p.name}: {p.stat().st_size} bytes, expected "
                    f"{ne} experts * {es} = {es * ne}")
        rep.count("layer files")
    return lay


def _check_v1_table(sub: str, comps: list[dict[str, Any]], lay: dict[str, Any],
                    rep: VerifyReport) -> bool:
    """The reference system's blob: the nine components back to back."""
    names = [c.get("name") for c in comps]
    if names != list(COMPONENTS):
        rep.add(f"{sub}/layout.json: components {names}, expected {list(COMPONENTS)}")
        return False
    off = 0
    for c in comps:
        if c["offset"] != off:
            rep.add(f"{sub}/layout.json: {c['name']} at blob offset {c['offset']}, "
                    f"expected {off} (components are back to back)")
        if c["size"] != nbytes_of(c["dtype"], c["shape"]):
            rep.add(f"{sub}/layout.json: {c['name']} size {c['size']} but shape "
                    f"{c['shape']} {c['dtype']} is {nbytes_of(c['dtype'], c['shape'])}")
        off = c["offset"] + c["size"]
    if lay.get("expert_size") != off:
        rep.add(f"{sub}/layout.json: expert_size {lay.get('expert_size')}, components "
                f"add up to {off}")
    return True


def _check_v2_table(sub: str, where: str, comps: Any, lay: dict[str, Any],
                    rep: VerifyReport) -> bool:
    """A version-2 component list: known dtypes, sizes equal to shapes, each inside
    the blob at an aligned offset, none overlapping."""
    es = lay.get("expert_size", 0)
    if not isinstance(comps, list) or not comps:
        rep.add(f"{sub}/layout.json: {where} must be a non-empty list")
        return False
    spans = []
    for c in comps:
        try:
            name, off, size, dtype, shape = (c["name"], c["offset"], c["size"],
                                             c["dtype"], c["shape"])
        except (KeyError, TypeError) as exc:
            rep.add(f"{sub}/layout.json: {where}: a component lacks {exc}")
            return False
        if dtype not in DTYPE_SIZES:
            rep.add(f"{sub}/layout.json: {where}: {name}: unknown dtype {dtype!r}")
            return False
        if size != nbytes_of(dtype, shape):
            rep.add(f"{sub}/layout.json: {where}: {name} size {size} but shape {shape} "
                    f"{dtype} is {nbytes_of(dtype, shape)}")
        if off % COMPONENT_ALIGN or off + size > es:
            rep.add(f"{sub}/layout.json: {where}: {name} [{off}, {off + size}) not "
                    f"{COMPONENT_ALIGN}-byte aligned inside the {es}-byte expert")
        spans.append((off, off + size, name))
    spans.sort()
    for (a0, a1, an), (b0, _, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            rep.add(f"{sub}/layout.json: {where}: components {an} and {bn} overlap")
    return True


def _want_shapes(comps: list[dict[str, Any]], dims: dict[str, tuple[int, int]],
                 bits: Any, gs: Any) -> dict[str, list[int]]:
    """Per component, the shape config.json implies given each weight's format
    (version 1: the layout's bits / group_size for every projection)."""
    want: dict[str, list[int]] = {}
    for c in comps:
        proj, _, part = c["name"].rpartition(".")
        if part != "weight" or proj not in dims:
            continue
        rows, n_in = dims[proj]
        b, g = c.get("bits", bits), c.get("group_size", gs)
        if c["dtype"] != "U32":
            want[c["name"]] = [rows, n_in]
        elif c.get("mode") == "mxfp4":   # no biases: their absence is checked here too
            want[c["name"]] = [rows, n_in // 8]
            want[f"{proj}.scales"] = [rows, n_in // 32]
        elif isinstance(b, int) and isinstance(g, int) and b > 0 and g > 0:
            want[c["name"]] = [rows, n_in * b // 32]
            want[f"{proj}.scales"] = want[f"{proj}.biases"] = [rows, n_in // g]
        want[f"{proj}.bias"] = [rows]
    return want


def _check_layout_vs_config(sub: str, lay: dict[str, Any],
                            tables: dict[str, list[dict[str, Any]]], cfg: ModelConfig,
                            rep: VerifyReport) -> None:
    try:
        hid, inter = cfg.cfg_int("hidden_size"), cfg.cfg_int(cfg.family.expert_ff_key)
    except MoefluxError as exc:
        rep.add(str(exc))
        return
    bits, gs = lay.get("bits"), lay.get("group_size")
    if lay.get("version", 1) == 1 and (not isinstance(bits, int) or
                                       not isinstance(gs, int) or bits <= 0 or gs <= 0):
        rep.add(f"{sub}/layout.json: bits {bits!r} / group_size {gs!r} invalid")
        return
    dims = {"gate_proj": (inter, hid), "up_proj": (inter, hid), "down_proj": (hid, inter)}
    for where, comps in tables.items():
        want = _want_shapes(comps, dims, bits, gs)
        for c in comps:
            if c["name"] not in want:
                rep.add(f"{sub}/layout.json: {where}: {c['name']} is not a part of an "
                        "expert projection of this format")
            elif list(c["shape"]) != want[c["name"]]:
                rep.add(f"{sub}/layout.json: {where}: {c['name']} shape {c['shape']}, "
                        f"expected {want[c['name']]} (hidden_size {hid}, "
                        f"{cfg.family.expert_ff_key} {inter}, {c.get('bits', bits)}-bit "
                        f"gs{c.get('group_size', gs)})")
    if lay.get("num_experts") != cfg.num_experts:
        rep.add(f"{sub}/layout.json: num_experts {lay.get('num_experts')}, config.json "
                f"says {cfg.num_experts}")
    if lay.get("num_layers") != cfg.num_layers:
        rep.add(f"{sub}/layout.json: num_layers {lay.get('num_layers')}, config.json "
                f"says {cfg.num_layers}")
    if "moe_layers" in lay and lay["moe_layers"] != cfg.moe_layers_expected():
        rep.add(f"{sub}/layout.json: moe_layers {lay['moe_layers']}, config.json makes "
                f"{cfg.moe_layers_expected()} MoE")


def _check_checksums(dst: Path, info: dict[str, Any], rep: VerifyReport) -> None:
    entries = checksums.listed(info)
    for rel, want, got in checksums.check(dst, entries):
        if got == "missing":
            rep.add(f"{rel}: missing (listed in {MANIFEST_NAME})")
        elif got == "unknown algorithm":
            rep.add(f"{rel}: checksum algorithm {want.partition(':')[0]!r} unknown")
        else:
            rep.add(f"{rel}: sha256 {got[7:23]}... differs from {MANIFEST_NAME}'s "
                    f"{want[7:23]}... (file changed or corrupt)")
    rep.count("checksums", sum(1 for rel, want in entries
                               if want.startswith("sha256:") and (dst / rel).is_file()))


def _first_diff(a: bytes, b: bytes) -> int:
    """Index of the first differing byte (len of the shorter when one is a prefix)."""
    n = min(len(a), len(b))
    lo = 0
    # narrow down in blocks first: fast for large equal prefixes
    step = 4096
    while lo < n and a[lo:lo + step] == b[lo:lo + step]:
        lo += step
    for i in range(lo, min(n, lo + step)):
        if a[i] != b[i]:
            return i
    return n


def _diff_tensor(f: Any, offset: int, src: Source, e: Any) -> int | None:
    """First differing byte of tensor ``e`` at ``offset`` of the open bin vs the
    source, compared in chunks (a tensor can be GBs); None when equal."""
    if e.widen:  # small: widened whole
        want = widen_to_f32(src.ckpt.read(e.src_name), e.info.dtype)
        f.seek(offset)
        got = f.read(len(want))
        return None if got == want else _first_diff(got, want)
    f.seek(offset)
    for start in range(0, e.info.nbytes, CHUNK_BYTES):
        n = min(CHUNK_BYTES, e.info.nbytes - start)
        want = src.ckpt.read(e.src_name, start, n)
        got = f.read(n)
        if got != want:
            return start + _first_diff(got, want)
    return None


def _compare_weights(dst: Path, man: dict[str, Any], src: Source, rep: VerifyReport
                     ) -> None:
    entries, _ = plan_weights(src)
    tensors = man.get("tensors", {})
    want_names = {e.name for e in entries}
    for name in sorted(set(tensors) - want_names):
        rep.add(f"{JSON_NAME}: tensor {name} is not a non-expert tensor of the source")
    with open(dst / BIN_NAME, "rb") as f:
        for e in entries:
            t = tensors.get(e.name)
            if t is None:
                rep.add(f"{JSON_NAME}: source tensor {e.src_name} missing")
                continue
            if (t.get("dtype"), list(t.get("shape", []))) != (e.dtype, list(e.shape)):
                rep.add(f"{JSON_NAME}: tensor {e.name} is {t.get('dtype')}"
                        f"{t.get('shape')}, source gives {e.dtype}{list(e.shape)}")
                continue
            if e.quant is not None and (t.get("bits"), t.get("group_size")) != (
                    e.quant.bits, e.quant.group_size):
                rep.add(f"{JSON_NAME}: tensor {e.name} bits/group_size "
                        f"{t.get('bits')}/{t.get('group_size')}, config.json gives "
                        f"{e.quant.bits}/{e.quant.group_size}")
            i = _diff_tensor(f, t["offset"], src, e)
            if i is not None:
                rep.add(f"{BIN_NAME}: tensor {e.name} differs from the source at file "
                        f"offset {t['offset'] + i} (byte {i} of the tensor)")
            rep.count("tensors compared")


def _compare_experts(dst: Path, sub: str, lay: dict[str, Any], src: Source,
                     full: bool, rep: VerifyReport) -> None:
    plan = plan_experts(src, 2 if sub == "packed_experts_2bit" else 4)
    es, ne = plan.expert_size, plan.num_experts
    if (es, ne) != (lay.get("expert_size"), lay.get("num_experts")):
        rep.add(f"{sub}/layout.json: expert_size/num_experts {lay.get('expert_size')}/"
                f"{lay.get('num_experts')}, the source gives {es}/{ne}")
        return
    want = plan.layout()
    for key in ("components", "layer_components"):
        if lay.get(key) != want.get(key):
            rep.add(f"{sub}/layout.json: {key} differ from what the source's experts "
                    "give (formats, offsets or shapes)")
            return
    rng = random.Random(0)
    for il in plan.moe_layers:
        p = dst / sub / layer_file_name(il)
        if not p.is_file():
            continue  # already reported by the layout check
        if full:
            experts = list(range(ne))
        else:
            experts = sorted(set(sample_experts(ne)) |
                             set(rng.sample(range(ne), min(ne, EXTRA_SAMPLES))))
        with open(p, "rb") as f:
            for ie in experts:
                f.seek(ie * es)
                got = f.read(es)
                want = expected_blob(src, plan, il, ie)
                rep.count("experts compared")
                if got == want:
                    continue
                i = _first_diff(got, want)
                comp = next((c for c in plan.layer_out[il]
                             if c.offset <= i < c.offset + c.size), None)
                where = (f"component {comp.name} byte {i - comp.offset}" if comp
                         else f"past the blob (file short: {len(got)} of {es} bytes)")
                rep.add(f"{sub}/{p.name}: layer {il} expert {ie} differs from the "
                        f"source at file offset {ie * es + i} ({where})")


def verify(dst: str | Path, src: str | Path | None = None, full: bool = False
           ) -> VerifyReport:
    """Check the model directory ``dst`` (and, given ``src``, its bytes against the
    source checkpoint). Never raises on a bad directory: every finding goes into the
    returned report, whose ``ok`` is False when anything differs."""
    dst = Path(dst)
    rep = VerifyReport(dst)
    info = _load_json(dst / MANIFEST_NAME, rep)
    cfg: ModelConfig | None = None
    try:
        cfg = ModelConfig(dst)
    except MoefluxError as exc:
        rep.add(f"config.json: {exc}")
    man = _check_manifest(dst, rep)
    sub = _expert_dir(dst, info)
    lay = _check_layout(dst, sub, cfg, rep)
    if info is not None:
        _check_checksums(dst, info, rep)
    if src is not None:
        try:
            with Source(src) as source:
                if man is not None:
                    _compare_weights(dst, man, source, rep)
                if lay is not None:
                    _compare_experts(dst, sub, lay, source, full, rep)
        except MoefluxError as exc:
            rep.add(f"source {src}: {exc}")
    return rep


def _cli(args: argparse.Namespace) -> int:
    rep = verify(args.dst, args.src, args.full)
    print(rep)
    return 0 if rep.ok else 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dst", help="model directory to check")
    p.add_argument("--src", help="source MLX checkpoint to compare bytes against")
    p.add_argument("--full", action="store_true",
                   help="compare every expert (default: a sample per layer)")


COMMAND = Command("verify", "check a model directory (and against its source)",
                  __doc__ or "", add_arguments, _cli)
register = COMMAND.register
main = COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
