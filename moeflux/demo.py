"""``python -m moeflux demo``: a self-contained run at real per-layer shapes.

Creates once (cached) a synthetic checkpoint with the per-layer shapes of
Qwen3.6-35B-A3B (hidden 2048, 256 experts of width 512, 8 per token, GatedDeltaNet
16/32 heads of 128, gated attention 16/2 heads of 256) but only a few layers and a
reduced vocabulary, converts it into a moeflux model directory, then generates tokens
greedily and reports the decode speed and the expert bytes read per token. The
weights are random, so the text is noise: the point is the engine's speed and I/O at
real shapes, from a clean clone, in a few minutes on a small machine.
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

PRESET = "qwen36-35b-a3b-shapes"
DEFAULT_VOCAB = 32768
PROMPT = "The streaming expert engine reads only what the router picks."


def default_cache() -> Path:
    """~/.cache/moeflux/demo (XDG_CACHE_HOME respected)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "moeflux" / "demo"


def demo_overrides(n_layers: int, vocab: int) -> tuple[str, dict[str, Any]]:
    """The architecture and tiny_config overrides of the demo model."""
    from moeflux.prep.synth import PRESETS

    arch, ov = PRESETS[PRESET]
    ov = copy.deepcopy(ov)
    ov["num_hidden_layers"] = n_layers
    ov["vocab_size"] = vocab
    return arch, ov


def ensure_model(cache: Path, n_layers: int, vocab: int, progress: bool = True) -> Path:
    """The converted model directory, made on first use (checkpoint removed after
    conversion to halve the disk footprint)."""
    from moeflux.prep.convert import convert
    from moeflux.prep.synth import tiny_config, write_checkpoint

    # "w": the tokenizer names every id (a model cached before that decoded to "").
    root = cache / f"qwen36-shapes-L{n_layers}-V{vocab}w"
    model_dir = root / "model"
    if (model_dir / "moeflux.json").exists():
        return model_dir
    arch, ov = demo_overrides(n_layers, vocab)
    ckpt = root / "checkpoint"
    if not (ckpt / "config.json").exists():
        print(f"[demo] writing a synthetic {arch} checkpoint ({n_layers} layers at "
              f"Qwen3.6-35B-A3B shapes) to {ckpt}", file=sys.stderr)
        write_checkpoint(ckpt, tiny_config(arch, **ov), progress=progress)
    print(f"[demo] converting into {model_dir}", file=sys.stderr)
    convert(ckpt, model_dir, progress=progress)
    shutil.rmtree(ckpt, ignore_errors=True)
    return model_dir


def prompt_tokens(model_dir: Path, n_vocab: int) -> list[int]:
    """The demo prompt through the model's tokenizer (ids below n_vocab)."""
    try:
        from moeflux.tokenizer import Tokenizer

        ids = Tokenizer(model_dir).encode(PROMPT)
    except Exception:  # tokenizer optional for the demo: fall back to fixed ids
        ids = []
    ids = [i for i in ids if 0 <= i < n_vocab]
    return ids or [1, 2, 3, 4, 5, 6, 7, 8]


def decode(model_dir: Path, ids: list[int]) -> str:
    """The generated ids as text ("" when no tokenizer is usable)."""
    try:
        from moeflux.tokenizer import Tokenizer

        return Tokenizer(model_dir).decode(ids)
    except Exception:  # tokenizer optional for the demo
        return ""


def run(model_dir: Path, n_tokens: int, threads: int | None) -> dict[str, Any]:
    """Prefill the prompt, generate n_tokens greedily, return the measurements."""
    import moeflux

    with moeflux.Model(model_dir, threads=threads) as m:
        prompt = prompt_tokens(model_dir, m.n_vocab)
        t0 = time.perf_counter()
        logits = m.eval(prompt)
        t_prefill = time.perf_counter() - t0
        pre = m.stats()
        m.stats_reset()
        out = []
        t0 = time.perf_counter()
        for _ in range(n_tokens):
            nxt = int(logits.argmax())
            out.append(nxt)
            logits = m.eval([nxt])
        t_decode = time.perf_counter() - t0
        st = m.stats()
    return {
        "prompt_tokens": len(prompt), "prefill_s": t_prefill,
        "prefill_expert_bytes": pre["expert_bytes_read"],
        "tokens": n_tokens, "decode_s": t_decode,
        "tok_per_s": n_tokens / t_decode if t_decode > 0 else float("inf"),
        "expert_bytes_per_token": st["expert_bytes_read"] / max(1, n_tokens),
        "expert_read_s_per_token": st["expert_read_s"] / max(1, n_tokens),
        "generated": out,
    }


def _main(args: argparse.Namespace) -> int:
    if args.layers < 1 or args.tokens < 1:
        print("moeflux demo: --layers and --tokens must be >= 1", file=sys.stderr)
        return 2
    cache = Path(args.cache) if args.cache else default_cache()
    model_dir = ensure_model(cache, args.layers, args.vocab, not args.no_progress)
    r = run(model_dir, args.tokens, args.threads)
    MiB = 1 << 20
    print(f"model      {model_dir}  ({args.layers} layers at Qwen3.6-35B-A3B shapes, "
          f"vocab {args.vocab}, random weights)")
    print(f"prefill    {r['prompt_tokens']} tokens in {r['prefill_s']:.2f} s "
          f"({r['prefill_expert_bytes'] / MiB:.1f} MiB of experts read)")
    print(f"decode     {r['tokens']} tokens in {r['decode_s']:.2f} s = "
          f"{r['tok_per_s']:.2f} tokens/s")
    print(f"experts    {r['expert_bytes_per_token'] / MiB:.2f} MiB read per token "
          f"({r['expert_read_s_per_token'] * 1e3:.1f} ms/token waiting for reads)")
    print(f"tokens     {r['generated']}")
    text = decode(model_dir, r["generated"])
    if text:
        print(f"text       {text!r} (random weights: made-up words)")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``demo`` command to ``python -m moeflux``."""
    p = subparsers.add_parser(
        "demo", help="synthetic model at Qwen3.6-35B-A3B shapes: speed and I/O",
        description="Create (once, cached) a synthetic model with Qwen3.6-35B-A3B "
                    "per-layer shapes, convert it, generate greedily and report "
                    "tokens/s and expert bytes read per token.")
    p.add_argument("--layers", type=int, default=4, help="layers (default 4)")
    p.add_argument("--tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--cache", default=None,
                   help="cache directory (default ~/.cache/moeflux/demo)")
    p.add_argument("--vocab", type=int, default=DEFAULT_VOCAB,
                   help=f"vocabulary size (default {DEFAULT_VOCAB})")
    p.add_argument("--threads", type=int, default=None, help="compute threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_main)
