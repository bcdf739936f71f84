"""convert: an MLX checkpoint -> a complete moeflux model directory.

Runs extract-weights and repack-experts, copies config.json and the tokenizer files,
and writes moeflux.json (format version, architecture, source provenance, sha256 of
every output file computed while it was written) LAST: a directory with moeflux.json
is a finished conversion. Everything is planned and checked (shapes, quantization,
free space) before the first byte is written; an interrupted run resumes where it
stopped (finished files are recorded in a journal).

    python -m moeflux.prep convert SRC DST [--expert-bits 2] [--no-progress]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import moeflux
from moeflux.errors import ArgumentError
from moeflux.prep._common import (Command, add_src_dst_arguments, TOKENIZER_FILES,
                                  JOURNAL_NAME, DirLock, Journal, Source, check_disk,
                                  json_bytes,
                                  layer_file_name, source_key, write_small_file)
from moeflux.prep.extract_weights import BIN_NAME, plan_weights, run_extract
from moeflux.prep.repack_experts import (expert_dir_name, plan_experts, print_rmse,
                                         run_repack)

FORMAT_VERSION = 1
MANIFEST_NAME = "moeflux.json"


def _space_needed(source: Source, journal: Journal, expert_bits: int) -> int:
    _, bin_size = plan_weights(source)
    plan = plan_experts(source, expert_bits)
    sub = expert_dir_name(expert_bits)
    need = 0 if journal.done(BIN_NAME) else bin_size
    for il in plan.moe_layers:
        if journal.done(f"{sub}/{layer_file_name(il)}") is None:
            need += plan.file_bytes
    for name in ("config.json",) + TOKENIZER_FILES:
        p = source.dir / name
        if p.exists():
            need += p.stat().st_size
    return need


def _copy_small(source: Source, dst: Path, journal: Journal) -> dict[str, str]:
    """config.json (as is) and whichever tokenizer files the checkpoint has."""
    out = {}
    for name in ("config.json",) + TOKENIZER_FILES:
        p = source.dir / name
        if not p.is_file():
            continue
        ent = journal.done(name)
        if ent is None:
            journal.record(name, write_small_file(dst / name, p.read_bytes()))
        out[name] = journal.files[name]["sha256"]
    return out


def _source_info(source: Source) -> dict[str, Any]:
    index = source.dir / "model.safetensors.index.json"
    return {"path": str(source.dir.resolve()),
            "index": index.name if index.exists() else None,
            "files": [{"name": p.name, "size": p.stat().st_size}
                      for p in sorted(source.ckpt.files)]}


def convert(src: str | Path, dst: str | Path, *, expert_bits: int = 4,
            progress: bool = True) -> Path:
    """Convert the MLX checkpoint ``src`` into the model directory ``dst``.

    Args:
        src: directory with config.json and model*.safetensors (mlx-community layout).
        dst: output directory (created; a previous partial run there is resumed).
        expert_bits: 4 copies the experts as they are into packed_experts/; 2
            requantizes them into packed_experts_2bit/.
        progress: show tqdm progress bars (bytes/s) when tqdm is installed.

    Returns:
        ``dst`` as a Path.

    Raises:
        FormatError, ShapeError: the checkpoint is raw HF, non-affine, of an unknown
            model_type, or its shapes disagree with config.json. Nothing is written.
        PrepIOError: not enough free space at ``dst``. Nothing is written.
    """
    dst = Path(dst)
    if dst.resolve() == Path(src).resolve():
        raise ArgumentError(f"{dst}: the output directory must not be the source "
                            "checkpoint's directory")
    with Source(src) as source:
        # Every refusal (shapes, quantization, layout) happens here, before dst is
        # touched at all.
        plan_weights(source)
        plan_experts(source, expert_bits)
        # The space check too, before dst is created: a refusal leaves nothing.
        check_disk(dst, _space_needed(source, Journal(dst, source_key(source)),
                                      expert_bits))
        with DirLock(dst) as lock:
            _convert_locked(source, dst, expert_bits, progress)
            # A finished directory holds the model only: the resume journal has
            # served its purpose, and the lock file goes while still held.
            (dst / JOURNAL_NAME).unlink(missing_ok=True)
            lock.remove_file()
    return dst


def _convert_locked(source: Source, dst: Path, expert_bits: int, progress: bool
                    ) -> None:
    """The writing half of convert(), with dst locked."""
    journal = Journal(dst, source_key(source))
    check_disk(dst, _space_needed(source, journal, expert_bits))
    # The manifest marks a finished directory: drop an old one before touching
    # anything, so an interrupted rerun never looks finished.
    (dst / MANIFEST_NAME).unlink(missing_ok=True)
    weights = run_extract(source, dst, journal, progress=progress,
                          check_space=False)
    experts = run_repack(source, dst, journal, expert_bits=expert_bits,
                         progress=progress, check_space=False)
    small = _copy_small(source, dst, journal)
    files = {**weights.files, **experts.files, **small}
    man: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "architecture": source.arch,
        "created_by": f"moeflux.prep {moeflux.__version__}",
        "source": _source_info(source),
        # the experts' bits; 0 for a mixed recipe (packed_experts/layout.json says
        # each projection's format)
        "expert_bits": plan_experts(source, expert_bits).out_bits,
        "expert_dir": expert_dir_name(expert_bits),
        "checksums": {k: f"sha256:{v}" for k, v in sorted(files.items())},
    }
    if "rmse" in experts.stats:
        man["requant_rmse"] = experts.stats["rmse"]
    write_small_file(dst / MANIFEST_NAME, json_bytes(man))
    if "rmse" in experts.stats and progress:
        print_rmse(experts.stats["rmse"])


def _cli(args: argparse.Namespace) -> int:
    dst = convert(args.src, args.dst, expert_bits=args.expert_bits,
                  progress=not args.no_progress)
    rmse = json.loads((dst / MANIFEST_NAME).read_text()).get("requant_rmse")
    if rmse and args.no_progress:  # convert() printed it already otherwise
        print_rmse(rmse)
    return 0


COMMAND = Command("convert", "MLX checkpoint -> moeflux model directory", __doc__ or "",
                  lambda p: add_src_dst_arguments(p, expert_bits=True), _cli)
register = COMMAND.register
main = COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
