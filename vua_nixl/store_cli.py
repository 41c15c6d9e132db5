"""`vua-nixl info | ls | stats | verify | gc`: what an operator runs against a store root.

`stats` and `gc` are built on vua_nixl.lifecycle (audit view, pruner)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from vua_nixl.agent import NixlAgent, nixl_version
from vua_nixl.audit import gc_temporaries, inventory, verify
from vua_nixl.config import StoreConfig
from vua_nixl.lifecycle.cli import add_limit_args, run_prune
from vua_nixl.paths import StorePaths


def _root_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=None, help="store root (default: $VUA_NIXL_ROOT or ~/.cache/vua-nixl/store)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _root(args: argparse.Namespace) -> str:
    return os.fspath(args.root or StoreConfig().root)


def register(sub: Any) -> None:
    p = sub.add_parser("info", help="NIXL version, plugins, and which backend `auto` picks and why")
    p.add_argument("--root", default=None, help="directory to probe I/O in (default: the store root)")
    p.add_argument("--backend", default=None, help="probe this backend instead of auto")
    p.add_argument("--json", action="store_true")
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
    p.add_argument("--remove", action="store_true", help="move bad blocks to quarantine/")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("gc", help="remove stale temporaries (and, with limits, evict)")
    _root_arg(p)
    p.add_argument("--tmp-max-age", type=float, default=None, help="seconds after which a temp file is stale")
    add_limit_args(p)
    p.set_defaults(func=cmd_gc)


def cmd_info(args: argparse.Namespace) -> int:
    cfg = StoreConfig()
    probe = StorePaths(args.root or cfg.root)
    probe.ensure()
    agent = NixlAgent(args.backend or cfg.backend, posix_io=cfg.posix_io, probe_dir=probe.tmp, direct_io=cfg.direct_io)
    info = agent.info()
    agent.close()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    con = Console()
    con.print(f"NIXL {nixl_version()}  plugins: {', '.join(info['plugins'])}")
    engine = f" ({info['engine']})" if info["engine"] else ""
    con.print(f"[bold]selected backend:[/bold] {info['backend']}{engine}  memory: {', '.join(info['mem_types'])}")
    for r in info["rejected"]:
        con.print(f"  rejected {r['backend']}: {r['reason']}")
    con.print(f"probe directory: {probe.tmp}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    root = _root(args)
    with tqdm(desc="scanning", unit=" blocks", disable=args.json, leave=False) as bar:
        inv = inventory(root, progress=bar.update)
    if args.json:
        print(json.dumps({
            "root": inv.root, "chunks": inv.chunks, "bytes": inv.bytes, "temporaries": inv.temporaries,
            "quarantined": inv.quarantined,
            "namespaces": [{"fingerprint": n.fingerprint, "chunks": n.chunks, "bytes": n.bytes, **n.description} for n in inv.namespaces],
        }, indent=2, default=str))
        return 0
    table = Table(title=f"{inv.root}: {inv.chunks} chunks, {inv.bytes / 2**20:.1f} MiB")
    for col in ("namespace", "model", "dtype", "layout", "tp", "chunk", "chunks", "MiB"):
        table.add_column(col)
    for n in inv.namespaces:
        d = n.description
        lay = d.get("layout", {})
        table.add_row(
            n.fingerprint[:12], str(d.get("model")), str(d.get("dtype")),
            f"L{lay.get('num_layers')} H{lay.get('kv_heads')} D{lay.get('head_dim')}{' MLA' if lay.get('mla') else ''}",
            f"{d.get('tp_rank')}/{d.get('tp_size')}", str(d.get("chunk_tokens")), str(n.chunks), f"{n.bytes / 2**20:.1f}",
        )
    Console().print(table)
    print(f"temporaries: {inv.temporaries} ({inv.temporary_bytes} bytes), quarantined: {inv.quarantined}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    root = _root(args)
    with tqdm(desc="verifying", unit=" blocks", disable=args.json) as bar:
        checked, bad = verify(root, remove=args.remove, progress=bar.update)
    if args.json:
        print(json.dumps({"checked": checked, "bad": [b.__dict__ for b in bad], "removed": args.remove}, indent=2))
    else:
        for b in bad:
            print(f"BAD {b.path}: {b.reason}")
        print(f"{checked} blocks checked, {len(bad)} bad{' (quarantined)' if args.remove and bad else ''}")
    return 1 if bad and not args.remove else 0


def cmd_stats(args: argparse.Namespace) -> int:
    from vua_nixl.lifecycle.audit import audit, render

    rep = audit(_root(args), top=args.top)
    if args.json:
        print(json.dumps(rep.as_dict(), indent=2, default=str))
    else:
        render(rep)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    cfg = StoreConfig()
    root = _root(args)
    removed, nbytes = gc_temporaries(root, args.tmp_max_age if args.tmp_max_age is not None else cfg.tmp_max_age_s)
    pruned = None
    if args.max_bytes is not None or args.max_age is not None or cfg.max_bytes is not None or cfg.max_age_s is not None:
        pruned = run_prune(root, args)
    if args.json:
        print(json.dumps({"temporaries_removed": removed, "bytes": nbytes, "pruned": pruned}, default=str))
    else:
        print(f"removed {removed} stale temporaries ({nbytes} bytes)")
        if pruned is not None:
            print(f"evicted {pruned['evicted_chunks']} chunks ({pruned['evicted_bytes']} bytes) {pruned['reasons']}; "
                  f"{pruned['usage_after']} bytes of blocks remain (policy {pruned['policy']})")
    return 0
