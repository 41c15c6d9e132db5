"""`vua-nixl prune`: run the pruner once or periodically against a store root.

``vua-nixl gc --max-bytes/--max-age`` (in store_cli) and ``vua-nixl stats`` use the helpers
here too, so the three commands agree on how limits are parsed and reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any, Optional

from vua_nixl.config import StoreConfig, add_config_flags, config_from_args, parse_size
from vua_nixl.errors import InvalidInputError, StoreRootError
from vua_nixl.paths import StorePaths

log = logging.getLogger(__name__)

__all__ = ["parse_size", "add_limit_args", "run_prune", "register", "LIMIT_FLAGS", "writable_root"]

#: Config fields the limit flags set, and their historical flag names.
LIMIT_FLAGS = {"max_bytes": "--max-bytes", "max_age_s": "--max-age", "eviction": "--policy",
               "low_water": "--low-water", "tmp_max_age_s": "--tmp-max-age", "recycle_pool_mib": "--recycle-pool-mib"}


def add_limit_args(p: argparse.ArgumentParser) -> None:
    """Limit flags, each mapped to its StoreConfig field (and so its VUA_NIXL_ variable)."""
    add_config_flags(p, StoreConfig, ["root"])
    add_config_flags(p, StoreConfig, LIMIT_FLAGS, flags=LIMIT_FLAGS)


def writable_root(cfg: StoreConfig, command: str) -> StorePaths:
    """The root for a command that changes it: readable, of a format this build handles, and
    writable; otherwise a StoreRootError that says so (the CLI exits non-zero, nothing changed)."""
    paths = StorePaths(cfg.root)
    paths.check_readable()
    if not os.access(paths.root, os.W_OK | os.X_OK) or (paths.tmp.exists() and not os.access(paths.tmp, os.W_OK | os.X_OK)):
        raise StoreRootError(f"store root {paths.root} is read-only for this process: `vua-nixl {command}` changes nothing there")
    return paths


def run_prune(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    """One pruning round: limits from the flags, else VUA_NIXL_* config."""
    from vua_nixl.lifecycle.pruner import Pruner

    cfg = config_from_args(StoreConfig, args)
    writable_root(cfg, "prune")
    if cfg.eviction == "ttl" and cfg.max_age_s is None:
        raise InvalidInputError("--policy ttl needs --max-age (or VUA_NIXL_MAX_AGE_S)")
    pruner = Pruner(cfg.root, max_bytes=cfg.max_bytes, policy=cfg.eviction, max_age_s=cfg.max_age_s,
                    low_water=cfg.low_water, tmp_max_age_s=cfg.tmp_max_age_s, recycle_pool_bytes=cfg.recycle_pool_mib << 20)
    rep = pruner.run_once()
    return {"root": os.fspath(cfg.root), "max_bytes": cfg.max_bytes, "max_age_s": cfg.max_age_s,
            "policy": cfg.eviction, "tmp_max_age_s": cfg.tmp_max_age_s, "recycle_pool_bytes": pruner.recycle_pool_bytes,
            **rep.as_dict()}


def register(sub: Any) -> None:
    p = sub.add_parser("prune", help="compact access logs and evict by policy (once, or every --period seconds)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_limit_args(p)
    p.add_argument("--period", type=float, default=None, help="keep running, one round every PERIOD seconds")
    p.set_defaults(func=cmd_prune)


def cmd_prune(args: argparse.Namespace) -> int:
    while True:
        out = run_prune(args)
        assert out is not None
        root = out["root"]
        if args.json:
            print(json.dumps(out, default=str), flush=True)
        else:
            print(f"{root}: scanned {out['scanned_chunks']} chunks ({out['scanned_bytes']} bytes); evicted "
                  f"{out['evicted_chunks']} chunks ({out['evicted_bytes']} bytes) {out['reasons']}; "
                  f"now {out['usage_after']} bytes", flush=True)
        if args.period is None:
            return 0
        time.sleep(args.period)
