"""Whole-model resident decode and prefill for variants of the GPU kernel sources,
interleaved, on the CUDA backend.

A variant is a copy of a kernel directory (this tree's ``shaders/``, or another
tree's), optionally with macros defined at the top of its ``mf_prelude.h`` and with
``MOEFLUX_*`` switches of the host code set in its processes' environment; each runs
through ``MOEFLUX_SHADERS_DIR`` with the same build of the extension, so only the
kernels and the named switches differ. Every measurement is a fresh process (the
spread between processes is part of what a result must beat), the variants in turn,
round after round. First every
distinct kernel source compiles, ``--jobs`` processes at a time (NVRTC, cached under
``MOEFLUX_CACHE_DIR``, default /tmp/moeflux-variants-cache), so no round pays for it.

Per process: open the model resident, a warm-up (8 decode steps, a 64-token prefill),
then ``--reps`` decodes of ``--tokens`` steps after a ``--context``-token prompt and one
512-token prefill (bench_cuda.py's measures). The report gives, per variant, each
round's decode range, the median over every decode and prefill, and the median's
ratio to the first variant's.

  python3 bench/cuda_variants.py --shape a3b --layers 48 --rounds 3 \\
      base=/tmp/base/shaders new=shaders nope=shaders:MF_CODE_PRMT=0,MF_OCC_GU1=5 \\
      apart=shaders@MOEFLUX_GPU_FUSE=0

Variant: NAME=DIR[:MACRO=VALUE,...][@MOEFLUX_VAR=VALUE,...] (NAME of letters, digits,
'_' and '-'). A setting's value may be a comma list of lower-case words
(``@MOEFLUX_GPU_FUSE=add,attn,norm``): a word after a comma with no '=' continues the
value before it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass
class Variant:
    name: str
    src: Path
    defines: list[tuple[str, str]]
    env: list[tuple[str, str]]


def parse_variant(spec: str) -> Variant:
    """NAME=DIR[:MACRO=VALUE,...][@MOEFLUX_VAR=VALUE,...] -> Variant; ValueError naming
    what is wrong."""
    m = re.fullmatch(r"([A-Za-z0-9_-]+)=([^:@]+)(?::([^@]*))?(?:@(.*))?", spec)
    if not m:
        raise ValueError(f"variant {spec!r}: expected NAME=DIR[:MACRO=VALUE,...]"
                         "[@MOEFLUX_VAR=VALUE,...]")
    defines, env = [], []
    for d in filter(None, (m.group(3) or "").split(",")):
        dm = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", d)
        if not dm:
            raise ValueError(f"variant {spec!r}: define {d!r} is not MACRO=VALUE")
        defines.append((dm.group(1), dm.group(2)))
    for e in filter(None, (m.group(4) or "").split(",")):
        em = re.fullmatch(r"(MOEFLUX_[A-Z0-9_]+)=(\S*)", e)
        if em:
            env.append((em.group(1), em.group(2)))
        elif env and re.fullmatch(r"[a-z0-9_]+", e):  # a list value: FUSE=add,attn
            env[-1] = (env[-1][0], f"{env[-1][1]},{e}")
        else:
            raise ValueError(f"variant {spec!r}: setting {e!r} is not MOEFLUX_VAR=VALUE")
    src = Path(m.group(2))
    if not (src / "mf_prelude.h").is_file():
        raise ValueError(f"variant {spec!r}: {src} holds no mf_prelude.h (not a kernel "
                         "directory)")
    return Variant(m.group(1), src, defines, env)


def materialise(v: Variant, work: Path) -> Path:
    """A copy of v's kernel directory under work, with its defines at the top of
    mf_prelude.h (before the file's own, whose #ifndef defaults they override)."""
    dst = work / v.name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(v.src, dst)
    prelude = dst / "mf_prelude.h"
    head = "".join(f"#define {k} {val}\n" for k, val in v.defines)
    prelude.write_text(head + prelude.read_text())
    return dst


def child(args: argparse.Namespace) -> None:
    """One process's measurements as one JSON line (--child)."""
    sys.path.insert(0, str(HERE))
    import bench_cuda as bc
    import moeflux

    md = bc.build(Path(args.dir), args.layers, args.shape)
    m = moeflux.Model(md, backend="cuda", gpu_experts="resident")
    bc.decode_tps(m, 8)
    bc.prefill_tps(m, 64)
    dec = [bc.decode_tps(m, args.tokens, args.context) for _ in range(args.reps)]
    pre = [bc.prefill_tps(m)] if args.reps else []
    m.close()
    print(json.dumps({"decode": dec, "prefill": pre}), flush=True)


def child_cmd(args: argparse.Namespace, reps: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", "--shape",
            args.shape, "--layers", str(args.layers), "--dir", args.dir, "--tokens",
            str(args.tokens), "--context", str(args.context), "--reps", str(reps)]


def child_env(kdir: Path, v: Variant) -> dict[str, str]:
    env = dict(os.environ, MOEFLUX_SHADERS_DIR=str(kdir))
    env.setdefault("MOEFLUX_CACHE_DIR", "/tmp/moeflux-variants-cache")
    env.update(v.env)
    return env


def run_one(args: argparse.Namespace, kdir: Path, v: Variant, reps: int) -> dict:
    r = subprocess.run(child_cmd(args, reps), env=child_env(kdir, v), capture_output=True,
                       text=True, timeout=args.timeout)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{kdir}: exit {r.returncode}: {r.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def warm_up(args: argparse.Namespace, vs: list[Variant], dirs: dict[str, Path]) -> None:
    """Compile every distinct kernel source once (variants that differ only in their
    MOEFLUX_* settings share one), --jobs processes at a time: each holds the model
    resident, so as many at once as GPU memory holds the model."""
    first = {}
    for v in vs:
        first.setdefault((v.src.resolve(), tuple(v.defines)), v)
    todo = list(first.values())
    for i in range(0, len(todo), args.jobs):
        batch = todo[i:i + args.jobs]
        procs = [subprocess.Popen(child_cmd(args, 0), env=child_env(dirs[v.name], v),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True) for v in batch]
        for v, p in zip(batch, procs):
            _, err = p.communicate(timeout=args.timeout)
            if p.returncode != 0:
                sys.exit(f"variant {v.name}: warm-up failed: {err.strip()[-2000:]}")


def report(names: list[str], res: dict[str, list[dict]]) -> None:
    base = None
    print(f"{'variant':<16} {'decode tok/s, each round':<44} {'median':>8} {'ratio':>6} "
          f"{'prefill':>8}")
    for n in names:
        rounds = res[n]
        dec = [x for r in rounds for x in r["decode"]]
        pre = [x for r in rounds for x in r["prefill"]]
        med = statistics.median(dec)
        base = base or med
        each = ", ".join(f"{min(r['decode']):.0f}-{max(r['decode']):.0f}" for r in rounds)
        print(f"{n:<16} {each:<44} {med:8.1f} {med / base:6.3f} "
              f"{statistics.median(pre):8.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="*",
                    help="NAME=DIR[:MACRO=VALUE,...][@MOEFLUX_VAR=VALUE,...]")
    ap.add_argument("--shape", default="a3b", choices=["a3b", "35b", "397b"])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dir", default="/tmp/moeflux-bench-cuda", help="model cache")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="decodes per process")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=16)
    ap.add_argument("--work", default=None, help="where the variant copies go "
                    "(default: a temporary directory, removed at the end)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per process")
    ap.add_argument("--jobs", type=int, default=2, help="warm-ups (kernel compiles) at "
                    "once, each with the model resident in GPU memory")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if len(args.variants) < 1 or args.rounds < 1 or args.reps < 1 or args.jobs < 1:
        ap.error("give at least one variant, --rounds, --reps and --jobs >= 1")
    try:
        vs = [parse_variant(s) for s in args.variants]
    except ValueError as e:
        ap.error(str(e))
    if len({v.name for v in vs}) != len(vs):
        ap.error("variant names must differ")
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="mf-variants-")
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        dirs = {v.name: materialise(v, work) for v in vs}
        sys.path.insert(0, str(HERE))
        import bench_cuda as bc

        print(f"model: {bc.build(Path(args.dir), args.layers, args.shape)}", flush=True)
        warm_up(args, vs, dirs)
        res: dict[str, list[dict]] = {n: [] for n in dirs}
        for r in range(args.rounds):
            for v in vs:
                n = v.name
                res[n].append(run_one(args, dirs[n], v, args.reps))
                print(f"round {r} {n}: " + ", ".join(
                    f"{x:.1f}" for x in res[n][-1]["decode"]) +
                    f"; prefill {res[n][-1]['prefill'][0]:.0f}", flush=True)
        report(list(dirs), res)
    finally:
        if tmp:
            tmp.cleanup()


if __name__ == "__main__":
    main()
