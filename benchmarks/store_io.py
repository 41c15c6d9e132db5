#!/usr/bin/env python3
"""Store put/get throughput vs raw file I/O, same files, same machine, one run.

For each chunk size (1..64 MiB; a KV layout of L layers x 8 KV heads x 128 dims in bf16 with
256-token chunks is exactly L MiB per chunk, 2L segments of 512 KiB) it measures:
  raw write : os.pwritev of each chunk's segments into its own file (no header, checksum, rename)
  store put : KVStore.put_many (header, XXH3 checksum, preallocation, NIXL write, atomic rename)
  raw read  : os.preadv of the store's own block files into a preallocated canonical buffer
  store get : KVStore.get into a preallocated buffer (NIXL read + header check + checksum)
page cache warm, and with O_DIRECT (cold path) where the file system supports it. Also: hashing
and lookup of a 131,072-token prompt (512 chunks). Prints a table; writes JSON and a PNG.

    python benchmarks/store_io.py                  # ~1-2 minutes on 2 cores
    python benchmarks/store_io.py --total-mib 2048 --sizes 1 4 16 64 --repeat 5
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

import torch

from vua_nixl import KVLayout, KVStore, Namespace
from vua_nixl.agent import aligned_empty
from vua_nixl.keys import as_token_array, chunk_keys

CHUNK = 256


def layout_for(mib: int) -> KVLayout:
    return KVLayout(num_layers=mib, kv_heads=8, head_dim=128)


def segment_views(t: torch.Tensor, store: KVStore, chunk: int) -> list[memoryview]:
    """The chunk's segments inside canonical tensor t, as writable buffers, in file order."""
    addrs = store.geometry.segment_addrs(t, chunk)
    import ctypes

    return [memoryview((ctypes.c_char * store.geometry.seg_bytes).from_address(int(a))).cast("B") for a in addrs]


def median_time(fn, repeat: int, setup=None) -> float:
    times = []
    for _ in range(repeat):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_size(mib: int, total_mib: int, repeat: int, base: Path, direct: bool, verify: bool) -> dict:
    layout = layout_for(mib)
    ns = Namespace("bench/store-io", "bf16", layout)
    n_chunks = max(2, total_mib // mib)
    tokens = torch.arange(n_chunks * CHUNK) + mib * 1_000_000
    kv = aligned_empty(layout.shape(len(tokens)), torch.bfloat16)
    kv.view(torch.int16).copy_(torch.randint(-30000, 30000, kv.shape, dtype=torch.int16))
    out = aligned_empty(layout.shape(len(tokens)), torch.bfloat16)
    nbytes = n_chunks * mib * 2**20
    root = base / f"store-{mib}"
    rawdir = base / f"raw-{mib}"
    res: dict = {"chunk_mib": mib, "chunks": n_chunks, "bytes": nbytes, "direct": direct, "verify": verify}
    with KVStore(root, ns, chunk_tokens=CHUNK, backend="POSIX", direct_io=direct, verify_checksums=verify, presence_ttl_s=0) as store:
        keys = store.keys_for(tokens)
        paths = [store.block_path(k) for k in keys]
        flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)

        def wipe_store():
            for p in paths:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass

        def wipe_raw():
            shutil.rmtree(rawdir, ignore_errors=True)
            rawdir.mkdir(parents=True)

        def raw_write():
            wflags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
            for i in range(n_chunks):
                fd = os.open(rawdir / f"{i}.bin", wflags, 0o644)
                try:
                    os.pwritev(fd, segment_views(kv, store, i), store.geometry.payload_off)
                finally:
                    os.close(fd)

        def store_put():
            assert store.put(tokens, kv) == len(tokens)

        def raw_read():
            for i, p in enumerate(paths):
                fd = os.open(p, flags)
                try:
                    n = os.preadv(fd, segment_views(out, store, i), store.geometry.payload_off)
                    assert n == store.chunk_bytes
                finally:
                    os.close(fd)

        def store_get():
            r = store.get(tokens, out=out)
            assert r.tokens == len(tokens)

        res["raw_write_s"] = median_time(raw_write, repeat, wipe_raw)
        res["store_put_s"] = median_time(store_put, repeat, wipe_store)
        store_get()  # warm the cache and the registration
        res["raw_read_s"] = median_time(raw_read, repeat)
        res["store_get_s"] = median_time(store_get, repeat)
        assert torch.equal(out.view(torch.int16), kv.view(torch.int16)), "store get returned different bytes"
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(rawdir, ignore_errors=True)
    for k in ("raw_write", "store_put", "raw_read", "store_get"):
        res[f"{k}_gibs"] = nbytes / res[f"{k}_s"] / 2**30
    res["put_ratio"] = res["store_put_gibs"] / res["raw_write_gibs"]
    res["get_ratio"] = res["store_get_gibs"] / res["raw_read_gibs"]
    return res


