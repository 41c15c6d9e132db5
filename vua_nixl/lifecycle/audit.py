"""The `vua-nixl stats` audit view: what is stored, what is used, what was evicted or quarantined.

Built from the root alone (the compacted index plus not-yet-compacted access logs, a walk of
the block tree, the quarantine directory), so it shows the whole fleet's activity on a shared
root, not one process's. Reading it changes nothing on disk.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

from vua_nixl.audit import inventory
from vua_nixl.lifecycle.accesslog import iter_logs
from vua_nixl.lifecycle.index import COUNTER_NAMES, AccessIndex, load_current
from vua_nixl.paths import StorePaths


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


def top_prefixes(idx: AccessIndex, chunk_tokens: dict[str, int], n: int = 10) -> list[dict[str, Any]]:
    """The most-hit prefixes. A chunk stands for the longest prefix with its hit count: it is
    skipped when one of its children has as many hits (that child is the same prefix, longer)."""
    rows = []
    for fp, blocks in idx.blocks.items():
        best_child: dict[bytes, int] = defaultdict(int)
        for key, (last, hits, parent) in blocks.items():
            if parent is not None:
                best_child[parent] = max(best_child[parent], int(hits))
        for key, (last, hits, parent) in blocks.items():
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
    chunk_tokens: dict[str, int] = {}
    seen = set()
    for usage in inv.namespaces:
        d = usage.description
        chunk_tokens[usage.fingerprint] = d.get("chunk_tokens")
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


def render(rep: AuditReport, console: Optional[Any] = None) -> None:
    """Rich tables for a terminal."""
    import time

    from rich.console import Console
    from rich.table import Table

    con = console or Console(width=None if Console().is_terminal else 160)
    t = Table(title=f"{rep.root}: {rep.chunks} chunks, {rep.bytes / 2**20:.1f} MiB, {rep.temporaries} temporaries")
    for col in ("namespace", "model", "dtype", "tp", "chunks", "MiB", "chunk hits", "misses", "MiB read",
                "written", "evicted", "deleted", "corrupt"):
        t.add_column(col, justify="right" if col not in ("namespace", "model", "dtype") else "left")
    for n in rep.namespaces:
        t.add_row(n["namespace"][:12], str(n["model"]), str(n["dtype"]), str(n["tp"]), str(n["chunks"]),
                  f"{n['bytes'] / 2**20:.1f}", str(n["hits"]), str(n["misses"]), f"{n['bytes_read'] / 2**20:.1f}",
                  str(n["chunks_written"]), str(n["evictions"]), str(n["deletes"]), str(n["corrupt"]))
    con.print(t)
    if rep.top_prefixes:
        t = Table(title="top prefixes by hits")
        for col in ("namespace", "key", "chunks", "tokens", "hits", "last access"):
            t.add_column(col)
        now = time.time()
        for r in rep.top_prefixes:
            t.add_row(r["namespace"][:12], r["key"][:16], str(r["chunks"]), str(r["tokens"]), str(r["hits"]),
                      f"{now - r['last_access']:.0f} s ago")
        con.print(t)
    con.print(f"quarantined files: {len(rep.quarantined)}")
    for q in rep.quarantined[:20]:
        con.print(f"  {q['file']}  {q['bytes']} bytes")
    con.print(f"access logs pending compaction: {rep.access_logs}")
