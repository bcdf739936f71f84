"""Where a resident decode or prefill spends its GPU time, kernel by kernel, in the
engine's own stream (``MOEFLUX_GPU_PROFILE=1``: an event after every launch, the table
printed to stderr when the context is freed; graphs are off while it records, so each
kernel carries the launch gap before it):

    PYTHONSAFEPATH=1 PYTHONPATH=build/cuda-site python3 bench/profile_cuda.py \\
        --layers 24 --mode prefill

The model is bench/bench_cuda.py's (built in --dir if missing). One mode per process,
so that the table holds that mode's kernels only: a warm-up of the same kind, then the
timed runs (decode: --tokens steps after a 16-token prompt; prefill: a 512-token
prompt), their tokens/s printed before the table.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["decode", "prefill"], default="decode")
    ap.add_argument("--shape", default="a3b")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--dir", default="/tmp/moeflux-bench-cuda")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    os.environ["MOEFLUX_GPU_PROFILE"] = "1"   # read when the context is made
    sys.path.insert(0, str(HERE))
    import bench_cuda as bc
    import moeflux

    m = moeflux.Model(bc.build(Path(args.dir), args.layers, args.shape), backend="cuda",
                      gpu_experts="resident")
    if args.mode == "prefill":
        bc.prefill_tps(m)
        tps = [bc.prefill_tps(m) for _ in range(args.repeat)]
    else:
        bc.decode_tps(m, 8)
        tps = [bc.decode_tps(m, args.tokens) for _ in range(args.repeat)]
    print(f"{args.mode} tok/s, {args.layers} layers of {args.shape} shapes, graphs off "
          f"while profiling: " + ", ".join(f"{t:.0f}" for t in tps), flush=True)
    m.close()   # the table goes to stderr now


if __name__ == "__main__":
    main()
