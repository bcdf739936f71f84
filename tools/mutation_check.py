"""Mutation evidence: plant a plumbing bug, rebuild, run the forward tests, restore.

Each mutation is a small edit of the C sources (a wrong eps, rope base, attention
scale, a state carried slightly wrong across calls...). For each one the script
applies it, rebuilds the extension in place, runs the forward tests against mlx-lm,
restores the sources (always, also on Ctrl-C) and reports, per architecture the
mutation touches, how many tests failed through a tolerance check (the assert_close
tier message) and how many only through an argmax flip. A mutation the suite does not
catch through a tolerance check on every architecture it touches is a gap in the
fixtures. The sources are rebuilt clean at the end.

    .venv/bin/python tools/mutation_check.py [--only NAME ...] [--list] [--show]
        [--tests 'pytest args']

Slow (one build and one test run per mutation); never part of `make test`.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALL = ("qwen3_moe", "qwen3_next", "qwen3_5_moe", "deepseek_v3")
HYBRID = ("qwen3_next", "qwen3_5_moe")

DEFAULT_TESTS = ("tests/test_nondefault.py tests/test_qwen3_moe.py tests/test_hybrid.py "
                 "tests/test_deepseek.py -k 'nondefault or prefill_and_decode or chunked "
                 "or pieces or long_prompt or old_form'")


@dataclass(frozen=True)
class Mutation:
    name: str
    archs: tuple[str, ...]
    edits: tuple[tuple[str, str, str], ...]   # (file, exact old text, new text)


MUTATIONS = (
    Mutation("rmsnorm-eps-1e-5", ALL, (
        ("csrc/core/config.c", "cfg->rms_norm_eps = (float)eps;",
         "cfg->rms_norm_eps = 1e-5f;"),)),
    Mutation("gdn-qk-norm-eps-not-over-dk", HYBRID, (
        ("csrc/models/qwen3_next.c", "float eps_qk = 1e-6f / (float)dk;",
         "float eps_qk = 1e-6f;"),)),
    Mutation("rope-theta-x1.01", ALL, (
        ("csrc/core/config.c",
         "    if (!(cfg->rope_theta > 0) || !isfinite(cfg->rope_theta))",
         "    cfg->rope_theta *= 1.01;\n"
         "    if (!(cfg->rope_theta > 0) || !isfinite(cfg->rope_theta))"),)),
    Mutation("attn-scale-x1.001", ALL, (
        ("csrc/models/qwen3_moe.c",
         ".scale = (float)(1.0 / sqrt((double)c->head_dim)),",
         ".scale = (float)(1.001 / sqrt((double)c->head_dim)),"),
        ("csrc/models/qwen3_next.c", "d->attn_scale = 1.0f / sqrtf((float)c->head_dim);",
         "d->attn_scale = 1.001f / sqrtf((float)c->head_dim);"),
        ("csrc/models/deepseek_v3.c", "hp->softmax_scale = (float)scale;",
         "hp->softmax_scale = (float)(scale * 1.001);"))),
    # The delta-rule state read from the committed buffers at the start of a call
    # (so carried from the previous call) comes in 0.1 % small.
    Mutation("gdn-state-carried-x0.999", HYBRID, (
        ("csrc/backends/cpu/cpu_ops.c",
         "                memcpy(row, S_in + (int64_t)i * dk, (size_t)dk * sizeof(float));",
         "                for (int c_ = 0; c_ < dk; c_++)\n"
         "                    row[c_] = 0.999f * S_in[(int64_t)i * dk + c_];"),)),
    # Keys written by a later call roped one position too far (the KV cache rows of
    # the first call are right, so only chunked prefill and decode see it).
    Mutation("kv-rope-position-off-by-one-across-calls", ("qwen3_moe",), (
        ("csrc/models/attn_gqa.c",
         "op->rope(ex, k, n, Hkv, kv_row, D, d->n_rot, s->inv_freq, pos0, 0, 1.0f);",
         "op->rope(ex, k, n, Hkv, kv_row, D, d->n_rot, s->inv_freq, pos0 ? pos0 + 1 : 0, "
         "0, 1.0f);"),)),
    Mutation("routed-scaling-factor-ignored", ("deepseek_v3",), (
        ("csrc/models/deepseek_v3.c",
         "mc->routed_scaling_factor = (float)d->noaux.routed_scaling_factor;",
         "mc->routed_scaling_factor = 1.0f;"),)),
    Mutation("yarn-rope-mscale-ignored", ("deepseek_v3",), (
        ("csrc/models/deepseek_v3.c", "    hp->softmax_scale = (float)scale;",
         "    hp->rope_mscale = 1.0f;\n    hp->softmax_scale = (float)scale;"),)),
    Mutation("yarn-mscale-all-dim-ignored", ("deepseek_v3",), (
        ("csrc/models/deepseek_v3.c", "            scale *= m * m;",
         "            (void)m;"),)),
)


def apply(m: Mutation) -> dict[Path, str]:
    """Applies ``m``; returns the original text of every file it changed."""
    saved: dict[Path, str] = {}
    for rel, old, new in m.edits:
        path = ROOT / rel
        text = saved.get(path, path.read_text())
        saved.setdefault(path, text)
        cur = path.read_text()
        if cur.count(old) != 1:
            restore(saved)
            raise SystemExit(f"{m.name}: {rel}: expected the text once, found it "
                             f"{cur.count(old)} times: {old!r}")
        path.write_text(cur.replace(old, new))
    return saved


def restore(saved: dict[Path, str]) -> None:
    for path, text in saved.items():
        path.write_text(text)


def build() -> None:
    env = dict(os.environ, MOEFLUX_WERROR="1")
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace",
                        "--parallel", "2"], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    if r.returncode:
        raise SystemExit(f"build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def arch_of(nodeid: str) -> str | None:
    for pat, arch in (("qwen3_5_moe", "qwen3_5_moe"), ("q35-", "qwen3_5_moe"),
                      ("qwen3_next", "qwen3_next"), ("next-", "qwen3_next"),
                      ("deepseek", "deepseek_v3"), ("qwen3_moe", "qwen3_moe")):
        if pat in nodeid:
            return arch
    return None


def run_tests(args: str) -> tuple[int, dict[str, str]]:
    """(tests run, {nodeid: 'tolerance' | 'argmax' | 'other'} of the failures)."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"--junitxml={xml}", *shlex.split(args)], cwd=ROOT,
                       capture_output=True, text=True)
        tree = ET.parse(xml)
    failed: dict[str, str] = {}
    n = 0
    for case in tree.iter("testcase"):
        n += 1
        node = f"{case.get('classname')}::{case.get('name')}"
        for bad in list(case.iter("failure")) + list(case.iter("error")):
            msg = (bad.get("message") or "") + (bad.text or "")
            failed[node] = ("tolerance" if re.search(r" tier [0-9.e-]+\)", msg) else
                            "argmax" if "argmax differs" in msg else "other")
    return n, failed


