"""Command line: ``python -m moeflux <command> ...`` (also the ``moeflux`` script).

Commands live in their own modules, each providing ``register(subparsers)`` which adds
its subparser and sets ``func``; a module not present yet is simply not listed.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": "moeflux.demo",
    "generate": "moeflux.cli",
    "info": "moeflux.cli",
    "chat": "moeflux.cli",
    "serve": "moeflux.server",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moeflux",
                                     description="moeflux: streaming-experts MoE inference")
    sub = parser.add_subparsers(dest="command", required=True)
    registered = set()
    for module in dict.fromkeys(COMMANDS.values()):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("moeflux"):
                continue  # command module not present in this build
            raise
        if module not in registered:
            mod.register(sub)
            registered.add(module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command: expected failures end as one line on stderr and status 1,
    Ctrl-C as status 130, a closed stdout pipe quietly (moeflux.clitools)."""
    from .clitools import run_cli

    args = build_parser().parse_args(argv)
    return run_cli(lambda: args.func(args), "moeflux")


if __name__ == "__main__":
    sys.exit(main())
