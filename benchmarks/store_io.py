#!/usr/bin/env python3
"""Store put/get throughput vs raw file I/O on real model KV shapes, same files, one run.

For each model (presets of ``vua-nixl plan``: dense GQA with small heads, large heads, MLA) and
each chunk size (1..64 MiB: ``chunk_tokens`` is chosen so one chunk of that model is about that
size, a multiple of 4 KiB per segment so O_DIRECT works) it measures, interleaved (raw, store,
raw, store, ...) so both see the same background load:

  raw write : os.pwritev of each chunk's segments (as laid out in the canonical tensor) into
              its own file (no header, checksum, preallocation or rename); every timed write,
              raw or store, starts after os.sync() (no dirty pages left from the last round)
  store put : KVStore.put_many (header, XXH3 checksum, preallocation, NIXL write, atomic rename)
  recycled  : (``--recycle``) the same put into the previous round's block files, evicted into the
              recycle pool (untimed) as the pruner of a full store does; the pool is aged by the
              store's clock for it instead of sleeping ``recycle_after_s``
  raw read  : os.preadv of the store's own block files straight into a preallocated canonical
              buffer (segment by segment: the same scatter the store must do)
  get(out=) : KVStore.get into the same preallocated buffer (NIXL read + header + checksum)
  get()     : KVStore.get without a buffer (the store provides the returned tensor)

page cache warm, checksums on (and off), and O_DIRECT where the file system supports it. Bytes
are compared exactly after each store read. Prints one table with the ratios and the load
average; writes JSON and a PNG.

    python benchmarks/store_io.py                                   # 3 shapes x 1 4 16 64 MiB
    python benchmarks/store_io.py --models all --sizes 1 4 16 64 --total-mib 512 --repeat 5
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from vua_nixl import KVLayout, KVStore, Namespace
from vua_nixl.agent import aligned_empty
from vua_nixl.keys import as_token_array, chunk_keys
from vua_nixl_bench.plan import PRESETS, ModelShape
from vua_nixl_bench.recycling import pool_blocks
from vua_nixl_bench.results import load_line

DEFAULT_MODELS = ["qwen2-0.5b", "llama-3.1-8b", "deepseek-v3"]
ALIGN = 4096


def layout_of(shape: ModelShape) -> KVLayout:
    if shape.mla:
        return KVLayout(num_layers=shape.num_layers, kv_heads=1, head_dim=shape.head_dim, mla=True)
    return KVLayout(num_layers=shape.num_layers, kv_heads=shape.num_kv_heads, head_dim=shape.head_dim)


def chunk_tokens_for(layout: KVLayout, mib: float, itemsize: int = 2) -> int:
    """Tokens per chunk giving about ``mib`` MiB, with 4 KiB-aligned segments (O_DIRECT)."""
    per_tok_seg = (layout.head_dim if layout.mla else layout.kv_heads * layout.head_dim) * itemsize
    nseg = layout.num_layers if layout.mla else 2 * layout.num_layers
    step = ALIGN // math.gcd(ALIGN, per_tok_seg)
    toks = max(step, round(mib * 2**20 / (nseg * per_tok_seg) / step) * step)
    return toks


def segment_views(t: torch.Tensor, store: KVStore, chunk: int) -> list[memoryview]:
    """The chunk's segments inside canonical tensor t, as writable buffers, in file order."""
    addrs = store.geometry.segment_addrs(t, chunk)
    n = store.geometry.seg_bytes
    return [memoryview((ctypes.c_char * n).from_address(int(a))).cast("B") for a in addrs]