def report(m: Mutation, n: int, failed: dict[str, str]) -> tuple[str, bool]:
    cells, caught = [], True
    for arch in m.archs:
        mine = {node: k for node, k in failed.items() if arch_of(node) == arch}
        kinds = list(mine.values())
        tol = kinds.count("tolerance")
        nd = sum(k == "tolerance" and "nondefault" in node for node, k in mine.items())
        caught &= tol > 0
        cells.append(f"{arch}: {tol} tol ({nd} non-default) / "
                     f"{kinds.count('argmax')} argmax / {kinds.count('other')} other")
    return f"| {m.name} | {len(failed)} of {n} | {'; '.join(cells)} |", caught


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="mutation names (default: all)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--tests", default=DEFAULT_TESTS, help="pytest arguments")
    ap.add_argument("--show", action="store_true",
                    help="also list each failing test and how it failed")
    a = ap.parse_args()
    chosen = [m for m in MUTATIONS if not a.only or m.name in a.only]
    if a.list or not chosen:
        for m in MUTATIONS:
            print(m.name, ",".join(m.archs))
        return 0 if chosen else 2
    rows, missed = [], []
    try:
        for m in chosen:
            saved = apply(m)
            try:
                build()
            finally:
                restore(saved)
            n, failed = run_tests(a.tests)
            row, caught = report(m, n, failed)
            print(row, flush=True)
            for node, kind in sorted(failed.items()) if a.show else ():
                print(f"    {kind:9s} {node}", flush=True)
            rows.append(row)
            if not caught:
                missed.append(m.name)
    finally:
        build()   # the unmutated sources again
    print("\n| mutation | failed tests | per architecture: failed through the "
          "tolerance check (of them in test_nondefault.py) / only an argmax flip / "
          "otherwise |\n|---|---|---|")
    print("\n".join(rows))
    if missed:
        print(f"NOT caught through a tolerance check everywhere: {', '.join(missed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
