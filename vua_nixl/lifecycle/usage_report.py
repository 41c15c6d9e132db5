"""The `vua-nixl stats` audit view: what is stored, what is used, what was evicted or quarantined.

Built from the root alone (the compacted index plus not-yet-compacted access logs, a walk of
the block tree, the quarantine directory), so it shows the whole fleet's activity on a shared
root, not one process's. Reading it changes nothing on disk.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional, TextIO

from vua_nixl.audit import inventory
from vua_nixl.lifecycle.accesslog import iter_logs
from vua_nixl.lifecycle.index import COUNTER_NAMES, AccessIndex, load_current
from vua_nixl.paths import StorePaths
from vua_nixl.tables import print_table


@dataclass
class AuditReport:
    root: str
    chunks: int = 0
    bytes: int = 0
    temporaries: int = 0
    namespaces: list[dict[str, Any]] = field(default_factory=list)
    top_prefixes: list[dict[str, Any]] = field(default_factory=list)
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    access_logs: int = 0
    index_updated: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def top_prefixes(idx: AccessIndex, chunk_tokens: dict[str, Any], n: int = 10) -> list[dict[str, Any]]:
    """The most-hit prefixes. A chunk stands for the longest prefix with its hit count: it is
    skipped when one of its children has as many hits (that child is the same prefix, longer)."""
    rows: list[dict[str, Any]] = []
    for fp, blocks in idx.blocks.items():
        best_child: dict[bytes, int] = defaultdict(int)
        for _key, (_last, hits, parent) in blocks.items():
            if parent is not None:
                best_child[parent] = max(best_child[parent], int(hits))
        for key, (last, hits, _parent) in blocks.items():
            if hits <= 0 or best_child.get(key, -1) >= hits:
                continue
            depth = idx.depth(fp, key)
            ct = chunk_tokens.get(fp)
            rows.append({
                "namespace": fp, "key": key.hex(), "hits": int(hits), "last_access": float(last),
                "chunks": None if depth is None else depth + 1,
                "tokens": None if depth is None or ct is None else (depth + 1) * ct,
            })
    rows.sort(key=lambda r: (-r["hits"], -r["last_access"]))
    return rows[:n]


def audit(root: str | os.PathLike[str], top: int = 10) -> AuditReport:
    paths = StorePaths(root)
    inv = inventory(root)
    idx = load_current(root)
    rep = AuditReport(root=str(paths.root), chunks=inv.chunks, bytes=inv.bytes, temporaries=inv.temporaries)
    rep.index_updated = idx.updated
    rep.access_logs = sum(1 for _ in iter_logs(root))
    chunk_tokens: dict[str, Any] = {}
    seen = set()
    for usage in inv.namespaces:
        d = usage.description
        ct = d.get("chunk_tokens")  # descriptions are on a shared root: trust no type
        chunk_tokens[usage.fingerprint] = ct if isinstance(ct, int) and not isinstance(ct, bool) and ct > 0 else None
        c = idx.counters.get(usage.fingerprint, {})
        rep.namespaces.append({
            "namespace": usage.fingerprint, "model": d.get("model"), "dtype": d.get("dtype"),
            "tp": f"{d.get('tp_rank')}/{d.get('tp_size')}", "chunks": usage.chunks, "bytes": usage.bytes,
            **{name: int(c.get(name, 0)) for name in COUNTER_NAMES},
        })
        seen.add(usage.fingerprint)
    for fp, c in idx.counters.items():  # namespaces fully evicted still have history
        if fp not in seen:
            rep.namespaces.append({"namespace": fp, "model": None, "dtype": None, "tp": None, "chunks": 0, "bytes": 0,
                                   **{name: int(c.get(name, 0)) for name in COUNTER_NAMES}})
    rep.top_prefixes = top_prefixes(idx, chunk_tokens, top)
    if paths.quarantine.is_dir():
        for e in sorted(os.scandir(paths.quarantine), key=lambda e: e.name):
            try:
                st = e.stat()
            except FileNotFoundError:
                continue
            rep.quarantined.append({"file": e.name, "bytes": st.st_size, "when": st.st_mtime})
    return rep


def render(rep: AuditReport, file: Optional[TextIO] = None) -> None:
    """Plain tables for a terminal (see :mod:`vua_nixl.tables`)."""
    import time

    out = file or sys.stdout
    cols = ("namespace", "model", "dtype", "tp", "chunks", "MiB", "chunk hits", "misses", "MiB read",
            "written", "evicted", "deleted", "corrupt")
    rows: list[tuple[Any, ...]] = [(n["namespace"][:12], n["model"], n["dtype"], n["tp"], n["chunks"], f"{n['bytes'] / 2**20:.1f}",
             n["hits"], n["misses"], f"{n['bytes_read'] / 2**20:.1f}", n["chunks_written"], n["evictions"],
             n["deletes"], n["corrupt"]) for n in rep.namespaces]
    title = f"{rep.root}: {rep.chunks} chunks, {rep.bytes / 2**20:.1f} MiB, {rep.temporaries} temporaries"
    print_table(cols, rows, title, right=cols[3:], file=out)
    if rep.top_prefixes:
        now = time.time()
        rows = [(r["namespace"][:12], r["key"][:16], r["chunks"], r["tokens"], r["hits"],
                 f"{now - r['last_access']:.0f} s ago") for r in rep.top_prefixes]
        print(file=out)
        print_table(("namespace", "key", "chunks", "tokens", "hits", "last access"), rows, "top prefixes by hits", file=out)
    print(f"quarantined files: {len(rep.quarantined)}", file=out)
    for q in rep.quarantined[:20]:
        print(f"  {q['file']}  {q['bytes']} bytes", file=out)
    print(f"access logs pending compaction: {rep.access_logs}", file=out)
