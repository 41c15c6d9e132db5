"""Store vs raw NIXL on a GPU host: GDS, GDS_MT and POSIX (host bounce), 4-64 MiB chunks.

For each backend that starts here, the same bytes move three ways in the same run:
  raw     one NIXL request per batch between a registered VRAM buffer and one O_DIRECT file
          (no headers, no checksums): the ceiling;
  store   KVStore.put / get(out=) of Llama-3.1-8B-shaped KV (checksums on: the proj64 digest is
          computed on the GPU);
  store-nocheck  the same with verify_checksums off (POSIX only: refused on GDS by design).
It also times the payload digests (proj64 on the GPU and on the CPU, XXH3 on the CPU).
Prints a table with ratios against raw and writes results/gpu_io/results.json.

    python benchmarks/gpu_io.py [--sizes 4 16 64] [--total-mib 256] [--root /mnt/nvme/x] [--device cuda]

Runs on a CPU host too (``--device cpu``: DRAM instead of VRAM, POSIX only) so the script
itself is checked everywhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from vua_nixl import KVLayout, KVStore, Namespace
from vua_nixl.agent import GDS_BACKENDS, NixlAgent, aligned_empty
from vua_nixl.digest import BLOCK, WIDTH, key_matrix, proj64, projections
from vua_nixl.errors import VuaNixlError

LAYOUT = KVLayout(num_layers=32, kv_heads=8, head_dim=128)  # Llama-3.1-8B per rank
TOKEN_BYTES = LAYOUT.elements_per_token() * 2  # bf16: 128 KiB per token


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def raw_nixl(agent: NixlAgent, root: Path, nbytes: int, chunks: int, device: str, repeat: int) -> dict[str, float]:
    """One registered buffer, one O_DIRECT file, one descriptor per chunk, one request per batch.
    A backend without VRAM support (POSIX on a GPU host) moves the data through one page-aligned
    host buffer and a device copy each way, as the store's staging does."""
    total = nbytes * chunks
    src = torch.empty(total, dtype=torch.uint8, device=device)
    src.random_(0, 255)
    bounce = device.startswith("cuda") and not agent.supports("VRAM_SEG")
    buf = src if device.startswith("cuda") and not bounce else aligned_empty((total,), torch.uint8)
    if buf is not src:
        buf.copy_(src)
    path = root / "raw.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o600)
    os.posix_fallocate(fd, 0, total)
    token = agent.register_tensor(buf, cache=False)
    mem = np.array([(buf.data_ptr() + i * nbytes, nbytes, buf.device.index or 0) for i in range(chunks)], dtype=np.uint64)
    fil = np.array([(i * nbytes, nbytes, fd) for i in range(chunks)], dtype=np.uint64)
    kind = agent.mem_type_of(buf)
    def write() -> None:
        if bounce:
            buf.copy_(src)
        agent.transfer("WRITE", mem, fil, kind)

    def read() -> None:
        agent.transfer("READ", mem, fil, kind)
        if bounce:
            src.copy_(buf)
            sync(device)

    try:
        with agent.files([fd]):
            w = best(write, repeat)
            r = best(read, repeat)
    finally:
        agent.release(token)
        os.close(fd)
        path.unlink()
    return {"write_GBps": total / w / 1e9, "read_GBps": total / r / 1e9}


def store_io(backend: str, root: Path, nbytes: int, chunks: int, device: str, repeat: int, check: bool) -> dict[str, float]:
    chunk_tokens = nbytes // TOKEN_BYTES
    n = chunk_tokens * chunks
    kv = torch.randint(0, 255, (n * TOKEN_BYTES,), dtype=torch.uint8).view(torch.bfloat16).reshape(LAYOUT.shape(n)).to(device)
    out = torch.empty_like(kv)
    toks = np.arange(n)
    shutil.rmtree(root / "store", ignore_errors=True)
    with KVStore(root / "store", Namespace("bench/llama", "bfloat16", LAYOUT), chunk_tokens=chunk_tokens,
                 backend=backend, verify_checksums=check, direct_io=True) as s:
        def put() -> None:
            s.delete(toks)
            s.put(toks, kv)
            sync(device)

        w = best(put, repeat)
        r = best(lambda: (s.get(toks, out=out), sync(device)), repeat)
        assert torch.equal(out.view(torch.uint8).cpu(), kv.view(torch.uint8).cpu()), "read back different bytes"
        return {"write_GBps": n * TOKEN_BYTES / w / 1e9, "read_GBps": n * TOKEN_BYTES / r / 1e9, "backend": s.backend}


def projections_int8(data: torch.Tensor, step: int = 16384) -> torch.Tensor:
    """A candidate for proj64 on the GPU, timed here before the library adopts it: the same
    integer projections through int8 tensor cores instead of a float64 product (which widens
    every byte eightfold). ``x - 128`` fits int8 and the keys (1..15) do too, int32 accumulation
    is exact (4096 * 128 * 15 < 2**31), and ``128 * sum(keys)`` restores the offset."""
    nb = data.numel() // BLOCK
    keys = torch.from_numpy(key_matrix()).to(device=data.device, dtype=torch.int8)
    k8 = torch.zeros((BLOCK, 8), dtype=torch.int8, device=data.device)  # _int_mm wants n % 8 == 0
    k8[:, :WIDTH] = keys
    bias = 128 * keys.to(torch.int64).sum(0)
    out = torch.empty((nb, WIDTH), dtype=torch.int64, device=data.device)
    for b0 in range(0, nb, step):
        b1 = min(nb, b0 + step)
        x = (data[b0 * BLOCK : b1 * BLOCK].view(torch.int8) ^ -128).view(b1 - b0, BLOCK)
        out[b0:b1] = torch._int_mm(x, k8)[:, :WIDTH].to(torch.int64) + bias
    return out