def bench_lookup(base: Path, repeat: int) -> dict:
    layout = KVLayout(1, 1, 8)
    ns = Namespace("bench/lookup", "bf16", layout)
    tokens = torch.randint(0, 150_000, (131_072,))
    arr = as_token_array(tokens)
    fp = ns.fingerprint(CHUNK)
    hash_s = median_time(lambda: chunk_keys(fp, as_token_array(tokens), CHUNK), repeat * 5)
    out = {"tokens": len(tokens), "chunks": len(arr) // CHUNK, "hash_ms": hash_s * 1e3}
    for ttl, label in ((2.0, "lookup_cached_ms"), (0.0, "lookup_stat_ms")):
        with KVStore(base / "lookup", ns, chunk_tokens=CHUNK, backend="POSIX", presence_ttl_s=ttl) as s:
            s.put(tokens, torch.zeros(layout.shape(len(tokens)), dtype=torch.bfloat16))
            assert s.lookup(tokens) == len(tokens)
            out[label] = median_time(lambda: s.lookup(tokens), repeat * 5) * 1e3
    miss = torch.randint(0, 150_000, (131_072,))
    with KVStore(base / "lookup", ns, chunk_tokens=CHUNK, backend="POSIX") as s:
        out["lookup_miss_ms"] = median_time(lambda: s.lookup(miss), repeat * 5) * 1e3
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64], help="chunk sizes in MiB")
    ap.add_argument("--total-mib", type=int, default=512, help="bytes moved per measurement")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where the files go (default: a temp dir under results/)")
    ap.add_argument("--out", type=Path, default=Path("results/store_io"))
    ap.add_argument("--no-direct", action="store_true", help="skip the O_DIRECT rows")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="store-io-", dir=args.dir or args.out))
    rows = []
    try:
        modes = [(False, True), (False, False)]
        if not args.no_direct and direct_supported(base):
            modes.append((True, True))
        elif not args.no_direct:
            print(f"O_DIRECT not supported on {base}; direct rows skipped", file=sys.stderr)
        for direct, verify in modes:
            for mib in args.sizes:
                r = bench_size(mib, max(args.total_mib, 2 * mib), args.repeat, base, direct, verify)
                rows.append(r)
                print(
                    f"{'direct' if direct else 'cached':7s} verify={'on ' if verify else 'off'} {mib:3d} MiB  "
                    f"put {r['store_put_gibs']:6.2f} / raw {r['raw_write_gibs']:6.2f} GiB/s = {r['put_ratio']:.2f}x   "
                    f"get {r['store_get_gibs']:6.2f} / raw {r['raw_read_gibs']:6.2f} GiB/s = {r['get_ratio']:.2f}x",
                    flush=True,
                )
        lookup = bench_lookup(base, args.repeat)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(
        f"131,072 tokens / 512 chunks: hash {lookup['hash_ms']:.2f} ms, lookup (presence cache) "
        f"{lookup['lookup_cached_ms']:.2f} ms, lookup (stat every chunk) {lookup['lookup_stat_ms']:.2f} ms, "
        f"lookup miss {lookup['lookup_miss_ms']:.3f} ms"
    )
    result = {"rows": rows, "lookup": lookup, "host": os.uname().nodename, "torch": torch.__version__,
              "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (args.out / "store_io.json").write_text(json.dumps(result, indent=2))
    plot(rows, args.out / "store_io.png")
    print(f"wrote {args.out / 'store_io.json'} and {args.out / 'store_io.png'}")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (op, raw) in zip(axes, (("store_get", "raw_read"), ("store_put", "raw_write"))):
        for (direct, verify), style in (((False, True), "-"), ((False, False), ":"), ((True, True), "--")):
            sel = [r for r in rows if r["direct"] == direct and r["verify"] == verify]
            if not sel:
                continue
            tag = ("O_DIRECT" if direct else "page cache") + ("" if verify else ", no checksum")
            x = [r["chunk_mib"] for r in sel]
            ax.plot(x, [r[f"{op}_gibs"] for r in sel], "o" + style, color="C0", label=f"store ({tag})")
            ax.plot(x, [r[f"{raw}_gibs"] for r in sel], "s" + style, color="C1", label=f"raw ({tag})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("chunk size (MiB)")
        ax.set_ylabel("GiB/s")
        ax.set_title("read (get vs preadv)" if op == "store_get" else "write (put vs pwritev)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
