"""Command line of moeflux.prep: ``python -m moeflux.prep <command> ...``.

Each command lives in its own module, which provides ``register(subparsers)``; the
module is imported only when listed here, so a missing optional dependency of one
command does not break the others.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "synth": "moeflux.prep.synth",
    "convert": "moeflux.prep.convert",
    "extract-weights": "moeflux.prep.extract_weights",
    "repack-experts": "moeflux.prep.repack_experts",
    "verify": "moeflux.prep.verify",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moeflux.prep",
                                     description="moeflux model preparation")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("moeflux.prep"):
                continue  # command not built yet
            raise
        mod.register(sub)
    return parser


# Commands that resume an interrupted run when started again with the same arguments.
RESUMABLE = {"convert", "extract-weights", "repack-experts"}


def main(argv: list[str] | None = None) -> int:
    """Run a command: a refusal or I/O failure ends as one line on stderr with
    status 1, Ctrl-C with status 130 (and a resume hint where a rerun resumes)."""
    from moeflux.clitools import run_cli

    parser = build_parser()
    args = parser.parse_args(argv)
    return run_cli(lambda: args.func(args), "moeflux.prep",
                   resumable=args.command in RESUMABLE)


if __name__ == "__main__":
    sys.exit(main())