def digests(device: str) -> dict[str, Any]:
    data = torch.randint(0, 255, (256 << 20,), dtype=torch.uint8)
    out: dict[str, Any] = {"xxh3_cpu_GBps": data.numel() / best(lambda: xxhash.xxh3_64_intdigest(data.numpy()), 3) / 1e9}
    small = data[: 32 << 20]
    out["proj64_cpu_GBps"] = small.numel() / best(lambda: proj64(small), 2) / 1e9
    if device.startswith("cuda"):
        g = data.to(device)
        proj64(g)
        out["proj64_gpu_GBps"] = g.numel() / best(lambda: (proj64(g), sync(device)), 5) / 1e9
        try:
            same = torch.equal(projections_int8(g), projections(g))
            out["proj64_int8_candidate_equal"] = same
            out["proj64_int8_candidate_GBps"] = g.numel() / best(lambda: (projections_int8(g), sync(device)), 5) / 1e9
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run here is a finding, not a failure
            out["proj64_int8_candidate_error"] = f"{type(exc).__name__}: {exc}"[:160]
    return out


def print_row(r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"{r['backend']:8} unavailable: {r['error'][:90]}", flush=True)
        return
    raw, st, nc = r["raw"], r["store"], r["store-nocheck"]
    for label, part in (("raw", raw), ("store", st)):
        if "error" in part:
            print(f"{r['backend']:8} {r['chunk_MiB']:>4} {label} failed: {part['error']}", flush=True)
            return
    ncr = f"{nc['read_GBps'] / raw['read_GBps']:.2f}" if "read_GBps" in nc else "refused"
    print(f"{r['backend']:8} {r['chunk_MiB']:>4} {raw['write_GBps']:7.2f} {raw['read_GBps']:7.2f} {st['write_GBps']:8.2f} "
          f"{st['read_GBps']:8.2f} {st['write_GBps'] / raw['write_GBps']:6.2f} {st['read_GBps'] / raw['read_GBps']:6.2f}  {ncr}"
          f"{'  (' + r['gds_mode'] + ')' if r.get('gds_mode') else ''}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 64], help="chunk sizes in MiB")
    p.add_argument("--chunks", type=int, default=None, help="chunks per point (default: --total-mib worth, at least 4)")
    p.add_argument("--total-mib", type=int, default=256, help="bytes per point when --chunks is not given")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--root", default=None, help="directory on the storage to test (default: a temp dir)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", nargs="+", default=["GDS_MT", "GDS", "POSIX"])
    p.add_argument("--out", default="results/gpu_io")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = Path(args.root or tempfile.mkdtemp(prefix="vua-gpu-io-"))
    base.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"rows": [], "gpu": gpu}
    rows: list[dict[str, Any]] = result["rows"]
    # Each row is printed and saved as soon as it is measured: on a leased GPU host a step may be
    # cut off by its time limit, and the rows measured by then are what the run is for.
    print(f"device {args.device} ({gpu or 'no GPU'}), root {base}", flush=True)
    print(f"{'backend':8} {'MiB':>4} {'raw W':>7} {'raw R':>7} {'store W':>8} {'store R':>8} {'W/raw':>6} {'R/raw':>6}  nocheck R/raw", flush=True)
    for backend in args.backends if args.device.startswith("cuda") else ["POSIX"]:
        try:
            agent = NixlAgent(backend, probe_dir=base, direct_io=True)
        except VuaNixlError as exc:
            rows.append({"backend": backend, "error": str(exc)})
            print_row(rows[-1])
            continue
        for mib in args.sizes:
            nbytes = mib << 20
            chunks = args.chunks or max(4, args.total_mib // mib)
            row: dict[str, Any] = {"backend": backend, "chunk_MiB": mib, "chunks": chunks, "device": args.device}
            if backend in GDS_BACKENDS:
                row["gds_mode"] = agent.info().get("gds_mode")
            for label, check in (("raw", None), ("store", True), ("store-nocheck", False)):
                try:
                    if check is None:
                        row[label] = raw_nixl(agent, base, nbytes, chunks, args.device, args.repeat)
                    else:
                        row[label] = store_io(backend, base, nbytes, chunks, args.device, args.repeat, check)
                except Exception as exc:  # noqa: BLE001 - one failed point must not lose the others

                    row[label] = {"error": f"{type(exc).__name__}: {exc}"[:160]}
            rows.append(row)
            print_row(row)
            (out / "results.json").write_text(json.dumps(result, indent=2))
        agent.close()
    result["digests"] = digests(args.device)
    print("digests (GB/s): " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in result["digests"].items()), flush=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    if not args.root:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
