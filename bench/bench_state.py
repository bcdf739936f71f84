"""Cost of sequence-state snapshots and automatic checkpoints at real state shapes.

The state of a hybrid model does not depend on its experts or vocabulary, so this
uses the per-layer attention and GatedDeltaNet shapes of Qwen3.6-35B-A3B (hidden 2048,
GatedDeltaNet 16/32 heads of 128, gated attention 16/2 heads of 256) with few experts
and a small vocabulary, keeping the files tiny. It measures, in one run:
- decode ms/token with the default checkpoints (a host copy of the linear-attention
  state after every eval) and with them off, i.e. what checkpointing costs per token
  relative to a decode step;
- snapshot size, save and load time at a given sequence length, and the copy rate
  against a plain memcpy of the same bytes (the limit);
- truncate to a checkpoint.

    python bench/bench_state.py [--layers 8] [--n-past 1024] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

import moeflux
from moeflux.prep.convert import convert
from moeflux.prep.synth import PRESETS, tiny_config, write_checkpoint


def make_model(root: Path, n_layers: int) -> Path:
    arch, ov = PRESETS["qwen36-35b-a3b-shapes"]
    ov = dict(ov, num_hidden_layers=n_layers, num_experts=8, num_experts_per_tok=2,
              vocab_size=1024, max_position_embeddings=8192)
    write_checkpoint(root / "ckpt", tiny_config(arch, **ov), seed=0)
    convert(root / "ckpt", root / "model", progress=False)
    return root / "model"


def decode_ms(m: moeflux.Model, prompt: np.ndarray, n: int) -> float:
    """ms per decode token over n greedy steps after the prompt."""
    m.reset()
    logits = m.eval(prompt)
    t0 = time.perf_counter()
    for _ in range(n):
        logits = m.eval([int(logits.argmax())])
    return (time.perf_counter() - t0) / n * 1e3


def decode_on_off(m: moeflux.Model, prompt: np.ndarray, n: int, repeats: int
                  ) -> tuple[float, float]:
    """Best ms/token with checkpoints on and off, runs interleaved so that load from
    other processes hits both alike (the minimum is the least disturbed run)."""
    on, off = [], []
    for _ in range(repeats):
        m.set_checkpoints(0)
        on.append(decode_ms(m, prompt, n))
        m.set_checkpoints(-1)
        off.append(decode_ms(m, prompt, n))
    m.set_checkpoints(0)
    return min(on), min(off)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--n-past", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        path = make_model(Path(tmp), args.layers)
        m = moeflux.Model(path, threads=args.threads, n_ctx=args.n_past + 64)
        rng = np.random.default_rng(0)
        prompt = rng.integers(0, m.n_vocab, 16).astype(np.int32)
        on, off = decode_on_off(m, prompt, args.decode, args.repeats)

        m.reset()
        m.eval(rng.integers(0, m.n_vocab, args.n_past).astype(np.int32))
        saves, loads = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            snap = m.save_state()
            saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            m.load_state(snap)
            loads.append(time.perf_counter() - t0)
        buf = np.frombuffer(snap, dtype=np.uint8)
        copies = []
        for _ in range(5):
            t0 = time.perf_counter()
            buf.copy()
            copies.append(time.perf_counter() - t0)
        m.eval([1])
        t0 = time.perf_counter()
        m.truncate(args.n_past)
        trunc_ms = (time.perf_counter() - t0) * 1e3
        n_lin = sum(1 for i in range(args.layers) if (i + 1) % 4 != 0)
        fixed = n_lin * (32 * 128 * 128 + 3 * (2 * 16 * 128 + 32 * 128)) * 4
        m.close()

    mb = len(snap) / 2**20
    save_s, load_s, copy_s = (min(x) for x in (saves, loads, copies))
    print(f"model: Qwen3.6-35B-A3B state shapes, {args.layers} layers ({n_lin} "
          f"GatedDeltaNet), threads {args.threads or os.cpu_count()}")
    print(f"decode ms/token (best of {args.repeats} interleaved runs of {args.decode}): "
          f"checkpoints on {on:.2f}, off {off:.2f} "
          f"(overhead {100 * (on - off) / off:+.1f} %); fixed state per checkpoint "
          f"{fixed / 2**20:.2f} MiB")
    print(f"snapshot at n_past {args.n_past}: {mb:.1f} MiB; save {save_s * 1e3:.1f} ms "
          f"({mb / save_s:.0f} MiB/s), load {load_s * 1e3:.1f} ms ({mb / load_s:.0f} "
          f"MiB/s); memcpy of the same bytes {copy_s * 1e3:.1f} ms ({mb / copy_s:.0f} "
          f"MiB/s)")
    print(f"truncate to a checkpoint: {trunc_ms:.2f} ms")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}")


if __name__ == "__main__":
    main()
