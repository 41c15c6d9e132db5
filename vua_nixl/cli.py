"""`vua-nixl` command line.

Each area of the project owns its subcommands in its own module and exposes
``register(subparsers)``; this file only wires them together, so adding a command never
means editing another team's code. Modules whose optional dependencies are missing are
skipped with a debug log rather than breaking the whole CLI.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

log = logging.getLogger(__name__)

#: Modules that contribute subcommands, in help order.
COMMAND_MODULES = (
    "vua_nixl.store_cli",  # info, ls, stats, verify, gc
    "vua_nixl.engine.cli",  # make-model, demo
    "vua_nixl.bench.cli",  # plan, bench
    "vua_nixl.lifecycle.cli",  # audit / prune helpers
    "dynamo_components.cli",  # up
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vua-nixl",
        description="Shared, persistent KV cache tier over NIXL (see README.md).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and (exc.name == name or name.startswith(exc.name + ".")):
                continue  # that part of the project is not present in this build
            log.debug("commands from %s unavailable: %s", name, exc)
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2) if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
