"""Append-only access log: how recency and popularity are recorded without touching block files.

Rewriting a block file (or even its mtime) on every hit would cost a metadata write per chunk
per request on a shared file system, and ``atime`` is off (``noatime``/``relatime``) on most
mounts that matter. Instead every process appends small fixed-size records to its *own* file:

    <root>/access/<host>.<pid>.<ns>-<random>.log   (<ns>: boot + PID namespace, see paths.namespace_id)

One writer per file means no cross-host append races (``O_APPEND`` is not atomic on NFS), and a
torn tail left by a SIGKILL is harmless: readers only take whole 64-byte records, each of which
carries a magic. Records are buffered and written in batches (``batch`` records or ``flush_s``
seconds, whichever comes first), so a hit costs a dict update on the request path; hits are
aggregated per key within a batch (one record carries a count), so a hot prefix costs one
64-byte record per flush, not one per request.

The pruner (:mod:`vua_nixl.lifecycle.index`) folds these files into a compacted index and
deletes files it has fully consumed; a writer that finds its file unlinked (``st_nlink == 0``)
starts a new one, so at most one in-flight batch of recency information can be lost.
"""

from __future__ import annotations

import atexit
import logging
import os
import struct
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from vua_nixl.paths import WriterId, namespace_id, note_odd_name, parse_pid, this_host
from vua_nixl.safeio import open_regular

log = logging.getLogger(__name__)

ACCESS_DIR = "access"
LOG_SUFFIX = ".log"
RECORD_MAGIC = b"VAL1"
#: magic, kind, pad, unix time, namespace fingerprint, key, aux (parent key or counters)
_RECORD = struct.Struct("<4sB3xd16s16s16s")
RECORD_BYTES = _RECORD.size  # 64
_ZERO16 = bytes(16)
#: A writer starts a new file past this size so consumed files can be deleted whole.
ROTATE_BYTES = 4 << 20

# Record kinds.
STORED = ord("S")  # key written by this process; aux = parent key
HIT = ord("H")  # key loaded; aux = (bytes read, times loaded; 0 means 1), aggregated per batch
MISS = ord("M")  # a load matched nothing; aux = (requested tokens, matched tokens)
REMOVED = ord("R")  # key deleted by a caller (store.delete)
EVICTED = ord("E")  # key evicted by policy (written by the pruner before unlinking)
CORRUPT = ord("C")  # key quarantined by a reader

KIND_NAMES = {STORED: "stored", HIT: "hit", MISS: "miss", REMOVED: "removed", EVICTED: "evicted", CORRUPT: "corrupt"}


@dataclass(frozen=True)
class Record:
    kind: int
    time: float
    namespace: bytes
    key: bytes
    aux: bytes

    @property
    def aux_u64(self) -> tuple[int, int]:
        return struct.unpack("<QQ", self.aux)


def pack(kind: int, t: float, namespace: bytes, key: bytes = _ZERO16, aux: bytes = _ZERO16) -> bytes:
    return _RECORD.pack(RECORD_MAGIC, kind, t, namespace, key, aux)


def u64_pair(a: int, b: int = 0) -> bytes:
    return struct.pack("<QQ", max(0, int(a)), max(0, int(b)))


def access_dir(root: str | os.PathLike[str]) -> Path:
    return Path(root) / ACCESS_DIR


def read_records(path: str | os.PathLike[str], offset: int = 0) -> tuple[list[Record], int]:
    """Whole records of a log from ``offset``; return them and the offset after the last one.

    A torn final record (writer killed mid-write) is left for later: the returned offset stops
    before it, and if the writer is dead the file is eventually removed with it unread.
    Records with a bad magic are skipped (they can only come from foreign bytes in the file).
    """
    try:
        fd = open_regular(path)  # a FIFO or symlink planted in access/ must not hang a reader
    except FileNotFoundError:
        return [], offset
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, max(0, size - offset), offset) if size > offset else b""
    finally:
        os.close(fd)
    whole = len(data) - len(data) % RECORD_BYTES
    out: list[Record] = []
    for pos in range(0, whole, RECORD_BYTES):
        magic, kind, t, ns, key, aux = _RECORD.unpack_from(data, pos)
        if magic != RECORD_MAGIC or kind not in KIND_NAMES:
            continue
        out.append(Record(kind, t, ns, key, aux))
    return out, offset + whole


