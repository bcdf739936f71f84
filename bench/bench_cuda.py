"""Resident-mode decode and prefill on the CUDA backend as ratios to the HBM bound
measured in the same run.

Models (``--shape``), synthetic, 4-bit group 64, built with moeflux.prep synth +
convert in ``--dir``, ``--layers`` layers (fewer than the real model keep the build
short on the test machine; the per-token time is then scaled honestly: see below):
- ``a3b`` (default): qwen3_moe with the Qwen3-30B-A3B shapes (hidden 2048, 32 query /
  4 KV heads of 128, 128 experts, 8 active, moe_intermediate 768, vocabulary 151936:
  the bytes of the llama.cpp peer's Q4_0); 48 layers in the real model.
- ``35b``: qwen3_5_moe with the Qwen3.6-35B-A3B shapes (python -m moeflux.bench's, the
  demo's preset: hidden 2048, GatedDeltaNet and gated attention, 256 experts of width
  512, 8 active, a shared expert), vocabulary ``--vocab`` (default the real 248320);
  40 layers in the real model.
- ``397b``: the Qwen3.5-397B-A17B per-layer shapes (hidden 4096, 512 experts of width
  1024, 10 active, 3.6 GB of experts per layer), as many layers as the disk holds
  twice while the checkpoint is converted; 60 layers in the real model.

Bound: bytes a decode step must read (the K routed experts of every MoE layer plus
every non-expert weight but the embedding table) over the device-to-device copy
bandwidth (bytes read + written / time, cuMemcpyDtoD through ctypes) measured in the
same run, interleaved with the model runs. Prefill of a 512-token prompt: the bound
is reading every weight once per 512 tokens (all experts are touched), which a
compute-bound prefill is far from; the ratio is reported all the same.
Each figure: median of --repeat interleaved rounds and its min..max. For the hybrid
shapes (35b, 397b) each round also decodes with the truncation checkpoints off
(``set_checkpoints(-1)``), the share of decode that taking them costs.

With fewer layers than the real model's L (48, 40, 60), "scaled to L layers" is the
measured tokens/s times layers / L: the per-token time times L / layers, which counts
the head (final norm, lm_head, logits download) L / layers times, so it is a lower
bound for L layers.

Streaming (``--mode stream``): the experts stay in the host page cache and reach the GPU
through the device expert cache (``--gpu-cache``, a fraction of the experts; the
issue's case is 0.25). Bound per decode token: the expert bytes it uploaded (misses,
from the engine's stats) over the pinned host-to-device bandwidth measured in the same
run (cuMemcpyHtoD from cuMemAllocHost memory), plus the GPU's compute time for the
token, taken as the per-token time of the same model with every expert resident
(measured in the same rounds). Ratio = bound time / measured time.

Usage: python3 bench/bench_cuda.py [--shape a3b|35b|397b] [--layers 12] [--vocab V]
       [--dir /tmp/mfb] [--repeat 5] [--tokens 64] [--mode resident|stream]
       [--gpu-cache 0.25]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import moeflux

A3B = {"hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4,
       "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
       "moe_intermediate_size": 768, "intermediate_size": 6144, "vocab_size": 151936,
       "max_position_embeddings": 40960}


# Layers of the real model of each --shape, and its label.
SHAPES = {"a3b": (48, "qwen3_moe Qwen3-30B-A3B shapes"),
          "35b": (40, "qwen3_5_moe Qwen3.6-35B-A3B shapes"),
          "397b": (60, "qwen3_5_moe Qwen3.5-397B-A17B per-layer shapes")}


def build(dirpath: Path, layers: int, shape: str = "a3b", vocab: int = 248320) -> Path:
    """The converted model (made once per --dir, shape, layer count and vocabulary)."""
    if shape != "a3b":
        from moeflux import bench

        return bench.ensure_model(dirpath, shape, layers, None, vocab)
    from moeflux.prep.convert import convert
    from moeflux.prep.synth import tiny_config, write_checkpoint

    out = dirpath / f"a3b-{layers}"
    if (out / "moeflux.json").exists():
        return out
    ckpt = dirpath / f"a3b-{layers}-ckpt"
    t0 = time.time()
    write_checkpoint(ckpt, tiny_config("qwen3_moe", num_hidden_layers=layers, **A3B),
                     seed=0)
    t1 = time.time()
    convert(ckpt, out, progress=False)
    print(f"built {out}: synth {t1 - t0:.0f} s, convert {time.time() - t1:.0f} s",
          flush=True)
    return out


class Cuda:
    """Just enough of the driver API for a device-to-device copy bandwidth."""

    def __init__(self) -> None:
        self.cu = ctypes.CDLL("libcuda.so.1")
        self._ck(self.cu.cuInit(0))
        dev = ctypes.c_int()
        self._ck(self.cu.cuDeviceGet(ctypes.byref(dev), 0))
        self.ctx = ctypes.c_void_p()
        self._ck(self.cu.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), dev))
        self._ck(self.cu.cuCtxSetCurrent(self.ctx))
        name = ctypes.create_string_buffer(128)
        self._ck(self.cu.cuDeviceGetName(name, 128, dev))
        self.name = name.value.decode()
        v = ctypes.c_int()
        self._ck(self.cu.cuDriverGetVersion(ctypes.byref(v)))
        self.driver = v.value

    def _ck(self, r: int) -> None:
        if r != 0:
            raise RuntimeError(f"CUDA driver error {r}")

    def copy_bw(self, nbytes: int = 2 << 30, reps: int = 10) -> float:
        """Read + write bytes per second of cuMemcpyDtoD over nbytes."""
        self._ck(self.cu.cuCtxSetCurrent(self.ctx))
        a, b = ctypes.c_uint64(), ctypes.c_uint64()
        self._ck(self.cu.cuMemAlloc_v2(ctypes.byref(a), ctypes.c_size_t(nbytes)))
        self._ck(self.cu.cuMemAlloc_v2(ctypes.byref(b), ctypes.c_size_t(nbytes)))
        self._ck(self.cu.cuMemsetD8_v2(a, ctypes.c_ubyte(7), ctypes.c_size_t(nbytes)))
        self._ck(self.cu.cuMemcpyDtoD_v2(b, a, ctypes.c_size_t(nbytes)))
        self._ck(self.cu.cuCtxSynchronize())
        t0 = time.perf_counter()
        for _ in range(reps):
            self._ck(self.cu.cuMemcpyDtoD_v2(b, a, ctypes.c_size_t(nbytes)))
        self._ck(self.cu.cuCtxSynchronize())
        dt = time.perf_counter() - t0
        self.cu.cuMemFree_v2(a)
        self.cu.cuMemFree_v2(b)
        return 2.0 * nbytes * reps / dt

    def h2d_bw(self, nbytes: int = 1 << 30, reps: int = 5) -> float:
        """Bytes per second of cuMemcpyHtoD from pinned (cuMemAllocHost) memory."""
        self._ck(self.cu.cuCtxSetCurrent(self.ctx))
        host, dev = ctypes.c_void_p(), ctypes.c_uint64()
        self._ck(self.cu.cuMemAllocHost_v2(ctypes.byref(host), ctypes.c_size_t(nbytes)))
        self._ck(self.cu.cuMemAlloc_v2(ctypes.byref(dev), ctypes.c_size_t(nbytes)))
        ctypes.memset(host, 7, nbytes)
        self._ck(self.cu.cuMemcpyHtoD_v2(dev, host, ctypes.c_size_t(nbytes)))
        t0 = time.perf_counter()
        for _ in range(reps):
            self._ck(self.cu.cuMemcpyHtoD_v2(dev, host, ctypes.c_size_t(nbytes)))
        self._ck(self.cu.cuCtxSynchronize())
        dt = time.perf_counter() - t0
        self.cu.cuMemFree_v2(dev)
        self.cu.cuMemFreeHost(host)
        return nbytes * reps / dt


def dense_bytes(model_dir: Path) -> int:
    """model_weights.bin bytes of every tensor but the embedding table."""
    man = json.loads((model_dir / "model_weights.json").read_text())
    tensors = man["tensors"] if "tensors" in man else man
    total = 0
    for name, t in tensors.items():
        if "embed_tokens" not in name:
            total += int(t.get("size", t.get("nbytes", 0)))
    return total


def decode_tps(m: moeflux.Model, n: int, context: int = 16) -> float:
    """Tokens/s of n one-token evals after a prompt of `context` tokens."""
    m.reset()
    m.eval([1 + i % 1000 for i in range(context)])
    toks = [int(t) for t in np.random.default_rng(0).integers(1, min(1000, m.n_vocab), n)]
    t0 = time.perf_counter()
    for t in toks:
        m.eval(t)
    return n / (time.perf_counter() - t0)


def prefill_tps(m: moeflux.Model, n: int = 512) -> float:
    m.reset()
    toks = [int(t) for t in np.random.default_rng(1).integers(1, min(1000, m.n_vocab), n)]
    t0 = time.perf_counter()
    m.eval(toks)
    return n / (time.perf_counter() - t0)


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3g} ({min(xs):.3g}..{max(xs):.3g})"


def stream_bench(cuda: Cuda, model_dir: Path, args: argparse.Namespace) -> None:
    """Streaming decode through the device expert cache against its bound."""
    res = moeflux.Model(model_dir, backend="cuda", gpu_experts="resident")
    st = moeflux.Model(model_dir, backend="cuda", gpu_experts="stream",
                       gpu_cache=args.gpu_cache)
    for m in (res, st):
        decode_tps(m, 8)   # warm-up: kernels, scratch, the host page cache
    h2d, t_res, t_st, up, ratio, hits = [], [], [], [], [], []
    for _ in range(args.repeat):
        h2d.append(cuda.h2d_bw())
        t_res.append(1.0 / decode_tps(res, args.tokens))
        st.stats_reset()
        t_st.append(1.0 / decode_tps(st, args.tokens))
        s = st.stats()
        n = s["n_tokens_evaluated"]
        up.append(s["gpu_bytes_uploaded"] / n)
        hits.append(s["gpu_cache_hits"] / max(1, s["gpu_cache_hits"] + s["gpu_cache_misses"]))
        ratio.append((up[-1] / h2d[-1] + t_res[-1]) / t_st[-1])
    s = st.stats()
    res.close()
    st.close()
    print(f"model: {SHAPES[args.shape][1]}, {args.layers} layers, streaming, device cache "
          f"{args.gpu_cache:g} of the experts; io_mode {s['io_mode']}")
    print(f"pinned host-to-device GB/s: {spread([b / 1e9 for b in h2d])}")
    print(f"resident decode ms/token (the compute term): "
          f"{spread([t * 1e3 for t in t_res])}")
    print(f"streaming decode tok/s: {spread([1 / t for t in t_st])}; uploaded MB/token "
          f"{spread([u / 1e6 for u in up])}; device-cache hit rate {spread(hits)}")
    print(f"ratio to the bound (uploaded / pinned H2D + resident time) / measured: "
          f"{spread(ratio)}")
    print(f"copy wait (host) {s['gpu_copy_wait_s']:.3f} s over the last round")
    n = max(1, s["n_tokens_evaluated"])
    print("host ms per token, last round: " + ", ".join(
        f"{k[:-2]} {s[k] / n * 1e3:.3f}" for k in
        ("attention_s", "routing_s", "io_wait_s", "experts_s", "shared_s", "head_s")
        if k in s))
    print(f"io: {s['io_fallback']}")
    real = SHAPES[args.shape][0]
    print(f"scaled to {real} layers (lower bound): streaming decode "
          f"{statistics.median([1 / t for t in t_st]) * args.layers / real:.0f} tok/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="a3b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None,
                    help="layers to build (default 12; 4 for 397b)")
    ap.add_argument("--vocab", type=int, default=248320,
                    help="vocabulary of the 35b and 397b shapes (a3b: 151936)")
    ap.add_argument("--dir", default="/tmp/moeflux-bench-cuda")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=16,
                    help="resident decode: prompt tokens before the timed steps")
    ap.add_argument("--mode", default="resident", choices=["resident", "stream"])
    ap.add_argument("--gpu-cache", type=float, default=0.25,
                    help="stream mode: device expert cache, fraction of the experts")
    args = ap.parse_args()
    if args.layers is None:
        args.layers = 4 if args.shape == "397b" else 12
    cuda = Cuda()
    model_dir = build(Path(args.dir), args.layers, args.shape, args.vocab)
    if args.mode == "stream":
        stream_bench(cuda, model_dir, args)
        return
    t0 = time.time()
    m = moeflux.Model(model_dir, backend="cuda", gpu_experts=args.mode)
    print(f"open ({args.mode}): {time.time() - t0:.1f} s; stats io_mode "
          f"{m.stats()['io_mode']}", flush=True)
    per_tok = m.expert_bytes_per_token + dense_bytes(model_dir)
    all_bytes = (model_dir / "model_weights.bin").stat().st_size + sum(
        f.stat().st_size for f in (model_dir / "packed_experts").glob("layer_*.bin"))
    decode_tps(m, 8)   # warm-up: kernels, scratch, caches
    prefill_tps(m, 64)
    m.stats_reset()
    decode_tps(m, args.tokens, args.context)
    d = m.stats()
    n = d["n_tokens_evaluated"]
    print("decode phases, host ms per token (a GPU phase counts until its work is "
          "queued; head includes waiting for the logits): " + ", ".join(
              f"{k[:-2]} {d[k] * 1e3 / n:.3f}" for k in
              ("attention_s", "routing_s", "experts_s", "shared_s", "head_s",
               "compute_s")), flush=True)
    bw, dec, pre, dec_nock = [], [], [], []
    for _ in range(args.repeat):
        bw.append(cuda.copy_bw())
        dec.append(decode_tps(m, args.tokens, args.context))
        if args.shape != "a3b":   # hybrid: the truncation checkpoints' share of decode
            m.set_checkpoints(-1)
            dec_nock.append(decode_tps(m, args.tokens, args.context))
            m.set_checkpoints(0)
        bw.append(cuda.copy_bw())
        pre.append(prefill_tps(m))
    bwm = statistics.median(bw)
    dec_bound = bwm / per_tok
    pre_bound = bwm / all_bytes * 512
    st = m.stats()
    m.close()
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout
    print(f"device {cuda.name}; driver API {cuda.driver}; nvidia-smi: {smi.strip()}")
    print(f"model: {SHAPES[args.shape][1]}, {args.layers} layers, {args.mode}; "
          f"bytes per decode token {per_tok / 1e6:.1f} MB, all weights "
          f"{all_bytes / 1e9:.2f} GB")
    print(f"copy bandwidth (read+write) GB/s: {spread([b / 1e9 for b in bw])}")
    print(f"decode tok/s (context {args.context}): {spread(dec)}; bound "
          f"{dec_bound:.0f}; ratio {spread([d / dec_bound for d in dec])}")
    if dec_nock:
        print(f"decode tok/s with checkpoints off (set_checkpoints(-1)), interleaved: "
              f"{spread(dec_nock)}")
    print(f"prefill-512 tok/s: {spread(pre)}; byte bound {pre_bound:.0f}; ratio "
          f"{spread([p / pre_bound for p in pre])}")
    real = SHAPES[args.shape][0]
    scale = args.layers / real
    print(f"scaled to {real} layers (time x {real}/{args.layers}, head counted each "
          f"time: a lower bound): decode {statistics.median(dec) * scale:.0f} tok/s, "
          f"prefill {statistics.median(pre) * scale:.0f} tok/s")
    print(f"stats: routing {st['routing_s']:.3f} s, experts {st['experts_s']:.3f} s, "
          f"attention {st['attention_s']:.3f} s, head {st['head_s']:.3f} s, "
          f"compute {st['compute_s']:.3f} s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
