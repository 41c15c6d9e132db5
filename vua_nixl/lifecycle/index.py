"""The compacted access index: what every process's access log adds up to.

    <root>/access/index.msgpack   {"v", "updated", "logs": {name: offset},
                                   "blocks": {fp_hex: {key: [last_access, hits, parent]}},
                                   "counters": {fp_hex: {hits, bytes_read, misses, ...}}}
    <root>/access/prune.lock      flock()ed by whoever compacts or evicts (queues one client's processes)
    <root>/access/lease/root.<n>  the root lease, epoch n (excludes other hosts; carries the usage ledger)

The index is state on the shared root, not in any process: a restarted worker or a second host
reads it and continues. It is rewritten atomically (temp + rename) under the lock, and it is an
*advisory* structure: losing it loses recency and counters, never a block (the pruner then falls
back to file mtimes and headers). A key's parent never changes (the key hashes its parent), so a
parent learned once, from a "stored" record or from one header read, is cached for good.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import msgpack

from vua_nixl.lifecycle.accesslog import (
    CORRUPT,
    EVICTED,
    HIT,
    MISS,
    REMOVED,
    STORED,
    Record,
    access_dir,
    iter_logs,
    parse_log_name,
    read_records,
)
from vua_nixl.lifecycle.lease import LEASE_DIR, Lease, LeaseHandle
from vua_nixl.paths import StorePaths, writer_gone
from vua_nixl.safeio import read_capped

log = logging.getLogger(__name__)

#: The compacted index may be large (one entry per block), but never a device's worth.
INDEX_CAP = 1 << 30
INDEX_NAME = "index.msgpack"
LOCK_NAME = "prune.lock"
INDEX_VERSION = 1
#: A consumed log whose writer we cannot check (another host) is deleted after this idle time;
#: if its writer is in fact alive it notices (st_nlink == 0) and starts a new file.
LOG_IDLE_S = 60.0
COUNTER_NAMES = ("hits", "bytes_read", "misses", "chunks_written", "deletes", "evictions", "corrupt")


#: Defaults for the root lease (StoreConfig.lease_s / lease_margin_s / lease_wait_s).
LEASE_S = 10.0
LEASE_MARGIN_S = 5.0
LEASE_WAIT_S = 300.0
_LEASES: dict[tuple[str, int], Lease] = {}
_LEASES_LOCK = threading.Lock()


def root_lease(root: str | os.PathLike[str], *, lease_s: float = LEASE_S, margin_s: float = LEASE_MARGIN_S,
               wait_s: float = LEASE_WAIT_S) -> Lease:
    """This process's :class:`Lease` object for a root's lock (it remembers epochs it saw)."""
    key = (os.path.realpath(root), os.getpid())
    with _LEASES_LOCK:
        lease = _LEASES.get(key)
        if lease is None or (lease.lease_s, lease.margin_s, lease.wait_s) != (lease_s, margin_s, wait_s):
            lease = _LEASES[key] = Lease(access_dir(root) / LEASE_DIR, "root", lease_s=lease_s, margin_s=margin_s,
                                         wait_s=wait_s)
        return lease


class RootLock:
    """What :func:`root_lock` yields: the held lease, its fencing token and the usage ledger."""

    def __init__(self, handle: LeaseHandle, flocked: bool):
        self.handle = handle
        self.flocked = flocked

    @property
    def fencing_token(self) -> int:
        return self.handle.epoch

    def valid(self) -> bool:
        return self.handle.valid()

    def check(self) -> None:
        self.handle.check()


@contextmanager
def root_lock(root: str | os.PathLike[str], *, lease_s: float = LEASE_S, margin_s: float = LEASE_MARGIN_S,
              wait_s: float = LEASE_WAIT_S) -> Iterator[RootLock]:
    """Exclusive lock among every process and host on a root, on any POSIX-like file system.

    Two layers: ``flock(<root>/access/prune.lock)`` queues the processes of one client cheaply
    (where the mount supports it at all; on per-client lock modes it is only local), then the
    root *lease* (:mod:`vua_nixl.lifecycle.lease`: ``O_EXCL`` epoch files with renewal, expiry
    on the contender's own clock, and the epoch as fencing token) excludes other hosts. Yields a
    :class:`RootLock`; the usage ledger travels inside the lease (:func:`read_ledger` /
    :func:`write_ledger`), so a deposed holder's late ledger write is never read.
    """
    d = access_dir(root)
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    try:
        flocked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # no flock on this mount: the lease alone excludes
            flocked = False
            log.debug("flock on %s unavailable (%s); relying on the root lease", d / LOCK_NAME, exc.strerror)
        handle = root_lease(root, lease_s=lease_s, margin_s=margin_s, wait_s=wait_s).acquire()
        try:
            yield RootLock(handle, flocked)
        finally:
            handle.release()
    finally:
        os.close(fd)  # closing releases the flock, also if we are killed


#: The usage ledger: bytes of blocks + in-flight writes under the root, as last set by a pruning
#: scan (``scan``) plus what guarded puts reserved since (``since``). It is handed from lease
#: holder to lease holder (fenced by epoch). Anything malformed or inconsistent reads as "no
#: ledger", which makes the next put rescan: a forged or zeroed ledger heals at the next scan,
#: and a guard rescans at least every ``ledger_rescan_s`` whatever the ledger says.


def read_ledger(lock: RootLock) -> Optional[int]:
    """The ledger's byte count, or None if there is none or it does not add up (call under
    :func:`root_lock`)."""
    led = lock.handle.ledger
    if not isinstance(led, dict):
        return None
    vals = [led.get(k) for k in ("bytes", "scan", "since")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < (1 << 62) for v in vals):
        return None
    nbytes, scan, since = (int(v) for v in vals)  # type: ignore[arg-type]
    if nbytes != scan + since:
        return None
    return nbytes


def write_ledger(lock: RootLock, nbytes: int, *, scanned: bool = False) -> None:
    """Set the ledger (``scanned``: to a scan's truth; otherwise to a reservation on top of it)."""
    nbytes = max(0, int(nbytes))
    led = lock.handle.ledger if isinstance(lock.handle.ledger, dict) else None
    if scanned or read_ledger(lock) is None or led is None:
        lock.handle.ledger = {"bytes": nbytes, "scan": nbytes, "since": 0, "epoch": lock.fencing_token}
    else:
        scan = int(led["scan"])
        lock.handle.ledger = {"bytes": nbytes, "scan": min(scan, nbytes), "since": nbytes - min(scan, nbytes),
                              "epoch": lock.fencing_token}


@dataclass
class AccessIndex:
    blocks: dict[str, dict[bytes, list[Any]]] = field(default_factory=dict)
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    logs: dict[str, int] = field(default_factory=dict)
    updated: float = 0.0
    dropped: int = 0  # malformed entries dropped when this index was loaded

    # ---- persistence ---------------------------------------------------------------------

    @classmethod
    def load(cls, root: str | os.PathLike[str]) -> "AccessIndex":
        path = access_dir(root) / INDEX_NAME
        try:
            raw = read_capped(path, INDEX_CAP)  # no symlink, FIFO or device; bounded size
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            log.warning("access index %s unreadable (%s); starting a new one", path, exc)
            return cls()
        try:
            d = msgpack.unpackb(raw, raw=False, strict_map_key=False)
            if not isinstance(d, dict) or d.get("v") != INDEX_VERSION:
                raise ValueError(f"index version {d.get('v') if isinstance(d, dict) else None}")
            idx, dropped = _validated(d)
        except Exception as exc:  # advisory data: a bad index is rebuilt, never fatal
            log.warning("access index %s unreadable (%s); starting a new one", path, exc)
            return cls()
        if dropped:
            log.warning("access index %s: %d malformed entries dropped", path, dropped)
        idx.dropped = dropped
        return idx

    def save(self, root: str | os.PathLike[str]) -> None:
        d = access_dir(root)
        self.updated = time.time()
        body = msgpack.packb(
            {"v": INDEX_VERSION, "updated": self.updated, "blocks": self.blocks, "counters": self.counters, "logs": self.logs},
            use_bin_type=True,
        )
        tmp = StorePaths(root).tmp_file("access-index")
        with open(tmp, "wb") as f:
            f.write(body)
        os.replace(tmp, d / INDEX_NAME)

    # ---- folding records -----------------------------------------------------------------

    def counter(self, fp_hex: str) -> dict[str, int]:
        c = self.counters.get(fp_hex)
        if c is None:
            c = self.counters[fp_hex] = {name: 0 for name in COUNTER_NAMES}
        return c

    def entry(self, fp_hex: str, key: bytes) -> list[Any]:
        ns = self.blocks.setdefault(fp_hex, {})
        e = ns.get(key)
        if e is None:
            e = ns[key] = [0.0, 0, None]
        return e

    def apply(self, rec: Record) -> None:
        fp = rec.namespace.hex()
        c = self.counter(fp)
        if rec.kind == HIT:
            nbytes, count = rec.aux_u64
            count = count or 1
            e = self.entry(fp, rec.key)
            e[0] = max(e[0], rec.time)
            e[1] += count
            c["hits"] += count
            c["bytes_read"] += nbytes
        elif rec.kind == STORED:
            e = self.entry(fp, rec.key)
            e[0] = max(e[0], rec.time)
            e[2] = rec.aux
            c["chunks_written"] += 1
        elif rec.kind == MISS:
            c["misses"] += 1
        elif rec.kind in (REMOVED, EVICTED, CORRUPT):
            gone = self.blocks.get(fp, {}).get(rec.key)
            if gone is not None and gone[0] <= rec.time:  # logs fold file by file: a later re-store wins
                del self.blocks[fp][rec.key]
            c[{REMOVED: "deletes", EVICTED: "evictions", CORRUPT: "corrupt"}[rec.kind]] += 1

    def fold_logs(self, root: str | os.PathLike[str], *, consume: bool, idle_s: float = LOG_IDLE_S) -> int:
        """Apply every log's unread records; with ``consume``, delete logs that are finished.

        Must be called under :func:`root_lock` when ``consume`` is true (and the index saved
        afterwards), otherwise two pruners could count the same records twice.
        """
        n = 0
        now = time.time()
        seen = set()
        for entry in iter_logs(root):
            seen.add(entry.name)
            start = self.logs.get(entry.name, 0)
            records, end = read_records(entry.path, start)
            for rec in records:
                self.apply(rec)
            n += len(records)
            self.logs[entry.name] = end
            if consume and self._finished(entry, end, now, idle_s):
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    pass
                self.logs.pop(entry.name, None)
                seen.discard(entry.name)
        for name in list(self.logs):
            if name not in seen:
                del self.logs[name]
        return n

    @staticmethod
    def _finished(entry: os.DirEntry[str], end: int, now: float, idle_s: float) -> bool:
        try:
            st = entry.stat()
        except FileNotFoundError:
            return False
        owner = parse_log_name(entry.name)
        dead = writer_gone(owner)
        if dead:
            return True  # a torn tail of a dead writer is never completed: drop it with the file
        return st.st_size == end and now - st.st_mtime > idle_s

    # ---- queries -------------------------------------------------------------------------

    def depth(self, fp_hex: str, key: bytes, limit: int = 1 << 20) -> Optional[int]:
        """Chunks from the namespace root to ``key`` (0 = first chunk), if the chain is known."""
        ns = self.blocks.get(fp_hex, {})
        fp = bytes.fromhex(fp_hex)
        d = 0
        k = key
        while d < limit:
            e = ns.get(k)
            if e is None or e[2] is None:
                return None
            if e[2] == fp:
                return d
            k = e[2]
            d += 1
        return None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validated(d: dict[str, Any]) -> tuple["AccessIndex", int]:
    """The index in ``d`` with every malformed entry dropped (and counted), entry by entry: the
    file is on a shared root, so one bad entry must cost that entry, not the whole index."""
    dropped = 0
    blocks: dict[str, dict[bytes, list[Any]]] = {}
    raw_blocks = d.get("blocks")
    for fp, entries in (raw_blocks.items() if isinstance(raw_blocks, dict) else ()):
        if not isinstance(fp, str) or not isinstance(entries, dict):
            dropped += 1
            continue
        keep: dict[bytes, list[Any]] = {}
        for key, e in entries.items():
            ok = (isinstance(key, bytes) and len(key) == 16 and isinstance(e, (list, tuple)) and len(e) == 3
                  and isinstance(e[0], (int, float)) and not isinstance(e[0], bool) and _is_int(e[1]) and e[1] >= 0
                  and (e[2] is None or (isinstance(e[2], bytes) and len(e[2]) == 16)))
            if ok:
                keep[key] = [float(e[0]), int(e[1]), e[2]]
            else:
                dropped += 1
        blocks[fp] = keep
    counters: dict[str, dict[str, int]] = {}
    raw_counters = d.get("counters")
    for fp, c in (raw_counters.items() if isinstance(raw_counters, dict) else ()):
        if isinstance(fp, str) and isinstance(c, dict):
            counters[fp] = {k: v for k, v in c.items() if isinstance(k, str) and _is_int(v)}
            dropped += len(c) - len(counters[fp])
        else:
            dropped += 1
    raw_logs = d.get("logs")
    logs = {k: v for k, v in raw_logs.items() if isinstance(k, str) and _is_int(v) and v >= 0} if isinstance(raw_logs, dict) else {}
    updated = d.get("updated", 0.0)
    idx = AccessIndex(blocks=blocks, counters=counters, logs=logs,
                      updated=float(updated) if isinstance(updated, (int, float)) and not isinstance(updated, bool) else 0.0)
    return idx, dropped


def load_current(root: str | os.PathLike[str]) -> AccessIndex:
    """The index plus every record not yet compacted, without changing anything on disk."""
    idx = AccessIndex.load(root)
    idx.fold_logs(root, consume=False)
    return idx


def compact(root: str | os.PathLike[str], idle_s: float = LOG_IDLE_S) -> AccessIndex:
    """Fold every log into the index and delete finished logs (takes the root lock)."""
    with root_lock(root):
        idx = AccessIndex.load(root)
        idx.fold_logs(root, consume=True, idle_s=idle_s)
        idx.save(root)
        return idx


def index_path(root: str | os.PathLike[str]) -> Path:
    return access_dir(root) / INDEX_NAME
