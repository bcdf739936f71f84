"""CPU matmul throughput as a ratio to the memory-read bandwidth measured in the same run.

For each shape and width (default 2, 4 and 8 bits; gs 64, bf16 scales), the quantized
matmul of the CPU backend is timed through `moeflux._diag.matmul` and reported
as GB/s of weight bytes (codes + scales + biases) streamed, next to a plain read of a
buffer of the same size on the same threads (`_diag.read_bw`, a summing loop).
Each case is measured --repeat times, matmul and read interleaved (matmul, read,
matmul, read, ...) so both see the same machine state; the ratio is taken per repeat
and reported as median [min - max]. numpy's single-threaded `sum` of the same bytes is
given once per case for reference.

Two regimes per shape:
  hot   the same matrix every call (it stays in cache when it fits, as for a model whose
        experts are cached in RAM and the working set fits in L2/L3);
  cold  a stack of distinct matrices larger than the last-level cache, cycled through
        (as in decode, where each token's experts differ).
The baseline reads the same number of bytes in the same regime, one pool run per
matrix-sized chunk (so it pays the same per-op hand-off to the threads).

Shapes (Qwen3.6-35B-A3B): expert gate/up [512, 2048], expert down [2048, 512],
lm_head [248320, 2048] (4-bit only); plus prefill (n_tok 16) on the expert shape.

--cpu-time: one thread, each call timed in CPU time of the calling thread
(time.thread_time, CLOCK_THREAD_CPUTIME_ID on Linux; with one thread the pool runs every
task on the caller), matmul and read interleaved as above. On a machine shared with
other jobs this is robust to load (time the thread is descheduled is not counted), where
wall-clock ratios on several threads measure the scheduler as much as the code. The load
average is printed before and after every run.

Usage: .venv/bin/python bench/bench_matmul.py [--threads N] [--kernels avx2] [--quick]
       [--bits 2,4,8] [--gs 64] [--repeat 5] [--cases decode] [--cpu-time]
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time

import numpy as np

from moeflux import _diag



def llc_bytes() -> int:
    """Size of the last-level cache (Linux sysfs), 32 MiB if unknown."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(base):
            with open(os.path.join(base, d, "size")) as f:
                txt = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20}.get(txt[-1], 1)
            best = max(best, int(txt.rstrip("KM")) * mult)
    except (OSError, ValueError):
        pass
    return best or 32 << 20


LLC_BYTES = llc_bytes()    # cold stacks are sized at several times this


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round toward zero; fine for benchmarks)."""
    return (np.ascontiguousarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def make_weight(n_stack: int, n_out: int, n_in: int, bits: int, gs: int,
                rng: np.random.Generator) -> dict:
    """Random packed codes and bf16 scales/biases for n_stack matrices."""
    words = rng.integers(0, 2**32, size=(n_stack, n_out, n_in * bits // 32),
                         dtype=np.uint32)
    s = bf16_bits(rng.uniform(0.005, 0.02, (n_stack, n_out, n_in // gs)))
    b = bf16_bits(rng.uniform(-0.1, 0.1, (n_stack, n_out, n_in // gs)))
    return dict(w=words, scales=s, biases=b, wdtype="U32", sdtype="BF16", bits=bits,
                group_size=gs)


def weight_bytes(wt: dict) -> int:
    """Bytes of one matrix (codes + scales + biases)."""
    n_stack = wt["w"].shape[0]
    return (wt["w"].nbytes + wt["scales"].nbytes + wt["biases"].nbytes) // n_stack


def timed(fn, min_s: float, clock=time.perf_counter) -> float:
    """Seconds per call of fn(n) -> None run with n calls, n grown until >= min_s (on
    `clock`)."""
    n = 1
    while True:
        t0 = clock()
        fn(n)
        dt = clock() - t0
        if dt >= min_s:
            return dt / n
        n = max(n * 2, int(n * min_s / max(dt, 1e-6) * 1.2))


def bench_matvec(n_out: int, n_in: int, n_tok: int, cold: bool, bits: int, threads: int,
                 kernels: str | None, min_s: float, repeat: int,
                 rng: np.random.Generator, gs: int = 64, cpu_time: bool = False) -> dict:
    """GB/s of one shape and width, and the read baseline over the same bytes, measured
    `repeat` times interleaved (in the calling thread's CPU time with cpu_time, which
    needs threads == 1)."""
    clock = time.thread_time if cpu_time else time.perf_counter
    probe = make_weight(1, n_out, n_in, bits, gs, rng)
    mat_bytes = weight_bytes(probe)
    n_stack = max(1, (4 * LLC_BYTES) // mat_bytes) if cold else 1
    wt = probe if n_stack == 1 else make_weight(n_stack, n_out, n_in, bits, gs, rng)
    x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
    out = np.empty((n_tok, n_out), np.float32)

    def run(n: int) -> None:
        _diag.matmul("matmul", out, x=x, n_out=n_out, n_in=n_in, n_tok=n_tok,
                           n_threads=threads, kernels=kernels, n_rep=n, n_stack=n_stack,
                           **wt)

    # The baseline: the same bytes per call (one pool run per matrix), same regime,
    # same threads.
    buf = np.ones(mat_bytes * n_stack // 4, np.float32)
    run(n_stack)   # warm up (page in)
    _diag.read_bw(buf, threads, n_stack, n_stack)
    t_mat, t_read = [], []
    for _ in range(repeat):
        t_mat.append(timed(run, min_s, clock))
        t_read.append(timed(lambda n: _diag.read_bw(buf, threads, n, n_stack), min_s,
                            clock))
    chunk = mat_bytes // 4
    t_np = timed(lambda n: [buf[(i % n_stack) * chunk:(i % n_stack + 1) * chunk].sum()
                            for i in range(n)], min_s)
    ratios = sorted(tr / tm for tm, tr in zip(t_mat, t_read))
    t_med = float(np.median(t_mat))
    return dict(shape=f"{n_out}x{n_in}", n_tok=n_tok, bits=bits, gs=gs,
                regime="cold" if cold else "hot", mb=mat_bytes / 2**20, us=t_med * 1e6,
                gbs=mat_bytes / t_med / 1e9,
                read_gbs=mat_bytes / float(np.median(t_read)) / 1e9,
                np_gbs=mat_bytes / t_np / 1e9, ratio=float(np.median(ratios)),
                ratio_lo=ratios[0], ratio_hi=ratios[-1],
                gflops=2 * n_out * n_in * n_tok / t_med / 1e9)


def machine() -> str:
    """`lscpu | head` and nproc, for the record."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        keep = [ln for ln in lscpu.splitlines()
                if ln.split(":")[0].strip() in ("Model name", "CPU(s)", "Thread(s) per core",
                                                 "L2 cache", "L3 cache")]
    except OSError:
        keep = [platform.processor()]
    return "\n".join(keep + [f"nproc: {os.cpu_count()}"])


