"""Leases: mutual exclusion between hosts that needs nothing but ``O_CREAT|O_EXCL`` and reads.

``flock`` is per client on FUSE mounts without lock support (sshfs), on Lustre with
``localflock`` and on NFS with ``local_lock=all``: every host then "holds" the lock. A lease
here is a sequence of files, one per *epoch*::

    <root>/access/lease/<name>.<epoch:012d>

Holding epoch ``k`` means having created file ``k`` (``O_EXCL``, atomic on local file systems,
NFSv3+ and FUSE network file systems) while file ``k+1`` does not exist. The file holds a small
checksummed record: owner token, holder identity, renewal counter, state (held / released) and
the *usage ledger* the holder hands to its successor. Acquire = read the newest file; if it is
released, or expired, create the next one. Nothing is ever deleted to take a lease over, so
there is no check-then-delete race; old epochs are removed by later holders.

**Expiry without trusting clocks.** A holder renews by rewriting its record with a higher
counter every ``lease_s / 3`` (a shared renewer thread). A contender breaks a lease only after
it has seen the *same* record for ``lease_s + margin_s`` on its *own* monotonic clock, so a host
whose wall clock is skewed by any amount neither breaks a live lease early nor keeps a dead one;
only clock *rate* differences matter, and ``margin_s`` covers those. A holder whose own last
renewal is older than ``lease_s`` stops trusting its lease (:meth:`LeaseHandle.valid`). A holder
that is provably dead (same boot and PID namespace, pid gone) is broken at once.

**Fencing.** The epoch is the fencing token: the ledger is passed from epoch ``k`` to ``k+1``
only through file ``k``, read once when ``k+1`` is created. A deposed holder (paused longer than
the lease) can still write file ``k`` afterwards, but no one reads it again: its late ledger
writes are rejected by construction.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import struct
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import msgpack
import xxhash

from vua_nixl.errors import VuaNixlError
from vua_nixl.paths import namespace_id, pid_alive, this_host

log = logging.getLogger(__name__)

LEASE_DIR = "lease"
_MAGIC = b"VNLS"
_HEAD = struct.Struct("<4sIQ")  # magic, body length, xxh64 of body
_MAX_RECORD = 4096
_EPOCH_DIGITS = 12


class LeaseError(VuaNixlError):
    """A lease could not be acquired in time, or was lost while held."""


Clock = Callable[[], float]


@dataclass
class LeaseRecord:
    """What a lease file says (decoded); ``raw`` is the bytes it was decoded from."""

    epoch: int
    token: str = ""
    host: str = ""
    ns: str = ""
    pid: int = 0
    seq: int = 0
    state: str = "held"
    ledger: Optional[dict[str, Any]] = None
    wall: float = 0.0
    raw: bytes = b""

    def encode(self) -> bytes:
        body = msgpack.packb({"v": 1, "epoch": self.epoch, "token": self.token, "host": self.host, "ns": self.ns,
                              "pid": self.pid, "seq": self.seq, "state": self.state, "ledger": self.ledger,
                              "wall": self.wall}, use_bin_type=True)
        return _HEAD.pack(_MAGIC, len(body), xxhash.xxh64_intdigest(body)) + body

    @classmethod
    def decode(cls, epoch: int, raw: bytes) -> Optional["LeaseRecord"]:
        """The record, or None for an empty, torn or foreign file (never raises)."""
        if len(raw) < _HEAD.size:
            return None
        magic, n, digest = _HEAD.unpack_from(raw)
        body = raw[_HEAD.size: _HEAD.size + n]
        if magic != _MAGIC or len(body) != n or xxhash.xxh64_intdigest(body) != digest:
            return None
        try:
            d = msgpack.unpackb(body, raw=False)
            ledger = d.get("ledger")
            rec = cls(epoch=epoch, token=str(d["token"]), host=str(d["host"]), ns=str(d["ns"]), pid=int(d["pid"]),
                      seq=int(d["seq"]), state=str(d["state"]), ledger=ledger if isinstance(ledger, dict) else None,
                      wall=float(d.get("wall", 0.0)), raw=raw)
        except Exception:  # hostile but well-checksummed content: treat as torn
            return None
        return rec if rec.epoch == int(d.get("epoch", -1)) else None


def _lease_name(name: str, epoch: int) -> str:
    return f"{name}.{epoch:0{_EPOCH_DIGITS}d}"


def _parse_epoch(name: str, fname: str) -> Optional[int]:
    prefix = name + "."
    if not fname.startswith(prefix):
        return None
    digits = fname[len(prefix):]
    if len(digits) != _EPOCH_DIGITS or not (digits.isascii() and digits.isdigit()):
        return None
    return int(digits)


@dataclass(eq=False)
class LeaseHandle:
    """A held lease (epoch ``epoch``). ``ledger`` is what the predecessor handed over (None if
    unknown); set :attr:`ledger` before release to hand it on."""

    lease: "Lease"
    epoch: int
    token: str
    fd: int
    ledger: Optional[dict[str, Any]]
    renewed_at: float
    seq: int = 0
    released: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def fencing_token(self) -> int:
        return self.epoch

    def valid(self) -> bool:
        """Whether this holder may still act (its last renewal is younger than the lease)."""
        return not self.released and self.lease.clock() - self.renewed_at < self.lease.lease_s

    def check(self) -> None:
        if not self.valid():
            raise LeaseError(f"lease {self.lease.path(self.epoch)} lost (not renewed for {self.lease.lease_s} s)")

    def _write(self, state: str) -> None:
        rec = LeaseRecord(epoch=self.epoch, token=self.token, host=this_host(), ns=namespace_id(), pid=os.getpid(),
                          seq=self.seq, state=state, ledger=self.ledger, wall=time.time())
        data = rec.encode()
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)  # NFS: make it visible to the next open on another client

    def renew(self) -> None:
        with self.lock:
            if self.released:
                return
            self.seq += 1
            self._write("held")
            self.renewed_at = self.lease.clock()

    def release(self) -> None:
        with self.lock:
            if self.released:
                return
            self.released = True
            try:
                self.seq += 1
                self._write("released")
            except OSError as exc:  # the successor waits for expiry instead
                log.warning("cannot release lease %s: %s", self.lease.path(self.epoch), exc)
            finally:
                os.close(self.fd)
        _RENEWER.forget(self)


class Lease:
    """One named lease on a shared root (see the module docstring).

    ``clock`` is the monotonic clock used for expiry; tests pass a fake one to model a host
    whose clock is skewed or runs fast.
    """

    def __init__(self, directory: str | os.PathLike[str], name: str = "root", *, lease_s: float = 10.0,
                 margin_s: float = 5.0, wait_s: float = 300.0, poll_s: float = 0.002, max_poll_s: float = 0.05,
                 clock: Clock = time.monotonic, file_mode: int = 0o644):
        if lease_s <= 0 or margin_s < 0:
            raise LeaseError("lease_s must be positive and margin_s non-negative")
        self.dir = Path(directory)
        self.name = name
        self.lease_s = lease_s
        self.margin_s = margin_s
        self.wait_s = wait_s
        self.poll_s = poll_s
        self.max_poll_s = max_poll_s
        self.clock = clock
        self.file_mode = file_mode
        self._known = 0  # newest epoch this process has seen
        self._seen: dict[int, tuple[bytes, float]] = {}  # epoch -> (record bytes, first seen at)
        self.broken = 0  # leases this process took over after expiry or a dead holder
        self.waits = 0

    def path(self, epoch: int) -> Path:
        return self.dir / _lease_name(self.name, epoch)

    # ---- reading -------------------------------------------------------------------------

    def _read(self, epoch: int) -> Optional[bytes]:
        """Raw bytes of file ``epoch``, or None if it does not exist."""
        try:
            fd = os.open(self.path(epoch), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO):
                return b""  # not a regular file: foreign; expires like a torn record
            raise
        try:
            return os.pread(fd, _MAX_RECORD, 0)
        finally:
            os.close(fd)

    def newest_epoch(self) -> int:
        """The highest epoch present (0 if none), from a directory listing (may be stale; the
        ``O_EXCL`` walk in :meth:`acquire` corrects it)."""
        best = 0
        try:
            with os.scandir(self.dir) as it:
                for e in it:
                    ep = _parse_epoch(self.name, e.name)
                    if ep is not None and ep > best:
                        best = ep
        except FileNotFoundError:
            pass
        return best

    def _expired(self, epoch: int, raw: bytes, rec: Optional[LeaseRecord], now: float) -> bool:
        if rec is not None and rec.host == this_host() and rec.ns == namespace_id() and rec.pid != os.getpid() \
                and not pid_alive(rec.pid):
            return True  # its holder is provably dead (same boot and PID namespace, pid gone)
        seen = self._seen.get(epoch)
        if seen is None or seen[0] != raw:
            self._seen[epoch] = (raw, now)
            return False
        return now - seen[1] >= self.lease_s + self.margin_s

    # ---- acquiring -----------------------------------------------------------------------

    def acquire(self) -> LeaseHandle:
        self.dir.mkdir(parents=True, exist_ok=True)
        deadline = self.clock() + self.wait_s
        k = max(self._known, self.newest_epoch())
        delay = self.poll_s
        while True:
            raw = self._read(k) if k > 0 else b"free"
            if raw is None:  # cleaned up (or never existed): find the newest again
                newest = self.newest_epoch()
                if newest > k:
                    k = newest
                    continue
                raw = b"free"  # nothing newer: this epoch is free to succeed
            rec = LeaseRecord.decode(k, raw) if raw != b"free" else None
            now = self.clock()
            free = raw == b"free" or (rec is not None and rec.state == "released")
            if free or self._expired(k, raw, rec, now):
                handle = self._create(k + 1, rec.ledger if rec is not None else None)
                if handle is not None:
                    if not free:
                        self.broken += 1
                        log.warning("took over lease %s: holder %s expired or dead", self.path(k),
                                    f"{rec.host}/{rec.pid}" if rec else "unknown")
                    self._cleanup(k + 1)
                    return handle
                k += 1  # someone else created k+1 first: look at theirs
                delay = self.poll_s
                continue
            if now >= deadline:
                raise LeaseError(f"lease {self.path(k)} held by {rec.host if rec else '?'}/{rec.pid if rec else '?'} "
                                 f"for more than {self.wait_s} s")
            self.waits += 1
            time.sleep(delay)
            delay = min(delay * 2, self.max_poll_s)

    def _create(self, epoch: int, ledger: Optional[dict[str, Any]]) -> Optional[LeaseHandle]:
        path = self.path(epoch)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, self.file_mode)
        except FileExistsError:
            self._known = max(self._known, epoch)
            return None
        except PermissionError:
            # sshfs (SFTP) reports "exists" for an O_EXCL create as a generic failure (EPERM)
            # when its client had not seen the file yet: it lost the race all the same.
            if not os.path.lexists(path):
                raise
            self._known = max(self._known, epoch)
            return None
        h = LeaseHandle(self, epoch, secrets.token_hex(8), fd, ledger, self.clock())
        try:
            h._write("held")
        except OSError:
            os.close(fd)
            raise
        self._known = epoch
        self._seen = {e: v for e, v in self._seen.items() if e >= epoch - 1}
        _RENEWER.track(h)
        return h

    def _cleanup(self, epoch: int) -> None:
        """Remove epochs older than the predecessor (best effort; they are never read again)."""
        for old in (epoch - 2, epoch - 3):
            if old > 0:
                try:
                    os.unlink(self.path(old))
                except OSError:
                    pass
        if epoch % 64 == 0:  # now and then, sweep leftovers of crashed cleanups
            try:
                with os.scandir(self.dir) as it:
                    for e in it:
                        ep = _parse_epoch(self.name, e.name)
                        if ep is not None and ep < epoch - 3:
                            try:
                                os.unlink(e.path)
                            except OSError:
                                pass
            except OSError:
                pass


class _Renewer:
    """One daemon thread per process renewing every held lease every ``lease_s / 3``."""

    def __init__(self) -> None:
        self._held: "weakref.WeakSet[LeaseHandle]" = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._pid = 0

    def track(self, h: LeaseHandle) -> None:
        with self._lock:
            self._held.add(h)
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._loop, name="vua-nixl-lease", daemon=True)
                self._thread.start()

    def forget(self, h: LeaseHandle) -> None:
        with self._lock:
            self._held.discard(h)

    def _loop(self) -> None:
        while True:
            time.sleep(0.05)
            with self._lock:
                held = list(self._held)
            for h in held:
                if h.released or h.lease.clock() - h.renewed_at < h.lease.lease_s / 3:
                    continue
                try:
                    h.renew()
                except OSError as exc:
                    log.warning("cannot renew lease %s: %s", h.lease.path(h.epoch), exc)


_RENEWER = _Renewer()
