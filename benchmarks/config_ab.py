#!/usr/bin/env python3
"""A/B of two store settings on real model shapes: put, warm get and cold get, same run.

Defaults are decided by measurement, and on these shared machines only a comparison inside one
run means anything. This script builds two ``KVStore`` s that differ only in the settings given
(``--a`` and ``--b``: ``StoreConfig`` fields as ``name=value``), and for each model preset and
chunk size puts the same KV through both and reads it back, interleaved (A, B, B, A, ...) so
both see the same background load:

  put       KVStore.put of a new prefix (after os.sync(): no dirty pages from the last round)
  warm get  KVStore.get(out=) right after the put (page cache warm), bytes compared exactly
  hot get   the same prefix read once more, as a shared system prompt is (--hot)
  cold get  the same after fdatasync + posix_fadvise(DONTNEED) of every block file (--cold)

Each round's prefix is deleted afterwards. Prints medians in GiB/s and the ratios B/A (> 1: B
faster), the load average, and writes JSON.

    python benchmarks/config_ab.py --a posix_io=uring --b posix_io=aio
    python benchmarks/config_ab.py --a io_lanes=1 --b io_lanes=0 --models qwen2-0.5b --sizes 0 4 --cold
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store_io import chunk_tokens_for, layout_of  # noqa: E402

from vua_nixl import KVStore, Namespace, StoreConfig  # noqa: E402
from vua_nixl.agent import aligned_empty  # noqa: E402
from vua_nixl_bench.plan import PRESETS  # noqa: E402
from vua_nixl_bench.results import load_line  # noqa: E402

DEFAULT_MODELS = ["qwen2-0.5b", "llama-3.1-8b", "deepseek-v3"]


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``name=value`` pairs, validated (and typed) by StoreConfig itself."""
    raw: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in StoreConfig.model_fields:
            raise SystemExit(f"not a StoreConfig setting: {item!r} (fields: {', '.join(StoreConfig.model_fields)})")
        raw[name] = value
    cfg = StoreConfig(**raw)
    return {name: getattr(cfg, name) for name in raw}


