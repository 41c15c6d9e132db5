"""Capacity guard: the store observer that makes room before a put writes anything."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Sequence

from vua_nixl.errors import CapacityError
from vua_nixl.lifecycle.index import read_ledger, write_ledger
from vua_nixl.lifecycle.pruner import INFLIGHT, RESERVE_KEY, Pruner
from vua_nixl.store.observers import StoreObserver

if TYPE_CHECKING:
    from vua_nixl.store import KVStore

log = logging.getLogger(__name__)


class CapacityGuard(StoreObserver):
    """Store observer that makes room before a put writes anything.

    **Root limit (``max_bytes``): check-and-reserve under the root lock.** ``before_write``
    takes the root lock (local flock + the cross-host root lease), reads the usage ledger handed
    over inside the lease (a malformed or inconsistent ledger reads as none; at least every
    ``ledger_rescan_s`` this process rescans anyway, so a forged ledger heals), and if
    ``ledger + nbytes`` exceeds the limit runs the pruner right there (which rescans the root,
    evicts down to its low-water mark and resets the ledger to the truth: blocks plus in-flight
    temporaries); then it adds ``nbytes`` and releases the lock. Deletes do not subtract (a delete
    unlinks before it can take the lock, so a scan in between would make the subtraction count
    twice); they, and failed or crashed puts, leave the ledger too high, which only makes the
    next put rescan early.
    What can still overshoot: a put that reserved but has not yet created its temporaries when
    another process's pruning scan resets the ledger (a window of microseconds of CPU, longer
    only if the process is descheduled), and writers that do not use a guard. One flock per put
    costs a lock round trip, small next to writing a block.

    **Namespace and group limits:** a usage estimate (this process's last scan, blocks and
    temporaries, plus its own writes since), refreshed when older than ``refresh_s``, or when
    within ``1 - rescan_fraction`` of a limit and older than ``near_refresh_s``. These can be
    exceeded by what other processes start writing inside that stale window.

    A put larger than any limit raises :class:`CapacityError` and writes nothing.
    """

    def __init__(self, pruner: Pruner, *, refresh_s: float = 2.0, rescan_fraction: float = 0.95, near_refresh_s: float = 0.1,
                 ledger_rescan_s: float = 30.0):
        self.pruner = pruner
        self.ledger_rescan_s = ledger_rescan_s
        self._ledger_scanned_at = float("-inf")
        self.refresh_s = refresh_s
        self.rescan_fraction = rescan_fraction
        self.near_refresh_s = near_refresh_s
        self._lock = threading.Lock()
        self._usage: dict[str, int] = {}
        self._scanned_at = float("-inf")
        self._local = threading.local()  # this thread's reservation file, if any
        self.evictions = 0
        self.prunes = 0
        self._stores: dict[str, "KVStore"] = {}
        pruner.on_evict.append(self._notify)

    def _limits(self, fp: str) -> list[tuple[Any, int]]:
        """(scope, limit) pairs that apply to a put into namespace ``fp``: None is the whole
        root, a str one namespace, a frozenset a group of namespaces."""
        out: list[tuple[Any, int]] = []
        if self.pruner.max_bytes is not None:
            out.append((None, self.pruner.max_bytes))
        if fp in self.pruner.namespace_max_bytes:
            out.append((fp, self.pruner.namespace_max_bytes[fp]))
        for fps, limit in self.pruner.group_max_bytes.values():
            if fp in fps:
                out.append((fps, limit))
        return out

    def _used(self, scope: Any) -> int:
        if scope is None:
            return sum(self._usage.values())
        if isinstance(scope, frozenset):
            return sum(self._usage.get(f, 0) for f in scope)
        return self._usage.get(scope, 0)

    def before_write(self, store: "KVStore", nbytes: int) -> None:
        fp = store.fp_hex
        limits = self._limits(fp)
        if not limits:
            return
        for scope, limit in limits:
            if nbytes > limit:
                if scope is None:
                    where = "the store root"
                elif isinstance(scope, frozenset):
                    where = "group " + next(n for n, (f, _) in self.pruner.group_max_bytes.items() if f == scope)
                else:
                    where = f"namespace {scope[:12]}"
                raise CapacityError(f"put of {nbytes} bytes exceeds the capacity of {where} ({limit} bytes)")
        with self._lock:
            self._stores[fp] = store
            scoped = [(sc, lim) for sc, lim in limits if sc is not None]
            if scoped:
                self._check_scoped(fp, nbytes, scoped)
            if self.pruner.max_bytes is not None:
                self._reserve(fp, nbytes, self.pruner.max_bytes)

    def _reserve(self, fp: str, nbytes: int, limit: int) -> None:
        """Root limit: check and reserve atomically against the shared ledger (one flock).

        The reservation is also made visible as a sparse temporary of ``nbytes`` (it occupies no
        blocks), so a pruning scan in another process that resets the ledger before this put has
        created its own temporaries still counts it. It is removed when the put is published
        (``on_stored``), by this thread's next put if this one failed, or by gc if we die.
        """
        self._drop_reservation()
        with self.pruner.lock() as lock:
            used = read_ledger(lock)
            stale = time.monotonic() - self._ledger_scanned_at > self.ledger_rescan_s
            if used is None or stale or used + nbytes > limit:  # no/invalid ledger, periodic check, or full
                self.pruner.run_locked(lock, need_bytes=nbytes, need_namespace=fp)
                self.prunes += 1
                self._ledger_scanned_at = time.monotonic()
                used = read_ledger(lock) or 0
            lock.check()  # a holder paused past its lease must not reserve on a stale ledger
            write_ledger(lock, used + nbytes)
            path = self.pruner.paths.tmp_file(RESERVE_KEY)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.ftruncate(fd, nbytes)
                finally:
                    os.close(fd)
                self._local.reservation = path
            except OSError as exc:  # the ledger alone still holds the reservation
                log.debug("cannot create reservation file %s: %s", path, exc)

    def _drop_reservation(self) -> None:
        path = getattr(self._local, "reservation", None)
        if path is not None:
            self._local.reservation = None
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def on_stored(self, store: "KVStore", chunks: Sequence[Any]) -> None:
        self._drop_reservation()  # the blocks are published: they count as themselves now

    def on_put_failed(self, store: "KVStore", nbytes: int, error: Exception) -> None:
        self._drop_reservation()  # nothing was published: give the reserved bytes back now

    def _check_scoped(self, fp: str, nbytes: int, limits: list[tuple[Any, int]]) -> None:
        """Namespace / group limits: a usage estimate refreshed by scans (see class docstring)."""
        now = time.monotonic()
        near = any(self._used(sc) + nbytes > self.rescan_fraction * lim for sc, lim in limits)
        age = now - self._scanned_at
        if age > self.refresh_s or (near and age > self.near_refresh_s):
            self._usage = self.pruner.usage()
            self._scanned_at = now
        if any(self._used(sc) + nbytes > lim for sc, lim in limits):
            rep = self.pruner.run_once(need_bytes=nbytes, need_namespace=fp)
            self.prunes += 1
            self._usage = {**rep.usage_after_ns, INFLIGHT: rep.inflight_bytes}
            self._scanned_at = time.monotonic()
        self._usage[fp] = self._usage.get(fp, 0) + nbytes

    def _notify(self, fp: str, keys: list[bytes]) -> None:
        """Tell the store (presence cache) and its observers (metrics, router events) about evictions."""
        store = self._stores.get(fp)
        self.evictions += len(keys)
        if store is not None:
            store.notify_removed(keys, "evict", skip=self)
