"""``vua-nixl bench storage``: one nixlbench config, three paths, one table.

For every (block, batch) point of the config the raw NIXL run and the store run are measured
back to back (interleaved, so a noisy shared disk drifts the same way for both and the ratio is
taken "in the same run"); a ``nixlbench`` binary on PATH is then run on the same file with the
same settings, for the same point, in the same round-robin (``--repeat`` times), and its rows are
added. A nixlbench run that fails is a failure of the whole command. Results go to CSV, JSON
(with every nixlbench run's full output) and a PNG chart.
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
    #: runs that failed outright (a nixlbench exit status other than 0, no result rows)
    failures: list[str] = field(default_factory=list)

    @property
    def all_verified(self) -> bool:
        return all(r.verified is not False for r in self.rows)

    @property
    def ok(self) -> bool:
        return self.all_verified and not self.failures


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


def remove_nixlbench_files(directory: Path, backend: str) -> list[Path]:
    """Delete nixlbench test files in ``directory`` (a WRITE leaves one that fails the next READ's
    consistency check); return what was removed."""
    gone = []
    for p in directory.glob(f"nixlbench_{backend.lower()}_test_file_*"):
        p.unlink(missing_ok=True)
        gone.append(p)
    return gone


@dataclass
class NixlbenchRun:
    """One nixlbench invocation: its rows, exit status and complete output."""

    rows: list[BenchRow]
    returncode: int
    output: str
    command: str

    @property
    def failed(self) -> bool:
        return self.returncode != 0 or not self.rows


def run_nixlbench_binary(binary: str, cfg: NixlbenchConfig, directory: Path, backend: str,
                         timeout_s: float = 3600.0, point: Optional[tuple[int, int]] = None) -> NixlbenchRun:
    """Run a real nixlbench on the same config and directory (one (block, batch) ``point`` of it,
    or its whole matrix); return its rows, exit status and full output.

    The config is passed as ``--config_file`` with ``--filepath`` (and a fallen-back backend,
    and the point) as command-line overrides, which take precedence in nixlbench exactly as
    documented. Stale test files are removed before and after the run.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(cfg.to_toml())
        toml_path = f.name
    overrides: dict[str, Any] = {"filepath": str(directory)}
    if backend != cfg.backend:
        overrides["backend"] = backend
    if point is not None:
        block, batch = point
        overrides.update(start_block_size=block, max_block_size=block, start_batch_size=batch, max_batch_size=batch)
    cmd = cfg.command_line(binary, config_file=toml_path, overrides=overrides).split()
    log.info("running %s", " ".join(cmd))
    stale = remove_nixlbench_files(directory, backend)
    if stale:
        log.info("removed %d stale nixlbench test file(s) before the run", len(stale))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        rc, stdout, out = proc.returncode, proc.stdout, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, stdout = 124, ""
        parts = [p.decode(errors="replace") if isinstance(p, bytes) else (p or "") for p in (exc.stdout, exc.stderr)]
        out = "".join(parts) + f"\nnixlbench timed out after {timeout_s:g} s"
    finally:
        os.unlink(toml_path)
        remove_nixlbench_files(directory, backend)
    rows = [row_from_nixlbench(d, cfg.op, backend, cfg.direct) for d in parse_nixlbench_output(stdout)]
    if rc != 0:
        log.error("nixlbench exited with %d; output:\n%s", rc, out)
    elif not rows:
        log.error("nixlbench printed no result rows; output:\n%s", out)
    for r in rows:
        r.threads = cfg.num_threads
        r.verified = None if not cfg["check_consistency"] else rc == 0
        if rc != 0:
            r.verified = False
            r.verify_detail = f"nixlbench exit status {rc}"
    return NixlbenchRun(rows, rc, out, " ".join(cmd))


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
    model: Any = None,
    tp: int = 1,
    recycle: bool = False,
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
    storeb = StoreBench(cfg, opts, backend, layout_mode, chunk_tokens, verify_checksums, model, tp, recycle) if store else None
    binary: Optional[str] = None
    if nixlbench:
        binary = shutil.which("nixlbench") if nixlbench == "auto" else (shutil.which(nixlbench) or nixlbench)
        if nixlbench != "auto" and not (binary and Path(binary).exists()):
            raise FileNotFoundError(f"nixlbench binary {nixlbench} not found")
        if not binary:
            log.info("no nixlbench binary on PATH: raw and store rows only")
    nb_runs: list[NixlbenchRun] = []
    failures: list[str] = []
    try:
        k = 0
        for block, batch in cfg.matrix():
            runs: dict[str, list[BenchRow]] = {"raw": [], "raw-newfile": [], "store": [], "nixlbench": []}
            for rep in range(repeat):
                order: list[tuple[str, Any]] = [("raw", rawb), ("store", storeb)]
                if raw_new_files and rawb and cfg.op == "WRITE":
                    order.insert(1, ("raw-newfile", rawb))
                if binary:
                    order.append(("nixlbench", binary))
                if rep % 2:
                    order.reverse()
                for name, bench in order:
                    if bench is None:
                        continue
                    if name == "nixlbench":
                        nb = run_nixlbench_binary(bench, cfg, opts.directory, backend, point=(block, batch))
                        nb_runs.append(nb)
                        if nb.failed:
                            failures.append(f"nixlbench block={format_bytes(block)} batch={batch}: "
                                            f"exit status {nb.returncode}" + ("" if nb.rows else ", no result rows"))
                        mine = [r for r in nb.rows if (r.block_size, r.batch_size) == (block, batch)]
                        runs[name].extend(mine[:1])
                        continue
                    if name == "raw-newfile":
                        row = bench.run_point_new_files(block, batch, k)
                    else:
                        row = bench.run_point(block, batch, k)
                    k += 1
                    runs[name].append(row)
                    log.info("%-5s block=%s batch=%d: %.3f GB/s verified=%s", name, format_bytes(block), batch,
                             row.bw_gbps, row.verified)
            for name in ("raw", "raw-newfile", "store", "nixlbench"):
                if runs[name]:
                    rows.append(_median_row(runs[name]))
    finally:
        if rawb:
            rawb.close()
        if storeb:
            storeb.close()
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
        "store_layout": f"{model.name} (tp={tp})" if model is not None else layout_mode,
        "store_verify_checksums": verify_checksums,
        "store_recycle": recycle,
        "repeat": repeat,
        "raw_new_files": raw_new_files,
        "started_utc": started.isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "nixl_version": _nixl_version(),
        "flags_source": FLAGS_SOURCE,
        "nixlbench_binary": binary,
        "nixlbench_runs": [{"command": r.command, "returncode": r.returncode, "output": r.output} for r in nb_runs],
        "failures": failures,
    }
    return StorageBenchResult(rows, meta, failures=failures)


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
    # appended, not with_suffix: a prefix such as "kv_qwen2.5-0.5b_4k" has dots of its own
    out = {"csv": f"{prefix}.csv", "json": f"{prefix}.json"}
    write_csv(result.rows, Path(out["csv"]))
    write_json(result.rows, Path(out["json"]), result.meta)
    png = Path(f"{prefix}.png")
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
           "default_max_memory", "resolve_directory", "run_nixlbench_binary", "remove_nixlbench_files", "NixlbenchRun"]