def drop_cache(store: KVStore, tokens: torch.Tensor) -> None:
    for key in store.keys_for(tokens):
        fd = os.open(store.block_path(key), os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_point(model: str, mib: float, settings: dict[str, dict[str, Any]], total_mib: int, repeat: int,
                base: Path, cold: bool, hot: bool = False) -> dict[str, Any]:
    layout = layout_of(PRESETS[model])
    ctoks = chunk_tokens_for(layout, mib) if mib > 0 else 256
    ns = Namespace(f"bench/config-ab/{model}", "bf16", layout)
    stores = {side: KVStore(base / f"{model}-{mib}-{side}", ns, chunk_tokens=ctoks, backend="POSIX",
                            presence_ttl_s=0, access_log=False, **kw) for side, kw in settings.items()}
    try:
        geo = stores["a"].geometry
        n = max(2, round(total_mib * 2**20 / geo.chunk_bytes))
        kv = aligned_empty(layout.shape(n * ctoks), torch.bfloat16)
        kv.view(torch.int16).copy_(torch.randint(-30000, 30000, kv.shape, dtype=torch.int16))
        out = aligned_empty(layout.shape(n * ctoks), torch.bfloat16)
        ops = ["put", "get"] + (["hot"] if hot else []) + (["cold"] if cold else [])
        times: dict[str, list[float]] = {f"{op} {side}": [] for op in ops for side in stores}

        def timed(name: str, fn: Callable[[], Any]) -> None:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

        def get(store: KVStore, tokens: torch.Tensor) -> None:
            out.zero_()
            assert store.get(tokens, out=out).tokens == len(tokens)

        for r in range(repeat):
            tokens = torch.arange(n * ctoks) + 1_000_000 * (r + 1) + (hash(model) % 1000) * 1_000_000_000
            order = list(stores.items()) if r % 2 else list(stores.items())[::-1]
            for side, s in order:
                os.sync()
                timed(f"put {side}", lambda s=s, t=tokens: s.put(t, kv))
            for side, s in order:
                timed(f"get {side}", lambda s=s, t=tokens: get(s, t))
                if not torch.equal(out.view(torch.int16), kv.view(torch.int16)):
                    raise SystemExit(f"{model} {side}: bytes read differ from bytes written")
            if hot:
                for side, s in order:
                    timed(f"hot {side}", lambda s=s, t=tokens: get(s, t))
                    if not torch.equal(out.view(torch.int16), kv.view(torch.int16)):
                        raise SystemExit(f"{model} {side}: bytes read again differ from bytes written")
            if cold:
                for side, s in order:
                    drop_cache(s, tokens)
                    timed(f"cold {side}", lambda s=s, t=tokens: get(s, t))
            for s in stores.values():
                s.delete(tokens)
        med = {k: statistics.median(v) for k, v in times.items()}
        nbytes = n * geo.chunk_bytes
        row: dict[str, Any] = {"model": model, "chunk_bytes": geo.chunk_bytes, "seg_bytes": geo.seg_bytes,
                               "chunk_tokens": ctoks, "chunks": n, "loadavg": os.getloadavg()[0]}
        for op in ops:
            for side in stores:
                row[f"{op}_{side}_gibs"] = nbytes / med[f"{op} {side}"] / 2**30
            row[f"{op}_ratio"] = med[f"{op} a"] / med[f"{op} b"]
        row["samples_s"] = times
        return row
    finally:
        for s in stores.values():
            s.close()


def table(rows: list[dict[str, Any]], ops: list[str]) -> str:
    head = ["model", "chunk (tokens, segment)"] + [c for op in ops for c in (f"{op} A / B GiB/s", f"**{op} B/A**")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['chunk_bytes'] / 2**20:.1f} MiB ({r['chunk_tokens']}, {r['seg_bytes'] >> 10} KiB)"]
        cells += [c for op in ops for c in (f"{r[f'{op}_a_gibs']:.2f} / {r[f'{op}_b_gibs']:.2f}", f"**{r[f'{op}_ratio']:.2f}**")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", nargs="+", required=True, metavar="NAME=VALUE", help="settings of store A (the baseline)")
    ap.add_argument("--b", nargs="+", required=True, metavar="NAME=VALUE", help="settings of store B")
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help=f"presets ({', '.join(PRESETS)})")
    ap.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 0],
                    help="chunk sizes in MiB (0: the preset's real 256-token chunk)")
    ap.add_argument("--total-mib", type=int, default=128, help="bytes per measurement")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--cold", action="store_true", help="also time gets with the page cache dropped")
    ap.add_argument("--hot", action="store_true", help="also time a second get of the same prefix")
    ap.add_argument("--dir", type=Path, default=None, help="where the stores go (default: a temp dir under --out)")
    ap.add_argument("--out", type=Path, default=Path("results/config_ab"))
    args = ap.parse_args()
    settings = {"a": parse_settings(args.a), "b": parse_settings(args.b)}
    args.out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="config-ab-", dir=args.dir or args.out))
    ops = ["put", "get"] + (["hot"] if args.hot else []) + (["cold"] if args.cold else [])
    load_before = os.getloadavg()
    rows = []
    try:
        for model in args.models:
            for mib in args.sizes:
                r = bench_point(model, mib, settings, args.total_mib, args.repeat, base, args.cold, args.hot)
                rows.append(r)
                print(f"{model:14s} {r['chunk_bytes'] / 2**20:5.1f} MiB  " + "  ".join(
                    f"{op} B/A {r[f'{op}_ratio']:.2f}" for op in ops) + f"  (load {r['loadavg']:.1f})", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    load_after = os.getloadavg()
    print(f"\nA: {settings['a']}\nB: {settings['b']}\n")
    print(table(rows, ops))
    print("\n" + load_line(load_before, load_after))
    name = "ab-" + time.strftime("%Y%m%d-%H%M%S") + ".json"
    (args.out / name).write_text(json.dumps({"a": settings["a"], "b": settings["b"], "rows": rows, "argv": sys.argv,
                                             "loadavg_before": load_before, "loadavg_after": load_after,
                                             "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                            indent=2, default=str))
    print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
