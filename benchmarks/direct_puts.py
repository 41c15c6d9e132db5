#!/usr/bin/env python3
"""O_DIRECT puts into recycled block files: streamed, batched, and raw NIXL, interleaved.

A store at capacity writes each chunk into an evicted block file it claims from the recycle
pool, with O_DIRECT (``direct_io``). Three ways to move the same chunks, one round of each in
turn (same background load), on one store and one NIXL POSIX agent:

  streamed  ``KVStore.put_many`` as shipped: each sub-batch (one chunk of 2 MiB or more) is
            posted as soon as its file is claimed, while the next files are claimed and the
            digests computed (``BlockWriter._write_streamed``)
  batched   the same put opening every file of the batch first, then one request (the write
            path before session 9; the store's ``streams_writes`` turned off for the round)
  raw       one NIXL request writing the same payload bytes into as many preallocated,
            fully written files, whole (a nixlbench-style WRITE: no header, checksum, claim,
            registration or rename)

Before each store round every block is evicted into the pool (untimed) and the pool aged,
as ``vua-nixl bench storage --recycle`` does; ``os.sync()`` before every timed round. Shapes
are ``vua-nixl plan`` presets at about ``--sizes`` MiB per chunk; ``--batch`` chunks per put,
one request of ``chunk_tokens`` tokens each (as ``bench storage``'s threads). Every put is
read back and compared byte for byte once at the end.

    python benchmarks/direct_puts.py                     # llama-3.1-8b and qwen2-0.5b, 4 and 16 MiB, 4 chunks
    python benchmarks/direct_puts.py --models deepseek-v3 --sizes 4 --batch 2 --repeat 31
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
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store_io import chunk_tokens_for, direct_supported, layout_of  # noqa: E402

from vua_nixl import KVStore, Namespace  # noqa: E402
from vua_nixl.agent import NixlAgent, aligned_empty  # noqa: E402
from vua_nixl_bench.plan import PRESETS  # noqa: E402
from vua_nixl_bench.recycling import pool_blocks  # noqa: E402


def bench_point(model: str, mib: int, batch: int, repeat: int, base: Path) -> dict[str, Any]:
    layout = layout_of(PRESETS[model])
    ctoks = chunk_tokens_for(layout, mib)
    ns = Namespace(f"bench/direct-puts/{model}", "bf16", layout)
    rng = np.random.default_rng(mib * 100 + batch)
    reqs = [rng.integers(0, 2**31 - 1, size=ctoks, dtype=np.int64) for _ in range(batch)]
    srcs = []
    for _ in range(batch):
        t = aligned_empty(layout.shape(ctoks), torch.bfloat16)
        t.view(torch.int16).copy_(torch.randint(-30000, 30000, t.shape, dtype=torch.int16))
        srcs.append(t)
    chunk_bytes = srcs[0].numel() * 2
    root = base / f"store-{model}-{mib}-{batch}"
    times: dict[str, list[float]] = {"streamed": [], "batched": [], "raw": []}
    agent = NixlAgent("POSIX", posix_io="aio", probe_dir=base, direct_io=False)
    raw_fds: list[int] = []
    try:
        store = KVStore(root, ns, chunk_tokens=ctoks, backend="POSIX", direct_io=True, agent=agent,
                        access_log=False, presence_ttl_s=0)
        items = list(zip(reqs, srcs))
        keys = [k for r in reqs for k in store.keys_for(r)]
        for i in range(batch):
            p = base / f"raw-{model}-{mib}-{i}"
            with open(p, "wb") as f:
                f.write(os.urandom(chunk_bytes))
            raw_fds.append(os.open(p, os.O_RDWR | os.O_DIRECT))
        raw_m = np.array([[s.data_ptr(), chunk_bytes, 0] for s in srcs], dtype=np.uint64)
        raw_f = np.array([[0, chunk_bytes, fd] for fd in raw_fds], dtype=np.uint64)
        regs = agent.register_batch([(s, False) for s in srcs])
        store.put_many(items)  # the files every later round recycles
        stream = store._core.streams_writes

        def store_round(streamed: bool) -> float:
            for r in reqs:
                pool_blocks(store, r)  # evicted into the pool, and the pool aged (not slept for)
            store.forget(keys)
            store._core.streams_writes = stream if streamed else (lambda: False)  # type: ignore[method-assign]
            os.sync()
            t0 = time.perf_counter()
            covered = store.put_many(items)
            dt = time.perf_counter() - t0
            if covered != [ctoks] * batch:
                raise RuntimeError(f"put covered {covered}")
            return dt

        def raw_round() -> float:
            os.sync()
            with agent.files(raw_fds):
                t0 = time.perf_counter()
                agent.transfer("WRITE", raw_m, raw_f, "DRAM")
                return time.perf_counter() - t0

        for _ in range(repeat):
            times["streamed"].append(store_round(True))
            times["batched"].append(store_round(False))
            times["raw"].append(raw_round())
        recycled = store.stats()["chunks_recycled"]
        if recycled < 2 * repeat * batch:
            raise RuntimeError(f"only {recycled} chunks went into recycled files")
        outs = [aligned_empty(layout.shape(ctoks), torch.bfloat16) for _ in range(batch)]
        res = store.get_many(reqs, outs=outs)
        identical = all(r.tokens == ctoks for r in res) and all(
            torch.equal(o.view(torch.int16), s.view(torch.int16)) for o, s in zip(outs, srcs))
        for reg in regs:
            agent.release(reg)
        store.close()
    finally:
        for fd in raw_fds:
            os.close(fd)
        agent.close()
        shutil.rmtree(root, ignore_errors=True)
        for p in base.glob(f"raw-{model}-{mib}-*"):
            p.unlink()
    med = {k: statistics.median(v) for k, v in times.items()}
    nbytes = batch * chunk_bytes
    return {"model": model, "chunk_mib": mib, "chunk_tokens": ctoks, "chunk_bytes": chunk_bytes, "batch": batch,
            "repeat": repeat, **{f"{k}_ms": v * 1e3 for k, v in med.items()},
            **{f"{k}_gbs": nbytes / v / 1e9 for k, v in med.items()},
            "streamed_vs_batched": med["batched"] / med["streamed"], "streamed_vs_raw": med["raw"] / med["streamed"],
            "batched_vs_raw": med["raw"] / med["batched"], "identical": identical}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | chunk | batch | raw GB/s | batched GB/s | streamed GB/s | streamed/batched | batched/raw "
             "| streamed/raw | read back |", "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['chunk_bytes'] / 2**20:.1f} MiB ({r['chunk_tokens']} tok) | {r['batch']} "
            f"| {r['raw_gbs']:.2f} | {r['batched_gbs']:.2f} | {r['streamed_gbs']:.2f} | **{r['streamed_vs_batched']:.3f}** "
            f"| {r['batched_vs_raw']:.2f} | **{r['streamed_vs_raw']:.2f}** | {'identical' if r['identical'] else 'DIFFERS'} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama-3.1-8b", "qwen2-0.5b"], choices=sorted(PRESETS))
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 16], help="chunk sizes in MiB")
    ap.add_argument("--batch", type=int, default=4, help="chunks per put")
    ap.add_argument("--repeat", type=int, default=21, help="rounds of each variant (medians)")
    ap.add_argument("--dir", type=Path, default=None, help="a directory on the storage to test (O_DIRECT capable)")
    ap.add_argument("--out", type=Path, default=Path("results/direct_puts"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="direct-puts-", dir=args.dir or args.out))
    if not direct_supported(base):
        print(f"{base} does not support O_DIRECT: nothing to measure", file=sys.stderr)
        return 2
    load0 = os.getloadavg()
    rows = []
    try:
        for model in args.models:
            for mib in args.sizes:
                rows.append(bench_point(model, mib, args.batch, args.repeat, base))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    load1 = os.getloadavg()
    print(f"\n{table(rows)}\n\nload average {load0[0]:.2f} -> {load1[0]:.2f}")
    (args.out / "direct_puts.json").write_text(json.dumps({"rows": rows, "load": [load0, load1]}, indent=2))
    print(f"wrote {args.out / 'direct_puts.json'}")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
