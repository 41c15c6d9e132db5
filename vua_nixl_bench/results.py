"""Benchmark rows in nixlbench's columns, and their CSV / JSON / PNG / table renderings.

Every path (raw NIXL, the vua_nixl store, a real nixlbench binary) produces the same row type so
the three can be compared line by line; the store rows carry ``ratio`` = store bandwidth / raw
bandwidth at the same (block, batch) point of the same run, which is the number the issue's
target (>= 0.9 at >= 4 MiB chunks) is stated in.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

#: nixlbench's printed column titles, in its order.
NIXLBENCH_COLUMNS = (
    "Block Size (B)", "Batch Size", "B/W (GB/Sec)", "Avg Lat. (us)", "Avg Prep (us)", "P99 Prep (us)",
    "Avg Post (us)", "P99 Post (us)", "Avg Tx (us)", "P99 Tx (us)",
)


@dataclass
class LatencyStats:
    """avg / p99 of a list of microsecond samples (None when a path has no such phase)."""

    avg: Optional[float] = None
    p99: Optional[float] = None

    @classmethod
    def of(cls, samples_us: Sequence[float]) -> "LatencyStats":
        if not len(samples_us):
            return cls()
        a = np.asarray(samples_us, dtype=np.float64)
        return cls(float(a.mean()), float(np.percentile(a, 99)))


@dataclass
class BenchRow:
    """One (path, block, batch) measurement. Bandwidth is GB/s with GB = 1e9 bytes, as nixlbench."""

    path: str                 # "raw", "store", "nixlbench"
    op: str
    backend: str
    direct: bool
    block_size: int
    batch_size: int
    bw_gbps: float
    avg_lat_us: float
    prep: LatencyStats = field(default_factory=LatencyStats)
    post: LatencyStats = field(default_factory=LatencyStats)
    tx: LatencyStats = field(default_factory=LatencyStats)
    threads: int = 1
    iterations: int = 0       # timed iterations per thread
    total_bytes: int = 0
    total_s: float = 0.0
    verified: Optional[bool] = None   # None: not checked
    verify_detail: str = ""
    ratio: Optional[float] = None     # store rows: bw / raw bw at the same point
    ratio_newfile: Optional[float] = None  # store rows of WRITE runs: bw / raw-newfile bw
    ratio_nixlbench: Optional[float] = None  # store rows: bw / nixlbench bw at the same point
    note: str = ""

    def flat(self) -> dict[str, Any]:
        """A flat dict for CSV/JSON: nested latency stats become ``prep_avg_us`` etc."""
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, LatencyStats):
                d[f"{f.name}_avg_us"] = v.avg
                d[f"{f.name}_p99_us"] = v.p99
            else:
                d[f.name] = v
        return d

    def nixlbench_cells(self) -> list[str]:
        """The ten values in nixlbench's column order, formatted as it prints them."""
        def us(v: Optional[float]) -> str:
            return "-" if v is None else f"{v:.1f}"
        return [
            str(self.block_size), str(self.batch_size), f"{self.bw_gbps:.6f}", us(self.avg_lat_us),
            us(self.prep.avg), us(self.prep.p99), us(self.post.avg), us(self.post.p99),
            us(self.tx.avg), us(self.tx.p99),
        ]


def attach_ratios(rows: list[BenchRow]) -> None:
    """Set ``ratio`` on store (and nixlbench) rows against the raw row at the same point."""
    raw = {(r.block_size, r.batch_size): r for r in rows if r.path == "raw"}
    newfile = {(r.block_size, r.batch_size): r for r in rows if r.path == "raw-newfile"}
    nixl = {(r.block_size, r.batch_size): r for r in rows if r.path == "nixlbench"}
    for r in rows:
        if r.path == "raw":
            r.ratio = 1.0
            continue
        nf = newfile.get((r.block_size, r.batch_size))
        if r.path == "store" and nf and nf.bw_gbps > 0:
            r.ratio_newfile = r.bw_gbps / nf.bw_gbps
        base = raw.get((r.block_size, r.batch_size))
        if base and base.bw_gbps > 0:
            r.ratio = r.bw_gbps / base.bw_gbps
        nb = nixl.get((r.block_size, r.batch_size))
        if r.path == "store" and nb and nb.bw_gbps > 0:
            r.ratio_nixlbench = r.bw_gbps / nb.bw_gbps


