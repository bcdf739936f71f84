"""Warm-cache decode time per token at Qwen3.6-35B-A3B per-layer shapes, as a ratio to
the time it takes merely to stream the bytes that decode touches, measured in the same
run on the same machine.

Model: the demo model (``moeflux.demo``: the per-layer shapes of Qwen3.6-35B-A3B,
``--layers`` layers, vocabulary 32768, random weights), created once under the demo
cache. Warm cache: every expert file is read once before timing, so the expert reads
come from the page cache (this is the "experts cached in RAM" regime, not SSD).

Per decoded token the engine touches
  - the expert blobs it reads (``expert_bytes_read`` from the model's stats), and
  - every non-expert weight except the embedding table (one row of it), i.e. the
    model_weights.bin bytes of all tensors but model.embed_tokens.* (untied model).
The baseline does exactly that much plain work with the same number of threads:
  - pread of the same number of expert blobs (k random experts per MoE layer) from
    the same files into a buffer, then a summing pass over that buffer, and
  - a summing pass over the non-expert weight bytes of the model_weights.bin mapping
    (``_diag.read_bw``, a plain loop on the CPU backend's thread pool).
Reported: ms/token for decode and for the baseline, and decode / baseline.

Usage: .venv/bin/python bench/bench_decode.py [--layers 4] [--tokens 32] [--threads N]
       [--cache DIR]
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import moeflux
from moeflux import _diag
from moeflux.demo import DEFAULT_VOCAB, default_cache, ensure_model


def warm_files(paths: list[Path]) -> int:
    """Read every file once (page cache warm-up); returns the bytes read."""
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(16 << 20):
                total += len(chunk)
    return total


def non_expert_touched(model_dir: Path) -> tuple[int, int]:
    """(offset, bytes) of one contiguous stand-in region of model_weights.bin whose
    size equals the bytes a decode step touches: all tensors but the embedding table.
    """
    man = json.loads((model_dir / "model_weights.json").read_text())["tensors"]
    embed = sum(t["size"] for n, t in man.items() if n.startswith("model.embed_tokens."))
    total = (model_dir / "model_weights.bin").stat().st_size
    return 0, total - embed


def decode_time(model_dir: Path, n_tokens: int, threads: int,
                backend: str = "cpu") -> tuple[float, float]:
    """(seconds per decoded token, expert bytes read per token), warm."""
    with moeflux.Model(model_dir, threads=threads, backend=backend) as m:
        logits = m.eval([1, 2, 3, 4, 5, 6, 7, 8])
        for _ in range(4):                       # warm the weights mapping and pools
            logits = m.eval([int(logits.argmax())])
        m.stats_reset()
        t0 = time.perf_counter()
        for _ in range(n_tokens):
            logits = m.eval([int(logits.argmax())])
        dt = time.perf_counter() - t0
        st = m.stats()
    return dt / n_tokens, st["expert_bytes_read"] / n_tokens


def stream_time(model_dir: Path, expert_bytes_per_token: float, threads: int,
                n_tokens: int) -> tuple[float, float]:
    """(seconds per token to pread+sum the expert bytes, seconds per token to sum the
    non-expert bytes), with the same thread count."""
    layout = json.loads((model_dir / "packed_experts" / "layout.json").read_text())
    size, E = layout["expert_size"], layout["num_experts"]
    layers = layout["moe_layers"]
    per_layer = max(1, round(expert_bytes_per_token / size / len(layers)))
    fds = {il: os.open(model_dir / "packed_experts" / f"layer_{il:02d}.bin", os.O_RDONLY)
           for il in layers}
    bufs = [np.empty(size, np.uint8) for _ in range(per_layer)]
    rng = np.random.default_rng(0)
    try:
        with ThreadPoolExecutor(threads) as pool:
            t0 = time.perf_counter()
            for _ in range(n_tokens):
                for il in layers:
                    picks = rng.choice(E, per_layer, replace=False)
                    list(pool.map(lambda jb: os.preadv(fds[il], [bufs[jb[0]]],
                                                       int(jb[1]) * size),
                                  enumerate(picks)))
                    for b in bufs:
                        _diag.read_bw(b.view(np.float32), threads, 1)
            t_exp = (time.perf_counter() - t0) / n_tokens
    finally:
        for fd in fds.values():
            os.close(fd)
    off, nbytes = non_expert_touched(model_dir)
    nbytes -= nbytes % 4
    with open(model_dir / "model_weights.bin", "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            view = np.frombuffer(mm, np.float32, nbytes // 4, off)
            _diag.read_bw(view, threads, 1)         # fault the pages in
            t0 = time.perf_counter()
            _diag.read_bw(view, threads, n_tokens)
            t_dense = (time.perf_counter() - t0) / n_tokens
            del view
        finally:
            mm.close()
    return t_exp, t_dense


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--backend", default="cpu",
                    help='"cpu", or "cpu:<set>" for one CPU kernel set (avx512, ...)')
    args = ap.parse_args()
    cache = Path(args.cache) if args.cache else default_cache()
    model_dir = ensure_model(cache, args.layers, DEFAULT_VOCAB)
    warm_files(sorted((model_dir / "packed_experts").glob("layer_*.bin")) +
               [model_dir / "model_weights.bin"])
    s_tok, exp_bytes = decode_time(model_dir, args.tokens, args.threads, args.backend)
    t_exp, t_dense = stream_time(model_dir, exp_bytes, args.threads, args.tokens)
    _, dense_bytes = non_expert_touched(model_dir)
    MiB = 1 << 20
    base = t_exp + t_dense
    print(f"machine     {platform.machine()} {platform.processor() or ''} "
          f"{os.cpu_count()} cores, threads {args.threads}, backend {args.backend}")
    print(f"model       {args.layers} layers at Qwen3.6-35B-A3B shapes, vocab "
          f"{DEFAULT_VOCAB}; experts {exp_bytes / MiB:.1f} MiB/token, non-expert "
          f"{dense_bytes / MiB:.1f} MiB/token")
    print(f"decode      {s_tok * 1e3:.1f} ms/token ({1 / s_tok:.2f} tokens/s)")
    print(f"stream      {base * 1e3:.1f} ms/token (experts pread+sum "
          f"{t_exp * 1e3:.1f}, non-expert sum {t_dense * 1e3:.1f})")
    print(f"ratio       decode / stream = {s_tok / base:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
