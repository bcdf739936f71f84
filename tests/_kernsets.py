"""Kernel-set accounting of a pytest run: which CPU kernel sets ("scalar", "avx2",
"avx512", "avx512vnni", "neon") the tests really ran, printed at the end of the run, and the
MOEFLUX_REQUIRE_KERNELS check (conftest.py's session hooks). The tests skip a set this
CPU lacks; without the check, a build or dispatch bug that hides a set, or a CI
machine without it, would pass silently. `make test` sets the variable to every set
the build contains for this CPU (tools/kernel_sets.c, built apart from the core).
"""
from __future__ import annotations

import os

KNOWN = ("scalar", "avx2", "avx512", "avx512vnni", "neon")

# Set name -> number of runs that used it, in this process.
EXERCISED: dict[str, int] = {}


def available() -> list[str]:
    """The sets this build contains and this CPU runs, best first (the core's list)."""
    from moeflux import _diag

    return list(_diag.kernels())


def note(name: str) -> None:
    """Counts one run that used kernel set ``name`` (after it succeeded)."""
    assert name in KNOWN, f"unknown kernel set {name!r}"
    EXERCISED[name] = EXERCISED.get(name, 0) + 1


def required() -> list[str]:
    """The sets $MOEFLUX_REQUIRE_KERNELS names (comma- or space-separated)."""
    text = os.environ.get("MOEFLUX_REQUIRE_KERNELS", "")
    return [s for s in text.replace(",", " ").split() if s]


def summary() -> tuple[str, list[str]]:
    """One line saying which sets ran, and the problems with the requirement (a set
    required but not exercised, or not a set at all)."""
    ran = " ".join(f"{k} ({EXERCISED[k]} runs)" for k in KNOWN if k in EXERCISED)
    line = f"kernel sets exercised: {ran or 'none'}"
    req = required()
    problems = [f"MOEFLUX_REQUIRE_KERNELS names {s!r}, not a kernel set ({', '.join(KNOWN)})"
                for s in req if s not in KNOWN]
    problems += [f"kernel set {s!r} is required (MOEFLUX_REQUIRE_KERNELS="
                 f"{os.environ['MOEFLUX_REQUIRE_KERNELS']}) but was not exercised"
                 for s in req if s in KNOWN and s not in EXERCISED]
    if req:
        line += f"; required: {','.join(req)}"
    return line, problems
