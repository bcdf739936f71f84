"""Repack throughput: moeflux.prep's expert repacking (and the whole conversion) in
MB/s, against a plain sequential copy of the same source bytes on the same disk,
measured in the same run.

The source is a synthetic checkpoint with the per-layer shapes of Qwen3.6-35B-A3B
(moeflux.prep.synth preset, 1 GB shards as mlx-lm writes 5 GB ones), a few GB in all.
Before every timed run the page cache is dropped when this process may do so (root
outside a container's restrictions; otherwise every run is warm and the output says
so) and the disk gets a few seconds to settle; the order of the three jobs rotates
from round to round. Best and median of ``--repeat`` rounds are reported.

    python bench/bench_repack.py [--dir DIR] [--layers 6] [--repeat 2] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

from moeflux.prep._common import Journal, Source, source_key
from moeflux.prep.convert import convert
from moeflux.prep.repack_experts import run_repack
from moeflux.prep.synth import PRESETS, tiny_config, write_checkpoint

PRESET = "qwen36-35b-a3b-shapes"
CHUNK = 16 << 20
SETTLE_S = 5.0


def drop_caches() -> bool:
    """Flush dirty pages and drop the page cache; False when not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def plain_copy(src: Path, dst: Path) -> int:
    """Copy every safetensors shard with 16 MB read/write calls and fsync: the
    baseline a repack cannot beat (same bytes read, same bytes written)."""
    dst.mkdir(parents=True, exist_ok=True)
    total = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for p in sorted(src.glob("model*.safetensors")):
        with open(p, "rb", buffering=0) as fi, \
                open(dst / p.name, "wb", buffering=0) as fo:
            while True:
                n = fi.readinto(buf)
                if not n:
                    break
                fo.write(view[:n])
                total += n
            os.fsync(fo.fileno())
    return total


def kernel_copy(src: Path, dst: Path) -> int:
    """The same copy done inside the kernel (shutil.copyfile: sendfile /
    copy_file_range on Linux, no user-space buffer) with an fsync per file."""
    dst.mkdir(parents=True, exist_ok=True)
    total = 0
    for p in sorted(src.glob("model*.safetensors")):
        shutil.copyfile(p, dst / p.name)
        fd = os.open(dst / p.name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        total += p.stat().st_size
    return total


def timed(fn: Callable[[], int], out: Path) -> tuple[float, int, bool, float]:
    """Time ``fn`` writing into ``out`` (removed first, outside the timing) from a
    cold page cache where possible: (wall s, bytes, cache dropped, CPU s of this
    process, all threads)."""
    shutil.rmtree(out, ignore_errors=True)
    dropped = drop_caches()
    time.sleep(SETTLE_S)  # let the disk finish the deletes and writeback
    c0 = time.process_time()
    t0 = time.perf_counter()
    nbytes = fn()
    return time.perf_counter() - t0, nbytes, dropped, time.process_time() - c0


def repack_only(src: Path, dst: Path) -> int:
    dst.mkdir(parents=True)
    with Source(src) as s:
        res = run_repack(s, dst, Journal(dst, source_key(s)), progress=False)
    return int(res.stats["bytes"])


def convert_all(src: Path, dst: Path) -> int:
    convert(src, dst, progress=False)
    return sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        dev = subprocess.run(["df", "--output=source,fstype", "."], capture_output=True,
                             text=True).stdout.split("\n")[1].strip()
    except (OSError, IndexError):
        dev = "?"
    return (f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPUs, "
            f"{mem:.0f} GiB RAM, disk {dev}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/moeflux-bench-repack",
                    help="work directory (source, copy and output live here)")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    work = Path(args.dir)
    src = work / f"src-{args.layers}"
    if not (src / "config.json").exists():
        arch, ov = PRESETS[PRESET]
        t0 = time.perf_counter()
        write_checkpoint(src, tiny_config(arch, **{**ov, "num_hidden_layers":
                                                   args.layers}),
                         max_shard_bytes=10**9)
        print(f"wrote source in {time.perf_counter() - t0:.1f} s")
    src_bytes = sum(p.stat().st_size for p in src.glob("model*.safetensors"))
    os.chdir(work)
    print(f"machine: {machine()}")
    print(f"source: {PRESET}, {args.layers} layers, {src_bytes / 1e9:.2f} GB in "
          f"{len(list(src.glob('model*.safetensors')))} shards")
    results: dict[str, list[tuple[float, int, bool, float]]] = {
        "copy": [], "kcopy": [], "repack": [], "convert": []}
    jobs = {"copy": (lambda: plain_copy(src, work / "copy"), work / "copy"),
            "kcopy": (lambda: kernel_copy(src, work / "kcopy"), work / "kcopy"),
            "repack": (lambda: repack_only(src, work / "rep"), work / "rep"),
            "convert": (lambda: convert_all(src, work / "conv"), work / "conv")}
    names = list(jobs)
    for r in range(args.repeat):
        # rotate the order each round: this virtual disk slows down after a few GB
        # of writes, which would otherwise always penalise the same job
        for k in names[r % len(names):] + names[:r % len(names)]:
            results[k].append(timed(*jobs[k]))
    cold = all(r[2] for rs in results.values() for r in rs)
    best = {k: max(r[1] / r[0] for r in v) / 1e6 for k, v in results.items()}
    med = {k: statistics.median(r[1] / r[0] for r in v) / 1e6
           for k, v in results.items()}
    cpu = {k: statistics.median(r[3] / (r[1] / 1e9) for r in v)
           for k, v in results.items()}
    print(f"page cache dropped before each run: {cold}")
    for k, v in results.items():
        runs = ", ".join(f"{r[1] / r[0] / 1e6:.0f}" for r in v)
        print(f"{k:8s} best {best[k]:5.0f} MB/s  median {med[k]:5.0f} MB/s  "
              f"runs: {runs}  ({v[0][1] / 1e9:.2f} GB; CPU {cpu[k]:.2f} s/GB)")
    base = max(("copy", "kcopy"), key=lambda k: med[k])
    for k in ("repack", "convert"):
        print(f"{k} / {base} (the faster baseline): best {best[k] / best[base]:.0%}, "
              f"median {med[k] / med[base]:.0%}")
    print(f"load average after: {os.getloadavg()}")
    print(json.dumps({"best_MBps": best, "median_MBps": med, "cpu_s_per_GB": cpu,
                      "cold": cold}))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
