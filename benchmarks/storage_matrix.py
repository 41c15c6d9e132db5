"""Run several nixlbench configs through `vua-nixl bench storage` and summarize raw vs store.

Thin wrapper around :func:`vua_nixl_bench.storage.run_storage_bench` for the numbers recorded in
nixlbench_configs/README.md. Each config writes its own CSV/JSON/PNG under --out; the summary is a
Markdown table of every point (raw GB/s, store GB/s, store/raw) plus the minimum ratio at blocks
of 4 MiB and more, which is the issue's target (>= 0.9).

Example (the run recorded in the README, ~10 minutes on a 2-core VM):

    python benchmarks/storage_matrix.py --dir /tmp/vua-bench --out results/storage_matrix \\
        --set start_block_size=1MiB --set max_block_size=16MiB --set start_batch_size=4 \\
        --set num_iter=1024 --repeat 3 \\
        nixlbench_configs/posix_uring_read_direct.toml nixlbench_configs/posix_uring_write_direct.toml
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from vua_nixl_bench.bench_cli import parse_overrides
from vua_nixl_bench.nbconfig import NixlbenchConfig, format_bytes
from vua_nixl_bench.raw import RunOptions
from vua_nixl_bench.storage import default_max_memory, run_storage_bench, write_outputs

log = logging.getLogger("storage_matrix")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--out", default="results/storage_matrix")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--layout", default="model", choices=("model", "flat"))
    ap.add_argument("--no-checksum", action="store_true")
    ap.add_argument("--fallback", action="store_true")
    ap.add_argument("--raw-new-files", action="store_true", help="WRITE configs: add the raw-newfile baseline")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = parse_overrides(args.set)
    lines = ["| config | block | batch | raw GB/s | raw-newfile GB/s | store GB/s | store/raw | store/raw-newfile | verified |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    worst: list[str] = []
    ok = True
    for path in args.configs:
        cfg = NixlbenchConfig.from_toml(path)
        cfg.update(overrides)
        t0 = time.time()
        res = run_storage_bench(
            cfg, RunOptions(directory=Path(args.dir), fallback=args.fallback, max_memory=default_max_memory()),
            nixlbench="auto", layout_mode=args.layout, verify_checksums=not args.no_checksum, repeat=args.repeat,
            raw_new_files=args.raw_new_files,
        )
        write_outputs(res, out / cfg.name, cfg.name)
        log.info("%s done in %.0f s", cfg.name, time.time() - t0)
        ok &= res.all_verified
        raw = {(r.block_size, r.batch_size): r for r in res.rows if r.path == "raw"}
        newf = {(r.block_size, r.batch_size): r for r in res.rows if r.path == "raw-newfile"}
        big = []

        def f(x: float | None, fmt: str = ".3f") -> str:
            return "-" if x is None else format(x, fmt)

        for r in res.rows:
            if r.path != "store":
                continue
            base = raw.get((r.block_size, r.batch_size))
            nf = newf.get((r.block_size, r.batch_size))
            ver = "ok" if r.verified and all(x is None or x.verified for x in (base, nf)) else "FAIL"
            lines.append(f"| {cfg.name} | {format_bytes(r.block_size)} | {r.batch_size} | "
                         f"{f(base.bw_gbps if base else None)} | {f(nf.bw_gbps if nf else None)} | {r.bw_gbps:.3f} | "
                         f"{f(r.ratio, '.2f')} | {f(r.ratio_newfile, '.2f')} | {ver} |")
            if r.block_size >= 4 << 20 and r.ratio is not None:
                big.append(r.ratio)
        if big:
            worst.append(f"- {cfg.name}: store/raw at >= 4 MiB: min {min(big):.2f}, median "
                         f"{sorted(big)[(len(big) - 1) // 2]:.2f}")
    summary = "\n".join(lines + [""] + worst) + "\n"
    (out / "summary.md").write_text(summary)
    print(summary)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
