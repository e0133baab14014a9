"""The `owl` command. Sub-commands live in `pipelines/commands/<area>.py`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pipelines.errors import USER_ERRORS, one_line

# Command modules, in help order. Each exposes `register(subparsers)`.
COMMAND_MODULES = ("run", "model", "data", "eval", "compare")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="owl",
        description="Train mPLUG-Owl / mPLUG-Owl2 end to end on Ray: one job file, one command.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"pipelines.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"pipelines.commands.{name}":
                continue  # that command group is not installed in this checkout
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:  # one line that says what to fix; OWL_DEBUG=1 for the traceback
        if os.environ.get("OWL_DEBUG"):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
