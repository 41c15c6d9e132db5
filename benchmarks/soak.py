#!/usr/bin/env python
"""Soak: N processes hammer one shared root with a byte limit while faults are injected.

Workers do random put / get / get_many / lookup / delete / evict; the parent SIGKILLs a random
worker every --kill-interval seconds (and starts a replacement), plants truncated and bit-flipped
block files under the readers every --plant-interval seconds; workers inject EIO and ENOSPC via
the NIXL agent's fault hook. Every load is compared with the exact KV of its prefix. At the end
the root is audited against every process's journal (see vua_nixl/testing/chaos.py).

    # smoke (about a minute with process start-up)
    .venv/bin/python benchmarks/soak.py
    # the multi-minute run
    .venv/bin/python benchmarks/soak.py --seconds 300 --workers 4 --json results/soak-300s.json
    # on a real, small tmpfs so a capacity overshoot would show up as real ENOSPC (root only)
    .venv/bin/python benchmarks/soak.py --seconds 120 --tmpfs-mib 3
    # two (or N) clients of one export: sshfs mounts over loopback (root, sshfs, openssh-server)
    .venv/bin/python benchmarks/soak.py --seconds 120 --workers 4 --two-clients --max-bytes 384KiB

Exit status 0 only if wrong KV served, chunks lost, bad unplanted blocks and unplanted
quarantines are all zero.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vua_nixl.config import parse_size
from vua_nixl.testing.chaos import ChaosConfig, render, run_chaos

FILE_BYTES = 6144  # one chaos chunk: 4 KiB header area + 2 KiB of KV


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0, help="measured run time, after workers are up (default 20)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--max-bytes", type=parse_size, default=128 * FILE_BYTES, help="byte limit of the root (default 128 chunks)")
    p.add_argument("--families", type=int, default=12, help="prefix families (working set: ~families * 40 chunks)")
    p.add_argument("--kill-interval", type=float, default=5.0, help="SIGKILL a random worker this often (0: never)")
    p.add_argument("--plant-interval", type=float, default=0.5, help="plant a damaged block this often (0: never)")
    p.add_argument("--eio-rate", type=float, default=0.02, help="probability of EIO per transfer")
    p.add_argument("--enospc-rate", type=float, default=0.01, help="probability of ENOSPC per write transfer")
    p.add_argument("--refresh", type=float, default=1.0, help="capacity guard usage refresh period (s)")
    p.add_argument("--hosts", type=int, default=2, help="workers pretend to be on this many hosts")
    p.add_argument("--prune-period", type=float, default=1.0, help="background pruner period in half the workers (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=None, help="directory for the store and journals (default: a new temp dir)")
    p.add_argument("--tmpfs-mib", type=int, default=None, help="mount a tmpfs of this size for the store root (root only)")
    p.add_argument("--clients", type=int, default=0,
                   help="run through this many sshfs mounts of one export (loopback sshd; root, sshfs, "
                        "openssh-server): each mount is a separate client, workers are spread over them")
    p.add_argument("--two-clients", action="store_const", const=2, dest="clients", help="same as --clients 2")
    p.add_argument("--lease", type=float, default=2.0, help="root lease seconds (VUA_NIXL_LEASE_S) in the workers")
    p.add_argument("--lease-margin", type=float, default=1.0, help="root lease margin seconds")
    p.add_argument("--recycle-pool", type=parse_size, default=0,
                   help="recycle pool of every worker's pruner (e.g. 192KiB; default 0: eviction unlinks)")
    p.add_argument("--recycle-after", type=float, default=1.0, help="seconds a pooled file rests before a put overwrites it")
    p.add_argument("--json", default="results/soak.json", help="where to write the report")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("nixl").setLevel(logging.ERROR)
    logging.getLogger("vua_nixl").setLevel(logging.ERROR)

    base = Path(args.root or tempfile.mkdtemp(prefix="vua-nixl-soak-"))
    store_root = base / "root"
    store_root.mkdir(parents=True, exist_ok=True)
    mounted = False
    clients = None
    if args.clients:
        from vua_nixl.testing.sshfs import SshfsClients, unavailable

        why = unavailable()
        if why:
            print(f"cannot run --clients: {why}", file=sys.stderr)
            return 2
        clients = SshfsClients(args.clients, base / "sshfs")
        clients.start()
        store_root = clients.export
    if args.tmpfs_mib:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.tmpfs_mib}m", "tmpfs", str(store_root)],
                           capture_output=True, text=True)
        if r.returncode:
            print(f"cannot mount a tmpfs: {r.stderr.strip()}", file=sys.stderr)
            return 2
        mounted = True
    cfg = ChaosConfig(
        root=str(store_root), journal_dir=str(base / "journal"), seconds=args.seconds, workers=args.workers,
        max_bytes=args.max_bytes, families=args.families, kill_interval_s=args.kill_interval,
        plant_interval_s=args.plant_interval, eio_rate=args.eio_rate, enospc_rate=args.enospc_rate,
        refresh_s=args.refresh, seed=args.seed, hosts=args.hosts, prune_period_s=args.prune_period,
        client_roots=[str(m) for m in clients.mounts] if clients else [], lease_s=args.lease,
        lease_margin_s=args.lease_margin, recycle_pool_bytes=args.recycle_pool, recycle_after_s=args.recycle_after,
    )
    try:
        t0 = time.time()
        rep = run_chaos(cfg)
        wall = time.time() - t0
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(store_root)], check=False)
        if clients is not None:
            clients.close()
    render(rep)
    out = {
        "command": " ".join([os.path.basename(sys.argv[0]), *(argv if argv is not None else sys.argv[1:])]),
        "config": {k: v for k, v in vars(cfg).items() if k not in ("root", "journal_dir")},
        "tmpfs_mib": args.tmpfs_mib, "clients": args.clients, "wall_seconds": wall, "ok": rep.ok, **rep.as_dict(),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"report written to {args.json}")
    print("PASS" if rep.ok else "FAIL")
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