def interleaved(fns: dict[str, Callable[[], None]], repeat: int, setup: Optional[dict[str, Callable[[], None]]] = None) -> dict[str, float]:
    """Median seconds of each fn, run round-robin ``repeat`` times (same background load)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            if setup and k in setup:
                setup[k]()
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_point(model: str, mib: int, total_mib: int, repeat: int, base: Path, direct: bool, verify: bool,
                recycle: bool = False) -> dict[str, Any]:
    shape = PRESETS[model]
    layout = layout_of(shape)
    ctoks = chunk_tokens_for(layout, mib)
    ns = Namespace(f"bench/store-io/{model}", "bf16", layout)
    probe_bytes = layout.shape(ctoks)
    chunk_bytes = int(torch.Size(probe_bytes).numel()) * 2
    n_chunks = max(2, round(total_mib * 2**20 / chunk_bytes))
    tokens = torch.arange(n_chunks * ctoks) + mib * 1_000_000 + (hash(model) % 1000) * 10_000_000
    kv = aligned_empty(layout.shape(len(tokens)), torch.bfloat16)
    kv.view(torch.int16).copy_(torch.randint(-30000, 30000, kv.shape, dtype=torch.int16))
    out = aligned_empty(layout.shape(len(tokens)), torch.bfloat16)
    nbytes = n_chunks * chunk_bytes
    root = base / f"store-{model}-{mib}"
    rawdir = base / f"raw-{model}-{mib}"
    res: dict[str, Any] = {"model": model, "chunk_mib": mib, "chunk_tokens": ctoks, "chunk_bytes": chunk_bytes,
                           "seg_bytes": chunk_bytes // (layout.num_layers * (1 if layout.mla else 2)),
                           "chunks": n_chunks, "bytes": nbytes, "direct": direct, "verify": verify}
    with KVStore(root, ns, chunk_tokens=ctoks, backend="POSIX", direct_io=direct, verify_checksums=verify,
                 presence_ttl_s=0, access_log=False) as store:
        keys = store.keys_for(tokens)
        paths = [store.block_path(k) for k in keys]
        poff = store.geometry.payload_off
        flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
        wsegs = [segment_views(kv, store, i) for i in range(n_chunks)]
        rsegs = [segment_views(out, store, i) for i in range(n_chunks)]

        def wipe_store() -> None:
            for p in paths:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass

        def wipe_raw() -> None:
            shutil.rmtree(rawdir, ignore_errors=True)
            rawdir.mkdir(parents=True)

        def raw_write() -> None:
            wflags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
            for i in range(n_chunks):
                fd = os.open(rawdir / f"{i}.bin", wflags, 0o644)
                try:
                    os.pwritev(fd, wsegs[i], poff)
                finally:
                    os.close(fd)

        def store_put() -> None:
            assert store.put(tokens, kv) == len(tokens)

        def raw_read() -> None:
            for i, p in enumerate(paths):
                fd = os.open(p, flags)
                try:
                    assert os.preadv(fd, rsegs[i], poff) == chunk_bytes
                finally:
                    os.close(fd)

        def get_out() -> None:
            assert store.get(tokens, out=out).tokens == len(tokens)

        held: list[Any] = [None]

        def get_new() -> None:
            r = store.get(tokens)
            assert r.tokens == len(tokens)
            held[0] = r.kv  # the caller keeps its result until the next call (as an engine would)

        def clean(wipe: Callable[[], None]) -> Callable[[], None]:
            # Each timed write starts with no dirty pages: otherwise whichever side runs while
            # the kernel flushes the previous round's 256 MiB is throttled (raw writes swung
            # 0.35-3.4 GiB/s between rounds without this).
            return lambda: (wipe(), os.sync())  # type: ignore[func-returns-value]

        writes = {"raw_write": raw_write, "store_put": store_put}
        setups = {"raw_write": clean(wipe_raw), "store_put": clean(wipe_store)}
        if recycle:
            before = store.stats()["chunks_recycled"]  # each recycled round overwrites the plain put's files
            writes["store_put_recycled"] = store_put
            setups["store_put_recycled"] = clean(lambda: pool_blocks(store, tokens))  # this round's blocks, aged
        w = interleaved(writes, repeat, setups)
        if recycle and store.stats()["chunks_recycled"] - before != repeat * n_chunks:
            raise RuntimeError("recycled puts did not all go into recycled files")
        get_out()  # warm the page cache and the registrations
        get_new()
        r = interleaved({"raw_read": raw_read, "store_get_out": get_out, "store_get": get_new}, repeat)
        assert torch.equal(out.view(torch.int16), kv.view(torch.int16)), "get(out=) returned different bytes"
        assert torch.equal(held[0].view(torch.int16), kv.view(torch.int16)), "get() returned different bytes"
        held[0] = None
        res.update({f"{k}_s": v for k, v in {**w, **r}.items()})
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(rawdir, ignore_errors=True)
    for k in ("raw_write", "store_put", "store_put_recycled", "raw_read", "store_get_out", "store_get"):
        if f"{k}_s" in res:
            res[f"{k}_gibs"] = nbytes / res[f"{k}_s"] / 2**30
    res["put_ratio"] = res["store_put_gibs"] / res["raw_write_gibs"]
    if recycle:
        res["recycled_put_ratio"] = res["store_put_recycled_gibs"] / res["raw_write_gibs"]
    res["get_out_ratio"] = res["store_get_out_gibs"] / res["raw_read_gibs"]
    res["get_ratio"] = res["store_get_gibs"] / res["raw_read_gibs"]
    return res


def bench_lookup(base: Path, repeat: int) -> dict[str, Any]:
    layout = KVLayout(1, 1, 8)
    ns = Namespace("bench/lookup", "bf16", layout)
    tokens = torch.randint(0, 150_000, (131_072,))
    fp = ns.fingerprint(256)

    def med(fn: Callable[[], Any], n: int) -> float:
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    out: dict[str, Any] = {"tokens": len(tokens), "chunks": len(tokens) // 256,
                           "hash_ms": med(lambda: chunk_keys(fp, as_token_array(tokens), 256), repeat * 5) * 1e3}
    for ttl, label in ((2.0, "lookup_cached_ms"), (0.0, "lookup_stat_ms")):
        with KVStore(base / "lookup", ns, chunk_tokens=256, backend="POSIX", presence_ttl_s=ttl, access_log=False) as s:
            s.put(tokens, torch.zeros(layout.shape(len(tokens)), dtype=torch.bfloat16))
            assert s.lookup(tokens) == len(tokens)
            out[label] = med(lambda: s.lookup(tokens), repeat * 5) * 1e3
    miss = torch.randint(0, 150_000, (131_072,))
    with KVStore(base / "lookup", ns, chunk_tokens=256, backend="POSIX", access_log=False) as s:
        out["lookup_miss_ms"] = med(lambda: s.lookup(miss), repeat * 5) * 1e3
    return out


def direct_supported(base: Path) -> bool:
    try:
        fd = os.open(base / ".direct-probe", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        buf = aligned_empty((4096,), torch.uint8)
        os.pwrite(fd, memoryview(buf.numpy()), 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(base / ".direct-probe")


def table(rows: list[dict[str, Any]]) -> str:
    recycled = any("recycled_put_ratio" in r for r in rows)
    head = ("| model | mode | chunk (tokens, segment) | raw read GiB/s | get(out=) | /raw | get() | /raw "
            "| raw write GiB/s | put | /raw |" + (" recycled put | /raw |" if recycled else ""))
    lines = [head, "|" + "---|" * (13 if recycled else 11)]
    for r in rows:
        mode = ("O_DIRECT" if r["direct"] else "page cache") + (", checksums on" if r["verify"] else ", checksums off")
        lines.append(
            f"| {r['model']} | {mode} | {r['chunk_bytes'] / 2**20:.1f} MiB ({r['chunk_tokens']}, {r['seg_bytes'] >> 10} KiB) "
            f"| {r['raw_read_gibs']:.2f} | {r['store_get_out_gibs']:.2f} | **{r['get_out_ratio']:.2f}** "
            f"| {r['store_get_gibs']:.2f} | **{r['get_ratio']:.2f}** | {r['raw_write_gibs']:.2f} "
            f"| {r['store_put_gibs']:.2f} | **{r['put_ratio']:.2f}** |"
            + (f" {r['store_put_recycled_gibs']:.2f} | **{r['recycled_put_ratio']:.2f}** |" if recycled else ""))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help=f"presets, or 'all' ({', '.join(PRESETS)})")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64], help="chunk sizes in MiB")
    ap.add_argument("--total-mib", type=int, default=256, help="bytes moved per measurement")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where the files go (default: a temp dir under results/)")
    ap.add_argument("--out", type=Path, default=Path("results/store_io"))
    ap.add_argument("--no-direct", action="store_true", help="skip the O_DIRECT rows")
    ap.add_argument("--no-unverified", action="store_true", help="skip the checksums-off rows")
    ap.add_argument("--no-lookup", action="store_true", help="skip the hashing/lookup timing")
    ap.add_argument("--recycle", action="store_true", help="also time puts into recycled block files (a store at capacity)")
    args = ap.parse_args()
    models = list(PRESETS) if args.models == ["all"] else args.models
    args.out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="store-io-", dir=args.dir or args.out))
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    lookup: dict[str, Any] = {}
    try:
        modes = [(False, True)] + ([] if args.no_unverified else [(False, False)])
        if not args.no_direct and direct_supported(base):
            modes.append((True, True))
        elif not args.no_direct:
            print(f"O_DIRECT not supported on {base}; direct rows skipped", file=sys.stderr)
        for direct, verify in modes:
            for model in models:
                for mib in args.sizes:
                    r = bench_point(model, mib, max(args.total_mib, 2 * mib), args.repeat, base, direct, verify, args.recycle)
                    r["loadavg"] = os.getloadavg()[0]
                    rows.append(r)
                    print(f"{'direct' if direct else 'cached':6s} verify={'on ' if verify else 'off'} {model:14s} {mib:3d} MiB "
                          f"get(out=) {r['get_out_ratio']:.2f}x  get() {r['get_ratio']:.2f}x  put {r['put_ratio']:.2f}x "
                          + (f"recycled put {r['recycled_put_ratio']:.2f}x " if args.recycle else "")
                          + f"(raw read {r['raw_read_gibs']:.2f} GiB/s, load {r['loadavg']:.1f})", flush=True)
        if not args.no_lookup:
            lookup = bench_lookup(base, args.repeat)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    load_after = os.getloadavg()
    print()
    print(table(rows))
    print("\n" + load_line(load_before, load_after))
    if lookup:
        print(f"131,072 tokens / 512 chunks: hash {lookup['hash_ms']:.2f} ms, lookup (presence cache) "
              f"{lookup['lookup_cached_ms']:.2f} ms, lookup (stat every chunk) {lookup['lookup_stat_ms']:.2f} ms, "
              f"lookup miss {lookup['lookup_miss_ms']:.3f} ms")
    result = {"rows": rows, "lookup": lookup, "host": os.uname().nodename, "torch": torch.__version__,
              "loadavg_before": load_before, "loadavg_after": load_after,
              "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (args.out / "store_io.json").write_text(json.dumps(result, indent=2))
    try:
        plot(rows, args.out / "store_io.png")
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
    print(f"wrote {args.out / 'store_io.json'}")
    return 0


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for (direct, verify), style in (((False, True), "-"), ((False, False), ":"), ((True, True), "--")):
            sel = [r for r in rows if r["model"] == model and r["direct"] == direct and r["verify"] == verify]
            if not sel:
                continue
            tag = ("O_DIRECT" if direct else "cache") + ("" if verify else ", no csum")
            x = [r["chunk_mib"] for r in sel]
            ax.plot(x, [r["get_out_ratio"] for r in sel], "o" + style, color="C0", label=f"get(out=)/raw ({tag})")
            ax.plot(x, [r["get_ratio"] for r in sel], "s" + style, color="C1", label=f"get()/raw ({tag})")
            ax.plot(x, [r["put_ratio"] for r in sel], "^" + style, color="C2", label=f"put/raw ({tag})")
        ax.axhline(0.95, color="grey", lw=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("chunk size (MiB)")
        ax.set_ylabel("store / raw")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