def parse_nixlbench_output(text: str) -> list[dict[str, float]]:
    """Rows of nixlbench's stats table from its stdout.

    A row is a line of 10 numbers (single process) or 12 (multi-rank pairwise, with aggregate
    bandwidth and network utilisation inserted after B/W); everything else (config dump,
    separators, warnings) is skipped.
    """
    out = []
    for line in text.splitlines():
        toks = line.split()
        if len(toks) not in (10, 12) or not re.fullmatch(r"\d+", toks[0]):
            continue
        try:
            nums = [float(t) for t in toks]
        except ValueError:
            continue
        if len(nums) == 12:
            nums = nums[:3] + nums[5:]
        keys = ("block_size", "batch_size", "bw_gbps", "avg_lat_us", "prep_avg", "prep_p99",
                "post_avg", "post_p99", "tx_avg", "tx_p99")
        out.append(dict(zip(keys, nums)))
    return out


def write_csv(rows: Iterable[BenchRow], path: Path) -> None:
    rows = list(rows)
    if not rows:
        return
    flat = [r.flat() for r in rows]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(flat[0]))
        w.writeheader()
        w.writerows(flat)


def write_json(rows: Iterable[BenchRow], path: Path, meta: dict[str, Any]) -> None:
    payload = {"meta": meta, "rows": [r.flat() for r in rows]}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def write_chart(rows: Sequence[BenchRow], path: Path, title: str) -> bool:
    """Bandwidth vs block size, one line per (path, batch). Returns False if matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # pragma: no cover - matplotlib is a declared dependency
        log.warning("no chart: matplotlib unavailable (%s)", exc)
        return False
    fig, ax = plt.subplots(figsize=(8, 4.8))
    styles = {"raw": "-o", "raw-newfile": "-.d", "store": "--s", "nixlbench": ":^"}
    series: dict[tuple[str, int], list[BenchRow]] = {}
    for r in rows:
        series.setdefault((r.path, r.batch_size), []).append(r)
    for (p, batch), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r.block_size)
        ax.plot([r.block_size for r in rs], [r.bw_gbps for r in rs], styles.get(p, "-x"),
                label=f"{p} (batch {batch})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block size (bytes)")
    ax.set_ylabel("bandwidth (GB/s, 1e9)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render_table(rows: Sequence[BenchRow], title: str = "") -> Any:
    """A rich Table: path, nixlbench's ten columns, store/raw ratio and the verification result."""
    from rich.table import Table

    table = Table(title=title or None, show_lines=False)
    table.add_column("Path")
    for c in NIXLBENCH_COLUMNS:
        table.add_column(c, justify="right")
    for c in RATIO_COLUMNS:
        table.add_column(c, justify="right")
    table.add_column("Verified")
    for r in rows:
        ver = {None: "-", True: "ok", False: "FAIL"}[r.verified]
        table.add_row(r.path, *r.nixlbench_cells(), *ratio_cells(r), ver)
    return table


#: what each ratio column divides: which row it is printed on / its baseline.
RATIO_COLUMNS = ("store/raw", "store/nixlbench", "nixlbench/raw")


def ratio_cells(r: BenchRow) -> list[str]:
    """The three ratio cells of a row (empty where the ratio does not apply to its path)."""
    def f(v: Optional[float]) -> str:
        return "" if v is None else f"{v:.3f}"
    return [f(r.ratio) if r.path == "store" else "", f(r.ratio_nixlbench) if r.path == "store" else "",
            f(r.ratio) if r.path == "nixlbench" else ""]


def row_from_nixlbench(d: dict[str, float], op: str, backend: str, direct: bool) -> BenchRow:
    def ls(a: float, p: float) -> LatencyStats:
        return LatencyStats(a, p)
    return BenchRow(
        path="nixlbench", op=op, backend=backend, direct=direct, block_size=int(d["block_size"]),
        batch_size=int(d["batch_size"]), bw_gbps=d["bw_gbps"], avg_lat_us=d["avg_lat_us"],
        prep=ls(d["prep_avg"], d["prep_p99"]), post=ls(d["post_avg"], d["post_p99"]),
        tx=ls(d["tx_avg"], d["tx_p99"]),
    )


__all__ = [
    "BenchRow", "LatencyStats", "NIXLBENCH_COLUMNS", "RATIO_COLUMNS", "attach_ratios", "ratio_cells", "parse_nixlbench_output",
    "render_table", "row_from_nixlbench", "write_chart", "write_csv", "write_json",
]


def load_line(before: Sequence[float], after: Sequence[float]) -> str:
    """The host's load around a benchmark run, as every benchmark table reports it."""
    import os

    return (f"load average before {before[0]:.2f} / {before[1]:.2f}, after {after[0]:.2f} / {after[1]:.2f} "
            f"(1 / 5 min), {os.cpu_count()} CPUs")
