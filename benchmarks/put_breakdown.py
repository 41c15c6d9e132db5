#!/usr/bin/env python3
"""Where does ``KVStore.put`` spend its time? Per-step breakdown vs raw buffered ``pwritev``.

For each point (a ``vua-nixl plan`` preset and a chunk size in tokens; by default 0.75 and 3 MiB
qwen2-0.5b chunks below 4 MiB, 4 MiB llama-3.1-8b chunks, and the real 256-token chunks of
deepseek-v3 (17.2 MiB) and llama-3.1-8b (32 MiB)) it runs, interleaved so all see the same
background load:

  raw      : for each chunk, open(O_CREAT|O_EXCL) a new file + os.pwritev of its segments (as laid
             out in the canonical KV tensor) + close. Buffered (page cache), no header, checksum,
             preallocation, registration or rename.
  store    : KVStore.put of the same tensor (new prefix each round, deleted after), once per
             POSIX I/O engine of the NIXL backend (``--engines``, StoreConfig.posix_io: io_uring,
             libaio, synchronous), one store each, same run, serial (``io_lanes=1``,
             ``hash_overlap=inline``: the steps add up to the put; the default spreads them
             over threads, see benchmarks/store_io.py) and in place (``stage_max_kib=0``: by
             default files up to 4.5 MiB are staged, gathered and digested in a slab, which the
             steps below do not see); the write path instrumented in place: every step below
             is timed by wrapping the function the writer calls (nothing in the store is
             changed):

    checksum   geo.chunk_checksum (XXH3 of the payload)
    open       os.open of the unique temporary (O_RDWR|O_CREAT|O_EXCL)
    fallocate  posix_fallocate of the whole block file
    mem_reg    agent.register_batch (the source tensor; cached after the first put)
    file_reg   NIXL registration of the batch's file descriptors (+ deregistration)
    nixl_write transfer_rows: descriptor build + one NIXL WRITE request + polling to completion
    close      os.close of the temporaries
    rename     os.replace into place (+ makedirs / checked_dir of fan-out directories)
    fsync      fsync of each temporary (only with --fsync; the store's default is off)
    dir_fsync  fsync of each fan-out directory after the renames (only with --fsync)
    other      everything else inside put (hashing keys, headers, presence, observers, Python)

Prints one table per size (ms per put and % of put) plus put/raw, and the load average.

    python benchmarks/put_breakdown.py                       # the default points, 256 MiB per put
    python benchmarks/put_breakdown.py --points llama-3.1-8b:256 --total-mib 512 --repeat 7 --engines uring aio
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
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store_io import layout_of, segment_views  # noqa: E402

from vua_nixl import KVStore, Namespace  # noqa: E402
from vua_nixl.agent import aligned_empty  # noqa: E402
from vua_nixl.store import writer as writer_mod  # noqa: E402
from vua_nixl_bench.plan import PRESETS  # noqa: E402
from vua_nixl_bench.results import load_line  # noqa: E402

#: below 4 MiB (qwen2-0.5b: 0.75 and 3 MiB), 4 MiB (llama-3.1-8b 32 tokens), real 256-token chunks
DEFAULT_POINTS = ["qwen2-0.5b:64", "qwen2-0.5b:256", "llama-3.1-8b:32", "deepseek-v3:256", "llama-3.1-8b:256"]
STEPS = ["checksum", "open", "fallocate", "mem_reg", "file_reg", "nixl_write", "close", "rename", "fsync", "dir_fsync", "other"]
now = time.perf_counter


class _TimedOs:
    """Stands in for the ``os`` module inside writer.py: times open/close/replace/makedirs/fsync."""

    def __init__(self, acc: dict[str, float]):
        self._acc = acc
        self.quiet = False  # inside a step timed as a whole (the directory fsync)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def _timed(self, step: str, fn: Any, *a: Any, **kw: Any) -> Any:
        t0 = now()
        try:
            return fn(*a, **kw)
        finally:
            if not self.quiet:
                self._acc[step] += now() - t0

    def open(self, *a: Any, **kw: Any) -> int:
        return self._timed("open", os.open, *a, **kw)

    def close(self, fd: int) -> None:
        self._timed("close", os.close, fd)

    def replace(self, *a: Any) -> None:
        self._timed("rename", os.replace, *a)

    def makedirs(self, *a: Any, **kw: Any) -> None:
        self._timed("rename", os.makedirs, *a, **kw)

    def fsync(self, fd: int) -> None:
        self._timed("fsync", os.fsync, fd)


@contextmanager
def instrumented(store: KVStore, acc: dict[str, float]) -> Iterator[None]:
    """Wrap what BlockWriter calls with timers; restore everything on exit."""
    geo, agent = store.geometry, store.agent
    saved_mod = {k: getattr(writer_mod, k) for k in ("os", "_preallocate", "transfer_rows", "checked_dir", "_fsync_dir")}

    def timed(step: str, fn: Any) -> Any:
        def w(*a: Any, **kw: Any) -> Any:
            t0 = now()
            try:
                return fn(*a, **kw)
            finally:
                acc[step] += now() - t0
        return w

    orig_files = agent.files

    @contextmanager
    def files(fds: Any) -> Iterator[None]:
        t0 = now()
        cm = orig_files(fds)
        cm.__enter__()
        acc["file_reg"] += now() - t0
        try:
            yield
        finally:
            t1 = now()
            cm.__exit__(None, None, None)
            acc["file_reg"] += now() - t1

    tos = _TimedOs(acc)

    def fsync_dir(path: str) -> None:  # its open/fsync/close go through ``tos``: count them once, here
        t0 = now()
        tos.quiet = True
        try:
            saved_mod["_fsync_dir"](path)
        finally:
            tos.quiet = False
            acc["dir_fsync"] += now() - t0

    writer_mod.os = tos  # type: ignore[assignment]
    writer_mod._preallocate = timed("fallocate", saved_mod["_preallocate"])
    writer_mod.transfer_rows = timed("nixl_write", saved_mod["transfer_rows"])
    writer_mod.checked_dir = timed("rename", saved_mod["checked_dir"])
    writer_mod._fsync_dir = fsync_dir
    geo_cls = type(geo)  # a frozen dataclass: time the method on its class for the duration
    orig_csum = geo_cls.chunk_checksum
    geo_cls.chunk_checksum = timed("checksum", orig_csum)  # type: ignore[method-assign]
    agent.register_batch = timed("mem_reg", agent.register_batch)  # type: ignore[method-assign]
    agent.files = files  # type: ignore[method-assign]
    try:
        yield
    finally:
        for k, v in saved_mod.items():
            setattr(writer_mod, k, v)
        geo_cls.chunk_checksum = orig_csum  # type: ignore[method-assign]
        for name in ("register_batch", "files"):
            del agent.__dict__[name]


def bench_point(model: str, ctoks: int, total_mib: int, repeat: int, base: Path, fsync: bool, engines: list[str]) -> dict[str, Any]:
    layout = layout_of(PRESETS[model])
    chunk_bytes = int(torch.Size(layout.shape(ctoks)).numel()) * 2
    n_chunks = max(2, round(total_mib * 2**20 / chunk_bytes))
    ns = Namespace(f"bench/put-breakdown/{model}", "bf16", layout)
    kv = aligned_empty(layout.shape(n_chunks * ctoks), torch.bfloat16)
    kv.view(torch.int16).copy_(torch.randint(-30000, 30000, kv.shape, dtype=torch.int16))
    rawdir = base / f"raw-{model}-{ctoks}"
    raw_times: list[float] = []
    put_times: dict[str, list[float]] = {e: [] for e in engines}
    steps: dict[str, dict[str, list[float]]] = {e: defaultdict(list) for e in engines}
    with ExitStack() as stack:
        stores = {e: stack.enter_context(KVStore(base / f"store-{model}-{ctoks}-{e}", ns, chunk_tokens=ctoks, backend="POSIX",
                                                 fsync=fsync, presence_ttl_s=0, access_log=False, posix_io=e,
                                                 io_lanes=1, hash_overlap="inline", stage_max_kib=0))
                  for e in engines}
        first = stores[engines[0]]
        poff, geo = first.geometry.payload_off, first.geometry
        wsegs = [segment_views(kv, first, i) for i in range(n_chunks)]
        tok_base = 0
        for rep in range(repeat + 1):
            shutil.rmtree(rawdir, ignore_errors=True)
            rawdir.mkdir(parents=True)
            t0 = now()
            for i in range(n_chunks):
                fd = os.open(rawdir / f"{i}.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.pwritev(fd, wsegs[i], poff)
                    if fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
            t_raw = now() - t0
            if rep:
                raw_times.append(t_raw)
            for e in (engines if rep % 2 else engines[::-1]):
                store = stores[e]
                tok_base += 1
                tokens = torch.arange(n_chunks * ctoks) + tok_base * 10**7  # new prefix: a store never rewrites a chunk
                acc: dict[str, float] = defaultdict(float)
                with instrumented(store, acc):
                    t0 = now()
                    assert store.put(tokens, kv) == len(tokens)
                    t_put = now() - t0
                store.delete(tokens)  # keep the disk footprint bounded (the raw files are removed too)
                if rep == 0:
                    continue  # warm-up round (first registrations, directory creation)
                put_times[e].append(t_put)
                acc["other"] = t_put - sum(acc[s] for s in STEPS if s != "other")
                for s in STEPS:
                    steps[e][s].append(acc[s])
    shutil.rmtree(rawdir, ignore_errors=True)
    nbytes = n_chunks * chunk_bytes
    raw_s = statistics.median(raw_times)
    res: dict[str, Any] = {
        "model": model, "chunk_tokens": ctoks, "chunk_bytes": chunk_bytes, "chunks": n_chunks, "bytes": nbytes,
        "seg_bytes": geo.seg_bytes, "nseg": geo.nseg, "fsync": fsync,
        "raw_s": raw_s, "raw_gibs": nbytes / raw_s / 2**30, "raw_all_s": raw_times, "loadavg": os.getloadavg()[0], "variants": {}}
    for e in engines:
        put_s = statistics.median(put_times[e])
        res["variants"][e] = {"put_s": put_s, "put_gibs": nbytes / put_s / 2**30, "put_ratio": raw_s / put_s,
                              "steps_s": {s: statistics.median(x) for s, x in steps[e].items()}, "put_all_s": put_times[e]}
    return res


def table(rows: list[dict[str, Any]]) -> str:
    head = "| chunk | count | engine | raw GiB/s | put GiB/s | **put/raw** | " + " | ".join(STEPS) + " |"
    lines = [head, "|" + "---|" * (6 + len(STEPS))]
    for r in rows:
        for v, x in r["variants"].items():
            per = {s: x["steps_s"][s] / r["chunks"] * 1e3 for s in STEPS}
            tot = sum(x["steps_s"][s] for s in STEPS) or 1.0
            cells = " | ".join(f"{per[s]:.2f} ({100 * x['steps_s'][s] / tot:.0f}%)" for s in STEPS)
            lines.append(f"| {r['model']} {r['chunk_bytes'] / 2**20:.2f} MiB ({r['chunk_tokens']} tok, {r['nseg']} x "
                         f"{r['seg_bytes'] >> 10} KiB) | {r['chunks']} | {v} | {r['raw_gibs']:.2f} | {x['put_gibs']:.2f} "
                         f"| **{x['put_ratio']:.2f}** | {cells} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", nargs="+", default=DEFAULT_POINTS,
                    help=f"MODEL:CHUNK_TOKENS pairs (presets: {', '.join(PRESETS)})")
    ap.add_argument("--engines", nargs="+", default=["uring", "aio", "sync"], choices=["auto", "uring", "aio", "posix_aio", "sync"],
                    help="the store's POSIX I/O engines (StoreConfig.posix_io) to compare, one store each, interleaved")
    ap.add_argument("--total-mib", type=int, default=256, help="bytes per put (and per raw pass)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--fsync", action="store_true", help="store fsync=True and raw fsync per file")
    ap.add_argument("--dir", type=Path, default=None, help="where the files go (default: temp dir under --out)")
    ap.add_argument("--out", type=Path, default=Path("results/put_breakdown"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="put-bd-", dir=args.dir or args.out))
    load_before = os.getloadavg()
    rows = []
    try:
        for point in args.points:
            model, ctoks = point.split(":")
            r = bench_point(model, int(ctoks), args.total_mib, args.repeat, base, args.fsync, args.engines)
            rows.append(r)
            vs = ", ".join(f"{v} {x['put_gibs']:.2f} GiB/s = {x['put_ratio']:.2f}x" for v, x in r["variants"].items())
            print(f"{model} {r['chunk_bytes'] / 2**20:6.2f} MiB x {r['chunks']:4d}: raw {r['raw_gibs']:.2f} GiB/s; put {vs} "
                  f"(load {r['loadavg']:.1f})", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    load_after = os.getloadavg()
    print("\nms per chunk (share of put):\n")
    print(table(rows))
    print("\n" + load_line(load_before, load_after))
    tag = "-fsync" if args.fsync else ""
    path = args.out / f"put_breakdown{tag}.json"
    path.write_text(json.dumps({"rows": rows, "argv": sys.argv, "loadavg_before": load_before, "loadavg_after": load_after,
                                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
