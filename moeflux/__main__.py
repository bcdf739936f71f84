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
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
