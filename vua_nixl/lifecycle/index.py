"""The compacted access index: what every process's access log adds up to.

    <root>/access/index.msgpack   {"v", "updated", "logs": {name: offset},
                                   "blocks": {fp_hex: {key: [last_access, hits, parent]}},
                                   "counters": {fp_hex: {hits, bytes_read, misses, ...}}}
    <root>/access/prune.lock      flock()ed by whoever compacts or evicts

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
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import msgpack

from vua_nixl.errors import VuaNixlError
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
from vua_nixl.paths import StorePaths, writer_gone

log = logging.getLogger(__name__)

INDEX_NAME = "index.msgpack"
LOCK_NAME = "prune.lock"
INDEX_VERSION = 1
#: A consumed log whose writer we cannot check (another host) is deleted after this idle time;
#: if its writer is in fact alive it notices (st_nlink == 0) and starts a new file.
LOG_IDLE_S = 60.0
COUNTER_NAMES = ("hits", "bytes_read", "misses", "chunks_written", "deletes", "evictions", "corrupt")


@contextmanager
def root_lock(root: str | os.PathLike[str]) -> Iterator[int]:
    """Exclusive lock among every process (and host, where the mount honours flock) on a root.

    Yields the lock file's descriptor: the lock file also holds the usage ledger
    (:func:`read_ledger` / :func:`write_ledger`), which may only be touched under the lock.
    """
    d = access_dir(root)
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise VuaNixlError(
                f"cannot lock {d / LOCK_NAME} ({exc.strerror}): capacity limits and pruning need a mount "
                "with flock support (local, NFSv4, NFSv3 with lockd); elsewhere run one pruner only "
                "(`vua-nixl prune --period 60` on one host) and give workers no max_bytes"
            ) from None
        yield fd
    finally:
        os.close(fd)  # closing releases the lock, also if we are killed


#: The usage ledger: bytes of blocks + in-flight writes under the root, as last set by a pruning
#: scan and moved since by every guarded put (+) and delete (-). Crashes and failed puts can only
#: make it too high (safe: it prunes early, and the next scan resets it to the truth).
_LEDGER = struct.Struct("<8sQd")
LEDGER_MAGIC = b"VNLEDG01"


def read_ledger(fd: int) -> Optional[int]:
    """The ledger's byte count, or None if no scan has set it yet (call under :func:`root_lock`)."""
    data = os.pread(fd, _LEDGER.size, 0)
    if len(data) < _LEDGER.size:
        return None
    magic, nbytes, _ = _LEDGER.unpack(data)
    return nbytes if magic == LEDGER_MAGIC else None


def write_ledger(fd: int, nbytes: int) -> None:
    os.pwrite(fd, _LEDGER.pack(LEDGER_MAGIC, max(0, int(nbytes)), time.time()), 0)


@dataclass
class AccessIndex:
    blocks: dict[str, dict[bytes, list[Any]]] = field(default_factory=dict)
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    logs: dict[str, int] = field(default_factory=dict)
    updated: float = 0.0

    # ---- persistence ---------------------------------------------------------------------

    @classmethod
    def load(cls, root: str | os.PathLike[str]) -> "AccessIndex":
        path = access_dir(root) / INDEX_NAME
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cls()
        try:
            d = msgpack.unpackb(raw, raw=False, strict_map_key=False)
            if d.get("v") != INDEX_VERSION:
                raise ValueError(f"index version {d.get('v')}")
            return cls(blocks=d["blocks"], counters=d["counters"], logs=d["logs"], updated=d.get("updated", 0.0))
        except Exception as exc:  # advisory data: a bad index is rebuilt, never fatal
            log.warning("access index %s unreadable (%s); starting a new one", path, exc)
            return cls()

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