def loadavg() -> str:
    """The 1/5/15-minute load averages (Linux), or '?'."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--kernels", default=None, help="force a kernel set (default: best)")
    ap.add_argument("--quick", action="store_true", help="shorter timings, no lm_head")
    ap.add_argument("--bits", default="2,4,8", help="widths, comma-separated")
    ap.add_argument("--gs", default="64", help="group sizes, comma-separated")
    ap.add_argument("--cpu-time", action="store_true",
                    help="one thread, timed in the thread's CPU time (robust to load)")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved measurements")
    ap.add_argument("--cases", default="all",
                    help="'all', or 'decode' (n_tok 1 expert shapes only)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    min_s = 0.1 if args.quick else 0.3
    kernels = args.kernels or _diag.kernels()[0]
    if args.cpu_time:
        args.threads = 1
    print(machine())
    print(f"threads {args.threads}, kernels {kernels}, repeat {args.repeat}, "
          f"clock {'thread CPU time' if args.cpu_time else 'wall'}, load average {loadavg()}\n")
    cases = [(512, 2048, 1, False), (512, 2048, 1, True), (2048, 512, 1, False),
             (2048, 512, 1, True)]
    if args.cases == "all":
        cases.append((512, 2048, 16, False))
    print("| shape [out x in] | bits | gs | n_tok | regime | MiB | us/call | GB/s | read GB/s |"
          " ratio median [min - max] | numpy sum GB/s | GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [(c, int(b), int(g)) for c in cases for b in args.bits.split(",")
            for g in args.gs.split(",")]
    if not args.quick and args.cases == "all":
        rows.append(((248320, 2048, 1, True), 4, 64))   # lm_head: never fits in cache
    for (n_out, n_in, n_tok, cold), bits, gs in rows:
        r = bench_matvec(n_out, n_in, n_tok, cold, bits, args.threads, kernels, min_s,
                         args.repeat, rng, gs, args.cpu_time)
        print(f"| {r['shape']} | {r['bits']} | {r['gs']} | {r['n_tok']} | {r['regime']} | "
              f"{r['mb']:.2f} | {r['us']:.1f} | {r['gbs']:.2f} | {r['read_gbs']:.2f} | "
              f"{r['ratio']:.2f} [{r['ratio_lo']:.2f} - {r['ratio_hi']:.2f}] | "
              f"{r['np_gbs']:.2f} | {r['gflops']:.1f} |", flush=True)
    print(f"\nload average after: {loadavg()}")


if __name__ == "__main__":
    main()
