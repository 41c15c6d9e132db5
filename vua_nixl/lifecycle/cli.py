"""`vua-nixl prune`: run the pruner once or periodically against a store root.

``vua-nixl gc --max-bytes/--max-age`` (in store_cli) and ``vua-nixl stats`` use the helpers
here too, so the three commands agree on how limits are parsed and reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from typing import Any, Optional

from vua_nixl.config import StoreConfig

log = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000**4, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'500G', '1.5TiB', '1000000' -> bytes (K/M/G/T alone are binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 500G, 1.5TiB, 1000000)")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def add_limit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-bytes", type=parse_size, default=None, help="evict down to this size (e.g. 500G)")
    p.add_argument("--max-age", type=float, default=None, help="evict chunks not accessed for this many seconds")
    p.add_argument("--policy", choices=("lru", "lfu", "ttl"), default=None, help="eviction order (default: config, lru)")
    p.add_argument("--low-water", type=float, default=0.9, help="when over --max-bytes, evict down to this fraction of it")


def run_prune(root: str, args: argparse.Namespace) -> Optional[dict[str, Any]]:
    """One pruning round from CLI arguments (limits fall back to VUA_NIXL_* config)."""
    from vua_nixl.lifecycle.evict import Pruner

    cfg = StoreConfig()
    max_bytes = args.max_bytes if args.max_bytes is not None else cfg.max_bytes
    max_age = args.max_age if args.max_age is not None else cfg.max_age_s
    policy = args.policy or cfg.eviction
    if policy == "ttl" and max_age is None:
        raise SystemExit("--policy ttl needs --max-age")
    pruner = Pruner(root, max_bytes=max_bytes, policy=policy, max_age_s=max_age, low_water=args.low_water)
    rep = pruner.run_once()
    return {"max_bytes": max_bytes, "max_age_s": max_age, "policy": policy, **rep.as_dict()}


def register(sub: Any) -> None:
    p = sub.add_parser("prune", help="compact access logs and evict by policy (once, or every --period seconds)")
    p.add_argument("--root", default=None, help="store root (default: $VUA_NIXL_ROOT)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_limit_args(p)
    p.add_argument("--period", type=float, default=None, help="keep running, one round every PERIOD seconds")
    p.set_defaults(func=cmd_prune)


def cmd_prune(args: argparse.Namespace) -> int:
    root = os.fspath(args.root or StoreConfig().root)
    while True:
        out = run_prune(root, args)
        if args.json:
            print(json.dumps(out, default=str), flush=True)
        else:
            print(f"{root}: scanned {out['scanned_chunks']} chunks ({out['scanned_bytes']} bytes); evicted "
                  f"{out['evicted_chunks']} chunks ({out['evicted_bytes']} bytes) {out['reasons']}; "
                  f"now {out['usage_after']} bytes", flush=True)
        if args.period is None:
            return 0
        time.sleep(args.period)
