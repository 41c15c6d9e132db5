"""`vua-nixl doctor --root R`: what this host's mount of a shared root can be trusted with.

Checks what one host can check: ``O_EXCL`` create (the root lease depends on it), ``rename``
over an existing file, ``fsync``, ``O_DIRECT``, whether ``st_blocks`` is reported (capacity
counts allocated bytes), and a full root-lease round trip. It reports the file system type,
mount options and the lock mode in use, and warns about per-client lock modes (FUSE without
lock support, Lustre ``localflock``, NFS ``local_lock=all``/``nolock``) and about attribute
caching that delays other hosts' changes. Coordination itself never relies on ``flock``
(see docs/LIFECYCLE.md), so a per-client lock mode is a warning, not an error.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass
class Check:
    name: str
    status: str
    detail: str = ""


@dataclass
class DoctorReport:
    root: str
    fstype: str = "?"
    mount_options: str = ""
    lock_mode: str = "?"
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def add(self, name: str, status: str, detail: str = "") -> None:
        self.checks.append(Check(name, status, detail))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def mount_of(path: str | os.PathLike[str]) -> tuple[str, str, str]:
    """(mount point, fs type, options) of the mount holding ``path`` (from /proc/self/mounts)."""
    real = os.path.realpath(path)
    best = ("/", "?", "")
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return best
    for line in lines:
        parts = line.split()
        if len(parts) < 4:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
            best = (mnt, parts[2], parts[3])
    return best


def lock_mode(fstype: str, options: str) -> tuple[str, Optional[str]]:
    """How ``flock`` behaves on this mount, and a warning if it is per client."""
    opts = set(options.split(","))
    kv = dict(o.split("=", 1) for o in opts if "=" in o)
    if fstype.startswith("fuse"):
        return f"{fstype}: flock is per client (FUSE)", "flock on a FUSE mount only excludes processes of this client"
    if fstype.startswith("nfs"):
        if "nolock" in opts or kv.get("local_lock") in ("all", "flock"):
            return f"nfs local_lock={kv.get('local_lock', 'all')}", "NFS locks are local to this client"
        return "nfs: flock mapped to NLM/NFSv4 byte-range locks (cluster-wide)", None
    if fstype == "lustre":
        if "localflock" in opts:
            return "lustre localflock", "Lustre localflock is per client"
        if "flock" in opts:
            return "lustre flock (cluster-coherent)", None
        return "lustre noflock", "flock fails on this Lustre mount"
    if fstype in ("ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs"):
        return f"{fstype}: local file system (coherent on this host only)", None
    return f"{fstype}: unknown", f"unknown lock semantics for {fstype}"


def caching_warning(fstype: str, options: str) -> Optional[str]:
    opts: dict[str, str] = {}
    for o in options.split(","):
        name, _, value = o.partition("=")
        opts[name] = value
    if fstype.startswith("nfs"):
        if "noac" in opts or opts.get("actimeo") == "0":
            return None
        return ("NFS attribute caching (acdirmax default 60 s) can hide other hosts' new files from a scan: "
                "the capacity bound grows by what other hosts write in that window (mount with actimeo=1 or lower)")
    if fstype == "fuse.sshfs":  # its cache options are not shown in /proc/mounts
        return "sshfs caches listings for 20 s unless mounted with -o cache=no,dir_cache=no"
    return None


def run_checks(root: str | os.PathLike[str], *, lease_s: float = 10.0, margin_s: float = 5.0) -> DoctorReport:
    """Probe ``root`` (created if missing); every probe file goes under ``<root>/tmp``."""
    from vua_nixl.lifecycle.index import root_lock  # the lease, exactly as the store uses it

    rep = DoctorReport(root=os.fspath(root))
    probe_dir = Path(root) / "tmp"
    try:
        probe_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        rep.add("root writable", FAIL, f"cannot create {probe_dir}: {exc.strerror}")
        return rep
    mnt, rep.fstype, rep.mount_options = mount_of(probe_dir)
    rep.lock_mode, warn = lock_mode(rep.fstype, rep.mount_options)
    rep.add("lock mode", WARN if warn else OK, warn or rep.lock_mode)
    cw = caching_warning(rep.fstype, rep.mount_options)
    rep.add("attribute caching", WARN if cw else OK, cw or "no long listing cache known for this mount")
    tag = f"doctor-{uuid.uuid4().hex[:12]}"
    a, b = probe_dir / f"{tag}.a.tmp", probe_dir / f"{tag}.b.tmp"
    try:
        try:
            fd = os.open(a, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.close(fd)
            try:
                os.close(os.open(a, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                rep.add("O_EXCL create", FAIL, "a second O_EXCL create of the same name succeeded: leases cannot work")
            except FileExistsError:
                rep.add("O_EXCL create", OK, "second create refused with EEXIST")
        except OSError as exc:
            rep.add("O_EXCL create", FAIL, exc.strerror or str(exc))
        try:
            b.write_bytes(b"new")
            os.replace(b, a)
            ok = a.read_bytes() == b"new" and not b.exists()
            rep.add("rename over a file", OK if ok else FAIL, "atomic replace" if ok else "content or source wrong after rename")
        except OSError as exc:
            rep.add("rename over a file", FAIL, exc.strerror or str(exc))
        try:
            fd = os.open(a, os.O_WRONLY)
            try:
                os.write(fd, b"x" * 8192)
                t0 = time.perf_counter()
                os.fsync(fd)
                rep.add("fsync", OK, f"{(time.perf_counter() - t0) * 1e3:.2f} ms")
            finally:
                os.close(fd)
            st = os.stat(a)
            if st.st_blocks:
                rep.add("allocated blocks", OK, f"st_blocks reported ({st.st_blocks * 512} B for {st.st_size} B)")
            else:
                rep.add("allocated blocks", WARN, "st_blocks is 0: capacity falls back to apparent sizes")
        except OSError as exc:
            rep.add("fsync", FAIL, exc.strerror or str(exc))
        _check_direct(probe_dir / f"{tag}.d.tmp", rep)
        try:
            t0 = time.perf_counter()
            with root_lock(root, lease_s=lease_s, margin_s=margin_s, wait_s=max(30.0, 3 * (lease_s + margin_s))) as lk:
                epoch = lk.fencing_token
                flocked = lk.flocked
            ms = (time.perf_counter() - t0) * 1e3
            rep.add("root lease", OK, f"acquired and released epoch {epoch} in {ms:.1f} ms (flock layer "
                    f"{'on' if flocked else 'unavailable'})")
        except Exception as exc:  # report, never a traceback
            rep.add("root lease", FAIL, str(exc))
    finally:
        for p in probe_dir.glob(f"{tag}.*"):
            try:
                p.unlink()
            except OSError:
                pass
    log.debug("doctor on %s (mount %s): %s", root, mnt, rep)
    return rep


def _check_direct(path: Path, rep: DoctorReport) -> None:
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        rep.add("O_DIRECT", WARN, "not defined on this platform")
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | flag, 0o644)
    except OSError as exc:
        rep.add("O_DIRECT", WARN, f"open refused ({exc.strerror}): direct_io and GDS unavailable here")
        return
    try:
        import mmap

        buf = mmap.mmap(-1, 4096)
        buf.write(b"\0" * 4096)
        os.write(fd, buf)
        rep.add("O_DIRECT", OK, "aligned 4 KiB write accepted")
    except OSError as exc:
        status = WARN if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP) else FAIL
        rep.add("O_DIRECT", status, f"aligned write failed ({exc.strerror})")
    finally:
        os.close(fd)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("doctor", help="check that a shared root's mount supports vua-nixl's coordination",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="store root (env VUA_NIXL_ROOT)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    from vua_nixl.config import StoreConfig

    cfg = StoreConfig(**({"root": args.root} if args.root else {}))
    rep = run_checks(cfg.root, lease_s=cfg.lease_s, margin_s=cfg.lease_margin_s)
    if args.json:
        print(json.dumps(rep.as_dict(), indent=2))
    else:
        from vua_nixl.tables import print_table

        print_table(["check", "status", "detail"], [[c.name, c.status, c.detail] for c in rep.checks],
                    title=f"{rep.root}: {rep.fstype} ({rep.lock_mode})")
    return 0 if rep.ok else 1