def parse_log_name(name: str) -> Optional[WriterId]:
    """The writer of a log ``<host>.<pid>.<ns>-<rand>.log``, or None if the name is not a log of
    ours. Total: never raises, whatever the name (a huge or non-ASCII "pid" is not ours)."""
    if not name.endswith(LOG_SUFFIX):
        return None
    parts = name[: -len(LOG_SUFFIX)].split(".")
    if len(parts) != 3 or not parts[0]:
        return None
    pid = parse_pid(parts[1])
    if pid is None:
        return None
    ns = parts[2].split("-", 1)[0] if "-" in parts[2] else None
    return WriterId(parts[0], pid, ns if ns and len(ns) == 12 and all(c in "0123456789abcdef" for c in ns) else None)


def iter_logs(root: str | os.PathLike[str]) -> Iterator[os.DirEntry[str]]:
    """Every access log under ``root``; other ``*.log`` names are skipped and counted."""
    d = access_dir(root)
    entries = []
    try:
        with os.scandir(d) as it:
            for e in it:
                if parse_log_name(e.name) is not None:
                    entries.append(e)
                elif e.name.endswith(LOG_SUFFIX):
                    note_odd_name("access log", e.name)
    except FileNotFoundError:
        return
    yield from sorted(entries, key=lambda e: e.name)


class AccessLog:
    """This process's append-only log under one root. Thread-safe; cheap to call per request.

    One instance per (root, process) is enough; :func:`shared_log` hands out that instance.
    """

    def __init__(self, root: str | os.PathLike[str], *, batch: int = 256, flush_s: float = 1.0, file_mode: int = 0o644):
        self.dir = access_dir(root)
        self.batch = batch
        self.flush_s = flush_s
        self.file_mode = file_mode
        self._buf: list[bytes] = []
        # hits are aggregated per key between flushes: a hot prefix costs one record per batch
        self._hits: dict[tuple[bytes, bytes], list[Any]] = {}
        self._lock = threading.Lock()
        self._fd: Optional[int] = None
        self._pid = os.getpid()
        self._size = 0
        self._last_flush = time.monotonic()
        self.path: Optional[str] = None
        self.dropped = 0  # records lost to I/O errors (recency only; never affects correctness)

    def record(self, kind: int, namespace: bytes, key: bytes = _ZERO16, aux: bytes = _ZERO16, t: Optional[float] = None) -> None:
        rec = pack(kind, time.time() if t is None else t, namespace, key, aux)
        with self._lock:
            self._buf.append(rec)
            if len(self._buf) >= self.batch or time.monotonic() - self._last_flush >= self.flush_s:
                self._flush_locked()

    def record_many(self, kind: int, namespace: bytes, keys: Sequence[bytes], auxes: Optional[Sequence[bytes]] = None) -> None:
        t = time.time()
        recs = [pack(kind, t, namespace, k, auxes[i] if auxes else _ZERO16) for i, k in enumerate(keys)]
        with self._lock:
            self._buf.extend(recs)
            if len(self._buf) >= self.batch or time.monotonic() - self._last_flush >= self.flush_s:
                self._flush_locked()

    def hits(self, namespace: bytes, keys: Sequence[bytes], nbytes_each: int) -> None:
        """Count a load of ``keys`` (aggregated in memory until the next flush)."""
        t = time.time()
        with self._lock:
            for k in keys:
                e = self._hits.get((namespace, k))
                if e is None:
                    self._hits[(namespace, k)] = [1, nbytes_each, t]
                else:
                    e[0] += 1
                    e[1] += nbytes_each
                    e[2] = t
            if len(self._buf) + len(self._hits) >= self.batch or time.monotonic() - self._last_flush >= self.flush_s:
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def close(self) -> None:
        with self._lock:
            self._flush_locked()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _open_locked(self) -> int:
        if self._pid != os.getpid():  # forked child: never append to the parent's file
            self._fd, self._pid = None, os.getpid()
        if self._fd is not None:
            try:
                st = os.fstat(self._fd)
                if st.st_nlink > 0 and self._size < ROTATE_BYTES:
                    return self._fd
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = str(self.dir / f"{this_host()}.{os.getpid()}.{namespace_id()}-{uuid.uuid4().hex[:8]}{LOG_SUFFIX}")
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, self.file_mode)
        self._size = 0
        return self._fd

    def _flush_locked(self) -> None:
        self._last_flush = time.monotonic()
        if self._hits:
            self._buf.extend(pack(HIT, t, ns, k, u64_pair(nbytes, count)) for (ns, k), (count, nbytes, t) in self._hits.items())
            self._hits.clear()
        if not self._buf:
            return
        data = b"".join(self._buf)
        n = len(self._buf)
        self._buf.clear()
        try:
            fd = self._open_locked()
            written = os.write(fd, data)
            self._size += written
            if written != len(data):
                raise OSError("short write")
        except OSError as exc:
            # Recency is advisory: losing a batch makes eviction slightly less accurate, never
            # wrong. Start a fresh file so a torn record cannot misalign later appends.
            self.dropped += n
            log.warning("access log append failed (%s); %d records dropped", exc, n)
            if self._fd is not None:
                try:
                    os.close(self._fd)
                except OSError:
                    pass
                self._fd = None


