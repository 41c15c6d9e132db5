"""`vua-nixl info | ls | stats | verify | gc`: what an operator runs against a store root.

`stats` and `gc` are built on vua_nixl.lifecycle (audit view, pruner)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from typing import Any

from vua_nixl.agent import NixlAgent, nixl_version
from vua_nixl.audit import gc_temporaries, inventory, verify
from vua_nixl.config import StoreConfig, add_config_flags, config_from_args
from vua_nixl.lifecycle.prune_cli import add_limit_args, run_prune, writable_root
from vua_nixl.paths import StorePaths
from vua_nixl.tables import print_table

log = logging.getLogger(__name__)

#: Exit code when data of a newer format was found and left untouched.
EXIT_NEWER = 3
#: StoreConfig fields that choose and tune the NIXL agent (info, verify).
AGENT_FIELDS = ("backend", "posix_io", "direct_io", "transfer_timeout_s")


def _root_arg(p: argparse.ArgumentParser) -> None:
    add_config_flags(p, StoreConfig, ["root"])
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _config(args: argparse.Namespace) -> StoreConfig:
    return config_from_args(StoreConfig, args)


def make_agent(cfg: StoreConfig, probe_dir: str | os.PathLike[str]) -> NixlAgent:
    """The agent every command builds from one config (so VUA_NIXL_BACKEND etc. reach it).

    The backend probe writes a small file; on a root this process cannot write (a read-only
    mount, an auditor's account) it probes in a private temporary directory instead, so
    read-only commands work there."""
    if os.access(probe_dir, os.W_OK | os.X_OK):
        return NixlAgent.from_config(cfg, probe_dir)
    with tempfile.TemporaryDirectory(prefix="vua-nixl-probe-") as private:
        return NixlAgent.from_config(cfg, private)


def register(sub: Any) -> None:
    p = sub.add_parser("info", help="NIXL version, plugins, and which backend `auto` picks and why")
    _root_arg(p)
    add_config_flags(p, StoreConfig, AGENT_FIELDS)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("ls", help="namespaces, chunks and bytes under a root")
    _root_arg(p)
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("stats", help="audit view: usage, hits/misses/bytes per namespace, top prefixes, evictions, quarantine")
    _root_arg(p)
    p.add_argument("--top", type=int, default=10, help="how many top prefixes by hits to show")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("verify", help="re-check every block's header, key and checksum")
    _root_arg(p)
    add_config_flags(p, StoreConfig, AGENT_FIELDS)
    p.add_argument("--remove", action="store_true", help="move bad blocks to quarantine/")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("gc", help="remove stale temporaries (and, with limits, evict)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_limit_args(p)
    p.set_defaults(func=cmd_gc)


def cmd_info(args: argparse.Namespace) -> int:
    cfg = _config(args)
    probe = StorePaths(cfg.root)
    probe.ensure()
    agent = make_agent(cfg, probe.tmp)
    try:
        info = agent.info()
    finally:
        agent.close()
    info["probe_dir"] = str(probe.tmp)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"NIXL {nixl_version()}  plugins: {', '.join(info['plugins'])}")
    engine = f" ({info['engine']})" if info["engine"] else ""
    print(f"selected backend: {info['backend']}{engine}  memory: {', '.join(info['mem_types'])}")
    for r in info["rejected"]:
        print(f"  rejected {r['backend']}: {r['reason']}")
    print(f"probe directory: {probe.tmp}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    inv = inventory(_config(args).root)
    if args.json:
        print(json.dumps({
            "root": inv.root, "chunks": inv.chunks, "bytes": inv.bytes, "temporaries": inv.temporaries,
            "quarantined": inv.quarantined, "pooled": inv.pooled, "pooled_bytes": inv.pooled_bytes,
            "namespaces": [{"fingerprint": n.fingerprint, "chunks": n.chunks, "bytes": n.bytes, **n.description} for n in inv.namespaces],
        }, indent=2, default=str))
        return 0
    rows = []
    for n in inv.namespaces:
        d = n.description
        raw_layout = d.get("layout")
        lay = raw_layout if isinstance(raw_layout, dict) else {}
        rows.append((
            n.fingerprint[:12], d.get("model"), d.get("dtype"),
            f"L{lay.get('num_layers')} H{lay.get('kv_heads')} D{lay.get('head_dim')}{' MLA' if lay.get('mla') else ''}",
            f"{d.get('tp_rank')}/{d.get('tp_size')}", d.get("chunk_tokens"), n.chunks, f"{n.bytes / 2**20:.1f}",
        ))
    print_table(("namespace", "model", "dtype", "layout", "tp", "chunk", "chunks", "MiB"), rows,
                f"{inv.root}: {inv.chunks} chunks, {inv.bytes / 2**20:.1f} MiB", right=("chunk", "chunks", "MiB"))
    print(f"temporaries: {inv.temporaries} ({inv.temporary_bytes} bytes), quarantined: {inv.quarantined}, "
          f"recycle pool: {inv.pooled} ({inv.pooled_bytes} bytes)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    cfg = _config(args)
    paths = StorePaths(cfg.root)
    paths.check_readable()
    if args.remove:
        writable_root(cfg, "verify --remove")
    if cfg.backend == "auto":  # verify reads into host memory: no GDS probe, no CUDA context
        cfg = cfg.model_copy(update={"backend": "POSIX"})
    agent = make_agent(cfg, paths.tmp if paths.tmp.is_dir() else paths.root)
    try:
        checked, bad = verify(cfg.root, agent=agent, remove=args.remove)
    finally:
        agent.close()
    newer = [b for b in bad if b.newer]
    bad = [b for b in bad if not b.newer]
    if args.json:
        print(json.dumps({"checked": checked, "bad": [{"path": b.path, "reason": b.reason} for b in bad],
                          "newer": [{"path": b.path, "reason": b.reason} for b in newer], "removed": args.remove}, indent=2))
    else:
        for b in bad:
            print(f"BAD {b.path}: {b.reason}")
        for b in newer:
            print(f"NEWER {b.path}: {b.reason} (left untouched)")
        print(f"{checked} blocks checked, {len(bad)} bad{' (quarantined)' if args.remove and bad else ''}"
              + (f", {len(newer)} of a newer format (upgrade vua-nixl to check them)" if newer else ""))
    if bad and not args.remove:
        return 1
    return EXIT_NEWER if newer else 0


def cmd_stats(args: argparse.Namespace) -> int:
    from vua_nixl.lifecycle.usage_report import audit, render

    rep = audit(_config(args).root, top=args.top)
    if args.json:
        print(json.dumps(rep.as_dict(), indent=2, default=str))
    else:
        render(rep)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    cfg = _config(args)
    writable_root(cfg, "gc")
    removed, nbytes = gc_temporaries(cfg.root, cfg.tmp_max_age_s)
    pruned = None
    if cfg.max_bytes is not None or cfg.max_age_s is not None:
        pruned = run_prune(args)
    if args.json:
        print(json.dumps({"temporaries_removed": removed, "bytes": nbytes, "pruned": pruned}, default=str))
    else:
        print(f"removed {removed} stale temporaries ({nbytes} bytes)")
        if pruned is not None:
            print(f"evicted {pruned['evicted_chunks']} chunks ({pruned['evicted_bytes']} bytes) {pruned['reasons']}; "
                  f"{pruned['usage_after']} bytes of blocks remain (policy {pruned['policy']})")
    return 0
