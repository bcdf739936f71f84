"""CPU matmul throughput as a ratio to the memory-read bandwidth measured in the same run.

For each shape, the 4-bit (gs 64, bf16 scales) matvec of the CPU backend is timed
through `moeflux._core._diag_matmul` and reported as GB/s of weight bytes (codes + scales
+ biases) streamed, next to a plain read of a buffer of the same size on the same
threads (`_core._diag_read_bw`, a summing loop) and numpy's single-threaded `sum`.

Two regimes per shape:
  hot   the same matrix every call (it stays in cache when it fits, as for a model whose
        experts are cached in RAM and the working set fits in L2/L3);
  cold  a stack of distinct matrices larger than the last-level cache, cycled through
        (as in decode, where each token's experts differ).
The baseline reads the same number of bytes in the same regime, one pool run per
matrix-sized chunk (so it pays the same per-op hand-off to the threads).

Shapes (Qwen3.6-35B-A3B): expert gate/up [512, 2048], expert down [2048, 512],
lm_head [248320, 2048]; plus prefill (n_tok 16) on the expert shape.

Usage: .venv/bin/python bench/bench_matmul.py [--threads N] [--kernels avx2] [--quick]
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time

import numpy as np

from moeflux import _core



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


def timed(fn, min_s: float) -> float:
    """Seconds per call of fn(n) -> None run with n calls, n grown until >= min_s."""
    n = 1
    while True:
        t0 = time.perf_counter()
        fn(n)
        dt = time.perf_counter() - t0
        if dt >= min_s:
            return dt / n
        n = max(n * 2, int(n * min_s / max(dt, 1e-6) * 1.2))


def bench_matvec(n_out: int, n_in: int, n_tok: int, cold: bool, threads: int,
                 kernels: str | None, min_s: float, rng: np.random.Generator) -> dict:
    """GB/s of one shape, and the read baseline over the same bytes."""
    probe = make_weight(1, n_out, n_in, 4, 64, rng)
    mat_bytes = weight_bytes(probe)
    n_stack = max(1, (4 * LLC_BYTES) // mat_bytes) if cold else 1
    wt = probe if n_stack == 1 else make_weight(n_stack, n_out, n_in, 4, 64, rng)
    x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
    out = np.empty((n_tok, n_out), np.float32)

    def run(n: int) -> None:
        _core._diag_matmul("matmul", out, x=x, n_out=n_out, n_in=n_in, n_tok=n_tok,
                           n_threads=threads, kernels=kernels, n_rep=n, n_stack=n_stack,
                           **wt)

    run(n_stack)   # warm up (page in)
    t_mat = timed(run, min_s)
    # The baseline: the same bytes per call (one pool run per matrix), same regime,
    # same threads.
    buf = np.ones(mat_bytes * n_stack // 4, np.float32)
    t_read = timed(lambda n: _core._diag_read_bw(buf, threads, n, n_stack), min_s)
    chunk = mat_bytes // 4
    t_np = timed(lambda n: [buf[(i % n_stack) * chunk:(i % n_stack + 1) * chunk].sum()
                            for i in range(n)], min_s)
    gbs = mat_bytes / t_mat / 1e9
    return dict(shape=f"{n_out}x{n_in}", n_tok=n_tok, regime="cold" if cold else "hot",
                mb=mat_bytes / 2**20, us=t_mat * 1e6, gbs=gbs,
                read_gbs=mat_bytes / t_read / 1e9, np_gbs=mat_bytes / t_np / 1e9,
                gflops=2 * n_out * n_in * n_tok / t_mat / 1e9)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--kernels", default=None, help="force a kernel set (default: best)")
    ap.add_argument("--quick", action="store_true", help="shorter timings, no lm_head")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    min_s = 0.2 if args.quick else 0.5
    kernels = args.kernels or _core._diag_kernels()[0]
    print(machine())
    print(f"threads {args.threads}, kernels {kernels}\n")
    cases = [(512, 2048, 1, False), (512, 2048, 1, True), (2048, 512, 1, False),
             (2048, 512, 1, True), (512, 2048, 16, False)]
    if not args.quick:
        cases.append((248320, 2048, 1, True))   # lm_head: never fits in cache
    print("| shape [out x in] | n_tok | regime | MiB | us/call | GB/s | read GB/s | ratio |"
          " numpy sum GB/s | GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n_out, n_in, n_tok, cold in cases:
        r = bench_matvec(n_out, n_in, n_tok, cold, args.threads, kernels, min_s, rng)
        print(f"| {r['shape']} | {r['n_tok']} | {r['regime']} | {r['mb']:.2f} | "
              f"{r['us']:.1f} | {r['gbs']:.2f} | {r['read_gbs']:.2f} | "
              f"{r['gbs'] / r['read_gbs']:.2f} | {r['np_gbs']:.2f} | {r['gflops']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
