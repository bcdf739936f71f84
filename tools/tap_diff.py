"""Localise a disagreement with mlx-lm to a layer and an op: run the same tokens
through a debug-tap build of moeflux and through mlx-lm (float32, CPU) with hooks at
the same module paths, and compare tap by tap in execution order.

    make tap                                    # builds build/tap-site once
    python tools/tap_diff.py MODEL_DIR CHECKPOINT --tokens 1,2,3,4

MODEL_DIR is the moeflux model directory, CHECKPOINT the mlx-community checkpoint it
was converted from. Each tap of moeflux (MF_TAP sites: "model.layers.3.mlp", ...) that
names an mlx-lm module is compared with that module's output for the same tokens:
max |moeflux - mlx| / max |mlx|. Taps inside a module (sdpa, the delta rule) have no
module to hook and are listed as "internal". The first compared tap above --rtol is
marked: that is where the two engines part. Exit status 1 when one is found.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def run_moeflux(model_dir: Path, tokens: list[int], tap_site: Path, out: Path) -> None:
    """One eval of `tokens` in a child process using the tap build; taps land in out."""
    if not (tap_site / "moeflux").is_dir():
        raise SystemExit(f"{tap_site}: no tap build (run `make tap` first)")
    env = dict(os.environ, PYTHONPATH=str(tap_site), PYTHONSAFEPATH="1",
               MOEFLUX_TAP_DIR=str(out))
    code = ("import sys, moeflux\n"
            "m = moeflux.Model(sys.argv[1], threads=1, n_ctx=len(sys.argv[2].split(',')))\n"
            "m.eval([int(t) for t in sys.argv[2].split(',')])\n")
    subprocess.run([sys.executable, "-c", code, str(model_dir),
                    ",".join(map(str, tokens))], env=env, check=True)


def read_taps(out: Path) -> list[tuple[str, np.ndarray]]:
    """(name, floats) in the order the taps fired."""
    taps, offsets = [], {}
    for line in (out / "index.jsonl").read_text().splitlines():
        rec = json.loads(line)
        name, n = rec["name"], rec["floats"]
        at = offsets.get(name, 0)
        data = np.fromfile(out / f"{name}.f32", dtype=np.float32, count=n,
                           offset=at * 4)
        offsets[name] = at + n
        taps.append((name, data))
    return taps


def _resolve(root: Any, path: str) -> tuple[Any, Any, Any] | None:
    """(parent, key, module) of a dotted path under the mlx-lm Model, or None."""
    parent, key, node = None, None, root
    for part in path.split("."):
        nxt = None
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            nxt = node[int(part)]
        elif not isinstance(node, list) and hasattr(node, part):
            nxt = getattr(node, part)
        if nxt is None:
            return None
        parent, key, node = node, part, nxt
    return parent, key, node


def run_mlx(ckpt: Path, tokens: list[int], names: list[str]) -> dict[str, np.ndarray]:
    """mlx-lm float32 forward with a recording wrapper at each module path in names."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import load_model

    mx.set_default_device(mx.cpu)
    model, _ = load_model(ckpt, strict=True)
    model.set_dtype(mx.float32)
    seen: dict[str, np.ndarray] = {}

    class Tap(nn.Module):
        def __init__(self, inner: Any, name: str) -> None:
            super().__init__()
            self.inner = inner
            self.tap_name = name

        def __getattr__(self, key: str) -> Any:
            try:
                return super().__getattr__(key)
            except AttributeError:   # the wrapped layer's own fields (is_linear, ...)
                if key == "inner" or "inner" not in self:
                    raise
                return getattr(self["inner"], key)

        def __call__(self, *args: Any, **kw: Any) -> Any:
            out = self.inner(*args, **kw)
            first = out[0] if isinstance(out, tuple) else out
            seen[self.tap_name] = np.array(first.astype(mx.float32))
            return out

    for name in names:
        hit = _resolve(model, name)
        if hit is None or not isinstance(hit[2], nn.Module):
            continue
        parent, key, node = hit
        if isinstance(parent, list):
            parent[int(key)] = Tap(node, name)
        else:
            setattr(parent, key, Tap(node, name))
    logits = model(mx.array([tokens], dtype=mx.int32))
    mx.eval(logits)
    return seen


def _as_moeflux_layout(r: np.ndarray) -> np.ndarray:
    """mlx-lm per-head tensors are [B, heads, L, d]; moeflux keeps [L, heads, d]."""
    if r.ndim == 4:
        r = r.transpose(0, 2, 1, 3)
    return np.ascontiguousarray(r).ravel()


def compare(taps: list[tuple[str, np.ndarray]], ref: dict[str, np.ndarray],
            rtol: float) -> tuple[list[str], str | None]:
    """Report lines and the first tap over rtol (None if none)."""
    lines, first_bad = [], None
    for name, ours in taps:
        if name not in ref:
            lines.append(f"  {name:48s} internal (no mlx-lm module to hook)")
            continue
        r = _as_moeflux_layout(ref[name])
        if r.shape != ours.shape:
            lines.append(f"  {name:48s} shape {ours.shape} vs mlx {r.shape}")
            first_bad = first_bad or name
            continue
        rel = float(np.abs(ours - r).max() / max(float(np.abs(r).max()), 1e-30))
        bad = not np.isfinite(rel) or rel > rtol
        if bad and first_bad is None:
            first_bad = name
        mark = "  <-- first over --rtol" if bad and first_bad == name else ""
        lines.append(f"  {name:48s} {rel:.2e}{mark}")
    return lines, first_bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--tokens", default="1,2,3,4,5,6,7,8",
                    help="comma-separated token ids (one eval, at most 64)")
    ap.add_argument("--rtol", type=float, default=1e-4,
                    help="relative bound per tap (default 1e-4)")
    ap.add_argument("--tap-site", type=Path, default=ROOT / "build" / "tap-site")
    a = ap.parse_args(argv)
    tokens = [int(t) for t in a.tokens.split(",") if t.strip()]
    if not 1 <= len(tokens) <= 64:
        raise SystemExit("--tokens: give 1 to 64 ids (one chunk)")
    with tempfile.TemporaryDirectory() as tmp:
        run_moeflux(a.model_dir, tokens, a.tap_site, Path(tmp))
        taps = read_taps(Path(tmp))
    ref = run_mlx(a.checkpoint, tokens, [n for n, _ in taps])
    lines, first_bad = compare(taps, ref, a.rtol)
    print(f"{len(taps)} taps, {sum(n in ref for n, _ in taps)} compared with mlx-lm "
          f"(max |moeflux - mlx| / max |mlx|):")
    print("\n".join(lines))
    print(f"first tap over {a.rtol:g}: {first_bad}" if first_bad else
          f"every compared tap within {a.rtol:g}")
    return 1 if first_bad else 0


if __name__ == "__main__":
    sys.exit(main())
