"""``vua-nixl bench storage``: one nixlbench config, three paths, one table.

For every (block, batch) point of the config the raw NIXL run and the store run are measured
back to back (interleaved, so a noisy shared disk drifts the same way for both and the ratio is
taken "in the same run"); a ``nixlbench`` binary on PATH is then run on the same file with the
same settings and its printed rows are added. Results go to CSV, JSON and a PNG chart.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .flags import FLAGS_SOURCE
from .nbconfig import NixlbenchConfig, format_bytes
from .raw import BackendUnavailable, RawNixlBench, RunOptions
from .results import (
    BenchRow,
    attach_ratios,
    parse_nixlbench_output,
    row_from_nixlbench,
    write_chart,
    write_csv,
    write_json,
)
from .store_bench import StoreBench

log = logging.getLogger(__name__)


@dataclass
class StorageBenchResult:
    rows: list[BenchRow]
    meta: dict[str, Any]
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def all_verified(self) -> bool:
        return all(r.verified is not False for r in self.rows)


def default_max_memory() -> int:
    """40% of available memory, at most 8 GiB: leaves room for the page cache and other users."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    return min(8 << 30, int(avail * 0.4))
    except OSError:
        pass
    return 4 << 30


def resolve_directory(cfg: NixlbenchConfig, directory: Optional[str]) -> Path:
    """--dir, else the config's ``filepath`` when it exists here, else a fresh temp dir."""
    if directory:
        return Path(directory)
    fp = str(cfg["filepath"] or "")
    if fp and Path(fp).is_dir():
        return Path(fp)
    if fp:
        log.warning("config filepath %s does not exist on this host; using a temporary directory "
                    "(pass --dir to choose)", fp)
    return Path(tempfile.mkdtemp(prefix="vua-bench-", dir=os.environ.get("TMPDIR", "/tmp")))


