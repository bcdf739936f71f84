"""Write a ~20 GB synthetic checkpoint and measure time and peak memory.

The claim under test: moeflux.prep.synth streams, so a checkpoint as large as a real
Qwen3.6-35B-A3B 4-bit upload (~20 GB, the `qwen36-35b-a3b-shapes` preset with 40
layers) is written with bounded memory, at disk speed, on a small machine.

    .venv/bin/python bench/synth_big.py [--layers 40] [--dir /work] [--keep]

Checks free space first, writes under a fresh temporary directory, verifies the
result (headers, sizes, index), records the numbers in bench/RESULTS.md under
"## synth: 20 GB checkpoint", and deletes the checkpoint unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from moeflux.prep import synth
from moeflux.prep.safetensors_io import Checkpoint

HEADING = "## synth: 20 GB checkpoint"
REPO = Path(__file__).resolve().parents[1]


def _peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux (bytes on macOS).
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if platform.system() == "Darwin" else r / 1024


def _cmd(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True,
                              timeout=30).stdout.rstrip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"({' '.join(args)} failed: {exc})"


def _verify(path: Path, expect_bytes: int) -> dict:
    """Headers parse, every indexed tensor is where the index says, sizes add up,
    and a few expert slices hold non-constant data."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    with Checkpoint(path) as ck:
        total = sum(i.nbytes for i in ck.tensors.values())
        assert total == index["metadata"]["total_size"] == expect_bytes, \
            (total, index["metadata"]["total_size"], expect_bytes)
        assert sorted(ck.tensors) == sorted(index["weight_map"])
        for name, fname in index["weight_map"].items():
            assert ck.info(name).path.name == fname, name
        experts = [n for n in ck.tensors if n.endswith("switch_mlp.down_proj.weight")]
        for name in (experts[0], experts[-1]):
            info = ck.info(name)
            per = info.nbytes // info.shape[0]
            words = np.frombuffer(ck.read(name, (info.shape[0] - 1) * per, per),
                                  dtype=np.uint32)
            assert words.std() > 0, name
        n_files = len(ck.files)
    return {"tensors": len(index["weight_map"]), "shards": n_files}


def _record(results: Path, text: str) -> None:
    """Replace (or append) only our own section of RESULTS.md."""
    old = results.read_text() if results.exists() else "# moeflux benchmark results\n"
    lines = old.splitlines(keepends=True)
    out, skipping, done = [], False, False
    for line in lines:
        if line.rstrip() == HEADING:
            skipping, done = True, True
            out.append(text)
            continue
        if skipping and line.startswith("## "):
            skipping = False
        if not skipping:
            out.append(line)
    if not done:
        if out and not out[-1].endswith("\n"):
            out.append("\n")
        out.append("\n" + text)
    tmp = results.with_name(results.name + ".tmp")
    tmp.write_text("".join(out))
    os.replace(tmp, results)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--dir", default=str(REPO.parent),
                    help="where the temporary checkpoint directory goes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="do not delete the output")
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    cfg = synth.tiny_config("qwen3_5_moe", **dict(
        synth.PRESETS["qwen36-35b-a3b-shapes"][1], num_hidden_layers=args.layers))
    expect = sum(t.nbytes for t in synth._tensor_plan(cfg, args.seed))
    free = shutil.disk_usage(args.dir).free
    if free < expect + (4 << 30):
        raise SystemExit(f"{args.dir}: {free / 1e9:.1f} GB free, need "
                         f"{expect / 1e9:.1f} GB + 4 GiB margin")
    out = Path(tempfile.mkdtemp(prefix="moeflux-synth-big-", dir=args.dir))
    rss_before = _peak_rss_mib()
    try:
        t0 = time.perf_counter()
        synth.write_checkpoint(out, cfg, seed=args.seed, progress=True)
        wall = time.perf_counter() - t0
        ru = resource.getrusage(resource.RUSAGE_SELF)
        peak = _peak_rss_mib()
        on_disk = sum(p.stat().st_size for p in out.iterdir())
        disk = _cmd(["df", "-h", str(out)])
        checks = _verify(out, expect)
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    mem = _cmd(["free", "-g"])
    gbps = on_disk / wall / 1e9
    print(f"wrote {on_disk / 1e9:.2f} GB in {wall:.1f} s ({gbps:.2f} GB/s), peak RSS "
          f"{peak:.0f} MiB (before writing {rss_before:.0f} MiB), {checks}")
    if args.no_record:
        return 0
    text = (
        f"{HEADING}\n\n"
        f"`bench/synth_big.py --layers {args.layers}`: preset `qwen36-35b-a3b-shapes` "
        f"(Qwen3.6-35B-A3B per-layer shapes: hid 2048, E 256, k 8, I 512, V 248320; "
        f"4-bit gs64, 8-bit router/shared-expert gate), {args.layers} layers, seed "
        f"{args.seed}; written with `progress=True`, fsync per shard; verified "
        f"(headers, index, sizes) and deleted afterwards.\n\n"
        f"| measure | value |\n|---|---|\n"
        f"| bytes written | {on_disk:,} ({on_disk / 1e9:.2f} GB; tensor data "
        f"{expect:,}) |\n"
        f"| tensors / shards | {checks['tensors']:,} / {checks['shards']} |\n"
        f"| wall time | {wall:.1f} s |\n"
        f"| throughput | {gbps:.2f} GB/s |\n"
        f"| CPU time (whole process) | user {ru.ru_utime:.1f} s, system "
        f"{ru.ru_stime:.1f} s: generation is not the bottleneck, the disk is |\n"
        f"| peak RSS (ru_maxrss) | {peak:.0f} MiB (after imports, before writing: "
        f"{rss_before:.0f} MiB) |\n\n"
        f"Machine: `nproc` = {os.cpu_count()}, Python {platform.python_version()}, "
        f"numpy {np.__version__}.\n\n"
        f"```\n$ free -g   # after the run\n{mem}\n$ df -h <output dir>   # with the "
        f"checkpoint still on disk\n{disk}\n```\n\n")
    _record(Path(args.results), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
