#!/usr/bin/env python3
"""What writing into recycled block files gains: new files vs overwriting old ones.

Every put writes each chunk into a new file (``O_CREAT | O_EXCL``, ``posix_fallocate``, NIXL
write, rename), while a preallocated pool overwritten in place (LMCache's NIXL backend, and
nixlbench's own write test) skips the file system's block allocation. This measures that gap
through the same NIXL POSIX agent the store uses, interleaved in one run:

  new       create + fallocate + one NIXL write of every file + rename into place
  recycled  rename an old, fully written file of the same size into a temporary name + open +
            the same NIXL write + rename into place

Buffered and O_DIRECT, medians over ``--repeat`` rounds, ``os.sync()`` before each timed round.
This is the file-system cost alone; the store recycles evicted block files with a recycle pool
(``recycle_pool_mib``, vua_nixl.recycle), measured through the store by ``store_io.py
--recycle``, ``peers.py --recycle`` and ``vua-nixl bench storage --recycle``.

    python benchmarks/recycled_files.py [--sizes 1 4 16] [--total-mib 128] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vua_nixl.agent import NixlAgent, aligned_empty


def one_round(agent: NixlAgent, root: Path, mem: np.ndarray, nbytes: int, pool: list[Path], mode: str,
              direct: bool, tag: str) -> float:
    flag = os.O_DIRECT if direct else 0
    os.sync()
    t0 = time.perf_counter()
    fds, temps = [], []
    for i in range(len(mem)):
        tmp = root / f"{tag}.{i}.tmp"
        if mode == "new":
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | flag, 0o644)
            os.posix_fallocate(fd, 0, nbytes)
        else:
            os.rename(pool[i], tmp)
            fd = os.open(tmp, os.O_RDWR | flag)
        fds.append(fd)
        temps.append(tmp)
    fil = np.array([(0, nbytes, fd) for fd in fds], dtype=np.uint64)
    with agent.files(fds):
        agent.transfer("WRITE", mem, fil, "DRAM")
    for fd in fds:
        os.close(fd)
    finals = [root / f"{tag}.{i}.kv" for i in range(len(temps))]
    for tmp, final in zip(temps, finals):
        os.rename(tmp, final)
    dt = time.perf_counter() - t0
    for i, final in enumerate(finals):  # untimed: eviction either unlinks or recycles
        if mode == "new":
            final.unlink()
        else:
            os.rename(final, pool[i])
    return dt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16], help="file sizes in MiB")
    p.add_argument("--total-mib", type=int, default=128, help="bytes written per round")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--root", default=None, help="directory on the storage to test (default: under results/)")
    p.add_argument("--out", default="results/recycled_files")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="recycle-", dir=args.root or out))
    rows = []
    try:
        for direct in (False, True):
            agent = NixlAgent("POSIX", probe_dir=base, direct_io=direct)
            for mib in args.sizes:
                nbytes, nfiles = mib << 20, max(2, args.total_mib // mib)
                buf = aligned_empty((nbytes * nfiles,), torch.uint8)
                buf.random_(0, 255)
                token = agent.register_tensor(buf, cache=False)
                mem = np.array([(buf.data_ptr() + i * nbytes, nbytes, 0) for i in range(nfiles)], dtype=np.uint64)
                pool = [base / f"pool.{i}" for i in range(nfiles)]
                for f in pool:
                    f.write_bytes(os.urandom(nbytes))
                times: dict[str, list[float]] = {"new": [], "recycled": []}
                for r in range(args.repeat):
                    for mode in times:
                        times[mode].append(one_round(agent, base, mem, nbytes, pool, mode, direct, f"{mode}{r}"))
                agent.release(token)
                for f in pool:
                    f.unlink()
                new, rec = (statistics.median(times[m]) for m in ("new", "recycled"))
                total = nbytes * nfiles
                rows.append({"io": "O_DIRECT" if direct else "buffered", "MiB": mib, "files": nfiles,
                             "new_GBps": total / new / 1e9, "recycled_GBps": total / rec / 1e9, "recycled_over_new": new / rec})
            agent.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; medians of {args.repeat}, {args.total_mib} MiB per round")
    print(f"{'I/O':9} {'MiB':>4} {'files':>5} {'new GB/s':>9} {'recycled GB/s':>14} {'recycled/new':>13}")
    for r in rows:
        print(f"{r['io']:9} {r['MiB']:>4} {r['files']:>5} {r['new_GBps']:9.2f} {r['recycled_GBps']:14.2f} {r['recycled_over_new']:13.2f}")
    path = out / f"recycled-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"rows": rows, "load": load, "args": vars(args)}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
