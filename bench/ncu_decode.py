"""One resident decode step of the bench model, bracketed by cuProfilerStart/Stop so
that Nsight Compute profiles just its kernels:

    ncu --profile-from-start off --clock-control none --csv --print-units base \\
        --metrics gpu__time_duration.sum,dram__bytes_read.sum \\
        python3 bench/ncu_decode.py --layers 8 [--shape 35b]

(the model is bench/bench_cuda.py's, built in the same --dir if missing).
``--summarize CSV`` prints per kernel: launches, total and mean time, DRAM bytes read
and their rate, from that CSV.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import sys
from collections import defaultdict
from pathlib import Path


def summarize(path: str) -> None:
    rows = [r for r in csv.reader(open(path)) if len(r) > 10]
    head, body = rows[0], rows[1:]
    ki, mi, vi = (head.index(c) for c in ("Kernel Name", "Metric Name", "Metric Value"))
    ii = head.index("ID")
    per: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    ids: dict[str, set] = defaultdict(set)
    for r in body:
        name = r[ki].split("(")[0]
        ids[name].add(r[ii])
        per[name][r[mi]] += float(r[vi].replace(",", ""))
    tot = sum(v.get("gpu__time_duration.sum", 0) for v in per.values())
    print(f"{'kernel':<20}{'n':>5}{'total us':>10}{'mean us':>9}{'MB read':>9}{'GB/s':>8}")
    for name, v in sorted(per.items(), key=lambda kv: -kv[1]["gpu__time_duration.sum"]):
        t, n = v["gpu__time_duration.sum"] / 1e3, len(ids[name])
        mb = v.get("dram__bytes_read.sum", 0) / 1e6
        print(f"{name:<20}{n:>5}{t:>10.1f}{t / n:>9.2f}{mb:>9.1f}{mb / t * 1e3 if t else 0:>8.0f}")
    print(f"all kernels: {tot / 1e3:.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--summarize", metavar="CSV")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--shape", default="a3b", choices=["a3b", "35b", "397b"],
                    help="bench_cuda.py's model shapes")
    ap.add_argument("--dir", default="/tmp/moeflux-bench-cuda")
    ap.add_argument("--steps", type=int, default=1)
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return
    import moeflux   # here, so that --summarize runs where moeflux is not importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))   # also under PYTHONSAFEPATH
    from bench_cuda import build

    cu = ctypes.CDLL("libcuda.so.1")
    m = moeflux.Model(build(Path(args.dir), args.layers, args.shape), backend="cuda",
                      gpu_experts="resident")
    m.eval(list(range(1, 17)))
    for t in (5, 6, 7):
        m.eval(t)
    cu.cuProfilerStart()
    for t in range(args.steps):
        m.eval(100 + t)
    cu.cuProfilerStop()
    m.close()


if __name__ == "__main__":
    main()