_LOGS: dict[tuple[str, int], AccessLog] = {}
_LOGS_LOCK = threading.Lock()


def shared_log(root: str | os.PathLike[str], file_mode: int = 0o644) -> AccessLog:
    """The process-wide :class:`AccessLog` for ``root`` (flushed at interpreter exit)."""
    key = (os.path.realpath(root), os.getpid())
    with _LOGS_LOCK:
        alog = _LOGS.get(key)
        if alog is None:
            alog = _LOGS[key] = AccessLog(root, file_mode=file_mode)
            atexit.register(_flush_at_exit, weakref.ref(alog))
        return alog


def _flush_at_exit(ref: "weakref.ref[AccessLog]") -> None:
    alog = ref()
    if alog is not None:
        try:
            alog.close()
        except Exception:  # interpreter shutdown: nothing useful to do
            pass


class LogFollower:
    """Tails every process's access log under a root: the one event log of a shared root.

    Consumers that must learn what *other* processes stored or removed (the Dynamo shared-tier
    advertiser) follow these files instead of keeping a second journal. Only whole records are
    taken; a file the pruner consumed and deleted is forgotten (records in it that this follower
    never read are lost, so consumers re-check what they advertise with a bounded background
    sweep and can reseed from the compacted index).
    """

    def __init__(self, root: str | os.PathLike[str], namespace: Optional[bytes] = None):
        self.root = root
        self.namespace = namespace
        self._offsets: dict[str, int] = {}

    def read_new(self, kinds: Optional[set[int]] = None) -> list[Record]:
        """Records appended since the previous call (every readable one at first)."""
        out: list[Record] = []
        seen: set[str] = set()
        for entry in iter_logs(self.root):
            seen.add(entry.name)
            try:
                recs, end = read_records(entry.path, self._offsets.get(entry.name, 0))
            except OSError:
                continue
            self._offsets[entry.name] = end
            out.extend(r for r in recs if (self.namespace is None or r.namespace == self.namespace)
                       and (kinds is None or r.kind in kinds))
        for name in [n for n in self._offsets if n not in seen]:
            del self._offsets[name]
        return out
