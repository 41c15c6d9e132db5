"""`vua-nixl` command line.

The core owns its store and lifecycle commands (``info``, ``ls``, ``stats``, ``verify``, ``gc``,
``prune``). Optional parts of the project (the demo engine, the bench tools, the Dynamo graph)
add theirs through the ``vua_nixl.commands`` entry-point group declared in pyproject.toml, so
the core never imports them by name and a storage node without them still has a working CLI.
A part whose optional dependencies are missing is skipped with a debug log.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points
from typing import Any, Callable

from vua_nixl import doctor, store_cli
from vua_nixl.errors import VuaNixlError
from vua_nixl.lifecycle import prune_cli

log = logging.getLogger(__name__)

#: Entry-point group through which optional parts register subcommands: ``register(subparsers)``.
COMMAND_GROUP = "vua_nixl.commands"
_OUR_PACKAGES = {"vua_nixl", "vua_nixl_engine", "vua_nixl_bench", "dynamo_components"}


def _plugins() -> list[tuple[str, Callable[[Any], None]]]:
    found = []
    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        try:
            found.append((ep.name, ep.load()))
        except ImportError as exc:
            if exc.name and exc.name.split(".")[0] in _OUR_PACKAGES:
                raise  # a bug in the project, not a missing optional dependency
            log.debug("commands from %s unavailable (optional dependency missing): %s", ep.value, exc)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vua-nixl",
        description="Shared, persistent KV cache tier over NIXL (see README.md).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    store_cli.register(sub)
    prune_cli.register(sub)
    doctor.register(sub)
    for extra, register in _plugins():
        before = set(sub.choices)
        register(sub)
        for name in set(sub.choices) - before:  # remember which extra each command needs
            sub.choices[name].set_defaults(_extra=extra)
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
    except VuaNixlError as exc:  # a clear message, never a traceback, for what we raise on purpose
        log.error("%s", exc)
        return 1
    except ModuleNotFoundError as exc:
        extra = getattr(args, "_extra", None)
        if extra is None or not exc.name or exc.name.split(".")[0] in _OUR_PACKAGES:
            raise
        log.error("`vua-nixl %s` needs the optional dependencies of vua-nixl[%s] (missing: %s); "
                  "install them with: pip install 'vua-nixl[%s]'", args.command, extra, exc.name, extra)
        return 2


if __name__ == "__main__":
    sys.exit(main())