def run_nixlbench_binary(binary: str, cfg: NixlbenchConfig, directory: Path, backend: str,
                         timeout_s: float = 3600.0) -> tuple[list[BenchRow], str]:
    """Run a real nixlbench on the same config and directory; return its rows and raw output.

    The config is passed as ``--config_file`` with ``--filepath`` (and a fallen-back backend)
    as command-line overrides, which take precedence in nixlbench exactly as documented.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(cfg.to_toml())
        toml_path = f.name
    overrides: dict[str, Any] = {"filepath": str(directory)}
    if backend != cfg.backend:
        overrides["backend"] = backend
    cmd = cfg.command_line(binary, config_file=toml_path, overrides=overrides).split()
    log.info("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    finally:
        os.unlink(toml_path)
        for p in directory.glob(f"nixlbench_{backend.lower()}_test_file_*"):
            p.unlink(missing_ok=True)  # a WRITE file left behind fails the next READ's check
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        log.error("nixlbench exited with %d; last output:\n%s", proc.returncode, out[-2000:])
    rows = [row_from_nixlbench(d, cfg.op, backend, cfg.direct) for d in parse_nixlbench_output(proc.stdout)]
    for r in rows:
        r.threads = cfg.num_threads
        r.verified = None if not cfg["check_consistency"] else proc.returncode == 0
    return rows, out


def run_storage_bench(
    cfg: NixlbenchConfig,
    opts: RunOptions,
    *,
    raw: bool = True,
    store: bool = True,
    nixlbench: Optional[str] = "auto",
    layout_mode: str = "model",
    chunk_tokens: int = 256,
    verify_checksums: bool = True,
    repeat: int = 1,
    raw_new_files: bool = False,
) -> StorageBenchResult:
    """Run the config's matrix through raw NIXL and the store (and nixlbench if available).

    ``repeat`` > 1 measures each point that many times, alternating which path goes first, and
    keeps each path's median-bandwidth row: on a shared disk a single short run can swing by 2x,
    and alternating keeps slow phases from landing on one path only.
    """
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    errs = cfg.validate()
    if errs:
        raise ValueError("nixlbench would reject this config: " + "; ".join(errs))
    rows: list[BenchRow] = []
    started = _dt.datetime.now(_dt.timezone.utc)
    rawb = RawNixlBench(cfg, opts) if raw else None
    backend = rawb.backend if rawb else cfg.backend
    if not rawb and backend in ("GDS", "GDS_MT") and opts.fallback and not _gds_usable():
        backend = "POSIX"
        cfg.update({"posix_api_type": opts.fallback_posix_api})
        opts.notes.append(f"FALLBACK: {cfg.backend} unavailable; store runs POSIX/{opts.fallback_posix_api}")
    storeb = StoreBench(cfg, opts, backend, layout_mode, chunk_tokens, verify_checksums) if store else None
    try:
        k = 0
        for block, batch in cfg.matrix():
            runs: dict[str, list[BenchRow]] = {"raw": [], "raw-newfile": [], "store": []}
            for rep in range(repeat):
                order: list[tuple[str, Any]] = [("raw", rawb), ("store", storeb)]
                if raw_new_files and rawb and cfg.op == "WRITE":
                    order.insert(1, ("raw-newfile", rawb))
                if rep % 2:
                    order.reverse()
                for name, bench in order:
                    if bench is None:
                        continue
                    if name == "raw-newfile":
                        row = bench.run_point_new_files(block, batch, k)
                    else:
                        row = bench.run_point(block, batch, k)
                    k += 1
                    runs[name].append(row)
                    log.info("%-5s block=%s batch=%d: %.3f GB/s verified=%s", name, format_bytes(block), batch,
                             row.bw_gbps, row.verified)
            for name in ("raw", "raw-newfile", "store"):
                if runs[name]:
                    rows.append(_median_row(runs[name]))
    finally:
        if rawb:
            rawb.close()
        if storeb:
            storeb.close()
    nb_output = ""
    if nixlbench:
        binary = shutil.which("nixlbench") if nixlbench == "auto" else nixlbench
        if binary:
            nb_rows, nb_output = run_nixlbench_binary(binary, cfg, opts.directory, backend)
            rows.extend(nb_rows)
        elif nixlbench != "auto":
            raise FileNotFoundError(f"nixlbench binary {nixlbench} not found")
        else:
            log.info("no nixlbench binary on PATH: raw and store rows only")
    attach_ratios(rows)
    rows.sort(key=lambda r: (r.block_size, r.batch_size, {"raw": 0, "raw-newfile": 1, "store": 2, "nixlbench": 3}.get(r.path, 3)))
    meta = {
        "config": str(cfg.source) if cfg.source else None,
        "config_values": dict(cfg.explicit),
        "backend_run": backend,
        "op": cfg.op,
        "direct": cfg.direct,
        "directory": str(opts.directory),
        "notes": list(opts.notes),
        "store_layout": layout_mode,
        "store_verify_checksums": verify_checksums,
        "repeat": repeat,
        "raw_new_files": raw_new_files,
        "started_utc": started.isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "nixl_version": _nixl_version(),
        "flags_source": FLAGS_SOURCE,
        "nixlbench_output_tail": nb_output[-4000:] if nb_output else None,
    }
    return StorageBenchResult(rows, meta)


def _median_row(rows: list[BenchRow]) -> BenchRow:
    """The median-bandwidth row of repeated runs; verified only if every repetition verified."""
    if len(rows) == 1:
        return rows[0]
    ordered = sorted(rows, key=lambda r: r.bw_gbps)
    med = ordered[(len(ordered) - 1) // 2]
    bad = [r for r in rows if r.verified is False]
    if bad:
        med.verified = False
        med.verify_detail = "; ".join(r.verify_detail for r in bad)
    spread = f"median of {len(rows)}: {ordered[0].bw_gbps:.3f}..{ordered[-1].bw_gbps:.3f} GB/s"
    med.note = f"{med.note}; {spread}" if med.note else spread
    return med


def write_outputs(result: StorageBenchResult, prefix: Path, title: str) -> dict[str, str]:
    """``<prefix>.csv``, ``<prefix>.json`` and ``<prefix>.png``."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    out = {"csv": str(prefix.with_suffix(".csv")), "json": str(prefix.with_suffix(".json"))}
    write_csv(result.rows, Path(out["csv"]))
    write_json(result.rows, Path(out["json"]), result.meta)
    png = prefix.with_suffix(".png")
    if write_chart(result.rows, png, title):
        out["png"] = str(png)
    result.outputs = out
    return out


def _gds_usable() -> bool:
    from .raw import cuda_available

    return cuda_available()


def _nixl_version() -> str:
    try:
        from importlib.metadata import version

        return version("nixl")
    except Exception:
        return "unknown"


__all__ = ["BackendUnavailable", "StorageBenchResult", "run_storage_bench", "write_outputs",
           "default_max_memory", "resolve_directory", "run_nixlbench_binary"]
