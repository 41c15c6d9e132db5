"""``vua-nixl up``: the Dynamo graph launcher as a subcommand of the project CLI.

Only argparse wiring lives here; Dynamo itself is imported by the processes the launcher starts,
so ``vua-nixl --help`` works on machines without Dynamo.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``up`` to the ``vua-nixl`` command line (called by ``vua_nixl.cli``)."""
    from dynamo_components import graph

    p = subparsers.add_parser(
        "up",
        help="run a local Dynamo graph (frontend + prefill/decode workers) on the shared store",
        description=(graph.__doc__ or "").split("\n\n")[0],
    )
    graph.add_arguments(p)
    p.set_defaults(func=_up)


def _up(args: argparse.Namespace) -> int:
    from dynamo_components import graph

    # --isolate re-executes the launcher inside a network namespace: hand it our own flags.
    argv = sys.argv[sys.argv.index("up") + 1 :] if "up" in sys.argv else []
    return graph.run(args, argv)
