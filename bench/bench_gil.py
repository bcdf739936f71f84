"""Decode on a non-main thread while another Python thread is busy: ms/token, next to
the same decode with the other thread idle, in the same run (interleaved, repeated).

The Ctrl-C poll of a running eval used to take the GIL before every layer on whatever
thread ran it; with a busy Python thread holding the GIL, each poll waited up to the
interpreter's switch interval (issue 13 measured 0.55 -> 1.98 ms per token). Now only
an eval on the main thread polls, at most every 50 ms (csrc/python/module.c). The
ratio busy / idle is the figure (1 = the busy thread costs the decode nothing beyond
sharing the cores); `Context._signal_polls` says how often an eval took the GIL.

    python bench/bench_gil.py [--model DIR] [--tokens N] [--repeats R]

Default model: the demo's (`python -m moeflux demo` makes it). Any moeflux build runs
it (the poll counter is printed where the build has it).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import moeflux


def decode_ms(m: moeflux.Model, n: int) -> float:
    """ms/token of n greedy decode steps, run on a new (non-main) thread."""
    out: list[float] = []

    def run() -> None:
        m.reset()
        tok = int(m.eval([1, 2, 3]).argmax())
        t0 = time.perf_counter()
        for _ in range(n):
            tok = int(m.eval([tok]).argmax())
        out.append((time.perf_counter() - t0) * 1e3 / n)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out[0]


def busy_while(fn, *args):
    """fn(*args) while another Python thread spins in pure Python (holds the GIL
    except at the interpreter's switch points)."""
    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        return fn(*args)
    finally:
        stop.set()
        t.join()


def main() -> int:
    from moeflux.demo import DEFAULT_VOCAB, default_cache, ensure_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="compute threads")
    args = p.parse_args()
    model = args.model or ensure_model(default_cache(), 4, DEFAULT_VOCAB)   # the demo's
    idle, busy = [], []
    with moeflux.Model(model, threads=args.threads) as m:
        decode_ms(m, 2)                                   # warm the page cache
        for _ in range(args.repeats):
            idle.append(decode_ms(m, args.tokens))
            busy.append(busy_while(decode_ms, m, args.tokens))
        polls = getattr(m._ctx, "_signal_polls", None)
    ratios = sorted(b / i for b, i in zip(busy, idle))
    print(f"moeflux {moeflux.__file__}; switch interval {sys.getswitchinterval() * 1e3:.1f} ms")
    print(f"idle  ms/token median {statistics.median(idle):.2f} "
          f"({min(idle):.2f}-{max(idle):.2f})")
    print(f"busy  ms/token median {statistics.median(busy):.2f} "
          f"({min(busy):.2f}-{max(busy):.2f})")
    print(f"busy / idle median {statistics.median(ratios):.2f} "
          f"({ratios[0]:.2f}-{ratios[-1]:.2f}); signal polls (GIL taken): {polls}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
