"""Capacity limits and eviction that keeps prefix chains contiguous and never breaks a reader.

Rules the pruner follows (docs/LIFECYCLE.md has the full argument):

* **Leaves first.** Within a namespace the blocks form a forest (a key's parent is in its
  header, and in the "stored" access record). Each block is ranked by the best score of its
  whole subtree (LRU: most recent access anywhere below it; LFU: most hits, then recency), ties
  broken deepest-first. A parent therefore always ranks after all of its descendants, so any
  prefix of the eviction order is closed under "children of" and unlinking in that order never
  leaves a child whose parent is gone. Orphans (a subtree whose parent is already missing, which
  no load can reach) and unreadable blocks go first.
* **Readers are never broken.** Eviction is ``unlink``: a reader that already opened a block
  keeps reading the old inode to the end (POSIX semantics, also on NFS via silly-rename), and
  a reader that opens later gets ENOENT, which the store turns into a shorter prefix or a clean
  miss. Nothing is ever truncated. With a recycle pool (``recycle_pool_bytes``) eviction is a
  rename into ``<root>/pool/`` instead, and the file is rewritten only after every reader's
  deadline has passed (:mod:`vua_nixl.recycle`); the pool's size is kept free below
  ``max_bytes``, so pooling never overshoots the limit.
* **One pruner at a time per root.** Compaction and eviction run under ``flock`` on
  ``<root>/access/prune.lock``, so two workers over the limit do not both evict.
* **Bounded overshoot.** The root limit is checked and reserved atomically against a usage
  ledger kept in the lock file, reset to the truth by every pruning scan; see
  :class:`~vua_nixl.lifecycle.capacity.CapacityGuard` for the small window that remains and for namespace/group limits.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

from vua_nixl.audit import gc_temporaries
from vua_nixl.errors import CorruptBlockError, InvalidInputError
from vua_nixl.format import read_header_file
from vua_nixl.lifecycle.accesslog import EVICTED, shared_log
from vua_nixl.lifecycle.index import LEASE_MARGIN_S, LEASE_S, LEASE_WAIT_S, AccessIndex, RootLock, read_ledger, root_lock, write_ledger
from vua_nixl.lifecycle.policies import EvictionPolicy, Policy, make_policy
from vua_nixl.paths import BLOCK_SUFFIX, StorePaths, note_odd_name
from vua_nixl.recycle import give, pool_bytes

log = logging.getLogger(__name__)

#: Called with (namespace fingerprint hex, keys) just before those blocks are unlinked.
EvictCallback = Callable[[str, list[bytes]], None]


@dataclass
class Block:
    """One block file as the pruner sees it."""

    fp: str
    key: bytes
    path: str
    size: int
    mtime: float
    last: float = 0.0
    hits: int = 0
    parent: Optional[bytes] = None
    corrupt: bool = False
    under_corrupt: bool = False  # a descendant of a corrupt block: unreachable by any load
    unknown: bool = False  # header unreadable for a reason other than corruption (e.g. EACCES)
    orphan: bool = False
    depth: int = 0
    eff: tuple[float, ...] = ()
    recent: float = 0.0  # latest access anywhere in this block's subtree (TTL uses it)

    def sort_key(self) -> tuple[Any, ...]:
        return (0 if (self.corrupt or self.orphan) else 1, self.eff, -self.depth)


@dataclass
class PruneReport:
    """What one pruning round saw and did."""

    scanned_chunks: int = 0
    scanned_bytes: int = 0
    evicted_chunks: int = 0
    evicted_bytes: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # ttl / capacity / namespace / orphan / corrupt
    per_namespace: dict[str, int] = field(default_factory=dict)
    usage_after: int = 0
    usage_after_ns: dict[str, int] = field(default_factory=dict)
    inflight_bytes: int = 0  # temporaries and the recycle pool, after this round
    recycled_chunks: int = 0  # evicted blocks moved into the recycle pool (also in evicted_chunks)
    temporaries_removed: int = 0
    records_folded: int = 0
    seconds: float = 0.0
    evicted: dict[str, list[bytes]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in vars(self).items() if k != "evicted"}
        return d


def allocated_bytes(st: os.stat_result, blocks_reported: bool = True) -> int:
    """Bytes a file occupies: allocated blocks (``st_blocks * 512``), not its apparent size, so
    a sparse file cannot fake usage. Where the file system reports no blocks at all (some FUSE
    mounts), the apparent size."""
    return st.st_blocks * 512 if blocks_reported else st.st_size


def scan_blocks(root: str | os.PathLike[str], fps: Optional[Sequence[str]] = None) -> list[Block]:
    """Every published block under ``root`` (or under the namespaces ``fps``), with its
    allocated size and mtime. Names that are not block keys are skipped and counted."""
    paths = StorePaths(root)
    wanted = None if fps is None else set(fps)
    found: list[tuple[str, bytes, str, os.stat_result]] = []
    for fp, _ in paths.namespaces():
        if wanted is not None and fp not in wanted:
            continue
        for entry in paths.blocks(fp):
            hexkey = entry.name[: -len(BLOCK_SUFFIX)]
            if len(hexkey) != 32 or not all(c in "0123456789abcdef" for c in hexkey):
                note_odd_name("block", entry.name)
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            found.append((fp, bytes.fromhex(hexkey), entry.path, st))
    reported = any(st.st_blocks for *_, st in found) or not any(st.st_size for *_, st in found)
    return [Block(fp, key, path, allocated_bytes(st, reported), st.st_mtime) for fp, key, path, st in found]


def usage_by_namespace(root: str | os.PathLike[str]) -> dict[str, int]:
    """Allocated bytes of published blocks per namespace (a directory walk; not for the request path)."""
    usage: dict[str, int] = defaultdict(int)
    for b in scan_blocks(root):
        usage[b.fp] += b.size
    return dict(usage)


#: Key under which :meth:`Pruner.usage` reports bytes of in-flight writes (temporaries).
INFLIGHT = ""
#: Name prefix of the guard's sparse reservation files in ``<root>/tmp``.
RESERVE_KEY = "reserve"


def inflight_bytes(root: str | os.PathLike[str], max_reservation: Optional[int] = None) -> int:
    """Bytes held by temporaries (:func:`temporary_bytes`) and by the recycle pool."""
    return temporary_bytes(root, max_reservation) + pool_bytes(StorePaths(root))


def temporary_bytes(root: str | os.PathLike[str], max_reservation: Optional[int] = None) -> int:
    """Bytes held by temporaries: puts in flight (preallocated to full size) or left by crashes.

    Counting them against the root limit makes other processes' writes visible *before* they
    publish, which shrinks the overshoot window to the time between a put's capacity check and
    its temp-file creation. Reservation files are sparse declarations and count their apparent
    size (at most ``max_reservation`` each: no put may reserve more than the limit); every
    other temporary counts its allocated blocks.
    """
    total = 0
    for e in StorePaths(root).temporaries():
        try:
            st = e.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if e.name.startswith(RESERVE_KEY + "."):
            n = st.st_size
            if max_reservation is not None and n > max_reservation:
                note_odd_name("oversized reservation", e.name)
                n = max_reservation
            total += n
        else:  # a guarded put's own reservation covers it where no blocks are reported
            total += st.st_blocks * 512
    return total


def fingerprints_of(namespaces: Iterable[Any], chunk_tokens: int) -> set[str]:
    """Hex fingerprints of ``namespaces`` (e.g. every model / TP rank a tenant uses), for
    ``group_max_bytes``: the tenant salt is inside the fingerprint, never on disk in clear."""
    return {ns.fingerprint(chunk_tokens).hex() for ns in namespaces}


def order_for_eviction(blocks: list[Block], policy: EvictionPolicy | str) -> list[Block]:
    """Blocks in eviction order: every block after all of its present descendants."""
    pol = policy if isinstance(policy, EvictionPolicy) else make_policy(policy)
    by_ns: dict[str, list[Block]] = defaultdict(list)
    for b in blocks:
        by_ns[b.fp].append(b)
    ordered: list[Block] = []
    for fp, group in by_ns.items():
        fpb = bytes.fromhex(fp)
        by_key = {b.key: b for b in group}
        children: dict[bytes, list[Block]] = defaultdict(list)
        roots: list[Block] = []
        for b in group:
            if b.parent is not None and b.parent != fpb and b.parent in by_key and b.parent != b.key:
                children[b.parent].append(b)
            else:
                b.orphan = b.parent is None or b.parent != fpb
                roots.append(b)
        visited: set[bytes] = set()
        for r in roots:
            # iterative post-order: depth on the way down, subtree score on the way up
            stack: list[tuple[Block, bool]] = [(r, False)]
            r.depth = 0
            while stack:
                node, done = stack.pop()
                if done:
                    kids = children.get(node.key, [])
                    node.recent = max([node.last] + [k.recent for k in kids])
                    node.eff = pol.subtree_score(node, [k.eff for k in kids])
                    continue
                if node.key in visited:
                    continue
                visited.add(node.key)
                stack.append((node, True))
                for k in children.get(node.key, []):
                    k.depth = node.depth + 1
                    k.orphan = node.orphan or node.corrupt
                    k.under_corrupt = node.corrupt or node.under_corrupt
                    stack.append((k, False))
        # a cycle is impossible for real keys; blocks only reachable through one are left alone
        ordered.extend(b for b in group if b.key in visited)
    ordered.sort(key=Block.sort_key)
    return ordered


Scope = Optional[str | frozenset[str]]


def evict_down_to(order: list[Block], victims: dict[bytes, tuple[Block, str]], usage_ns: dict[str, int],
                  scope: Scope, target: int, reason: str, extra_used: int = 0) -> None:
    """Mark blocks of ``scope`` (None: the whole root; a fingerprint; a set of them) as victims,
    in eviction order, until the scope's usage (plus ``extra_used``) is at most ``target``.
    Updates ``usage_ns`` and ``victims`` in place; orphans are labelled as such."""
    in_scope: Callable[[str], bool]
    if scope is None:
        def in_scope(fp: str) -> bool:
            return True
    elif isinstance(scope, frozenset):
        in_scope = scope.__contains__
    else:
        in_scope = scope.__eq__
    used = sum(n for fp, n in usage_ns.items() if in_scope(fp)) + extra_used
    for b in order:
        if used <= target:
            break
        if in_scope(b.fp) and b.key not in victims:
            victims[b.key] = (b, "orphan" if b.orphan else reason)
            usage_ns[b.fp] -= b.size
            used -= b.size


class Pruner:
    """Compacts the access logs and evicts by policy. Safe to run from any process or host.

    ``max_bytes`` bounds the whole root; ``namespace_max_bytes`` maps namespace fingerprints
    (hex) to their own bounds; ``group_max_bytes`` maps a name (e.g. a tenant) to a set of
    fingerprints and one bound for their sum (the tenant salt is hashed into fingerprints, so a
    tenant's limit is given by the fingerprints of its namespaces: see
    :func:`fingerprints_of`). ``max_age_s``
    evicts anything not accessed for that long (the ``ttl`` policy; also honoured under
    ``lru``/``lfu`` when given). Over a limit, eviction goes down to ``low_water`` of it so
    that pruning work is amortized over many puts. Each round also removes temporaries of dead
    writers on this host and any older than ``tmp_max_age_s`` (they count against ``max_bytes``).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        max_bytes: Optional[int] = None,
        namespace_max_bytes: Optional[dict[str, int]] = None,
        group_max_bytes: Optional[dict[str, tuple[Iterable[str], int]]] = None,
        policy: Policy = "lru",
        max_age_s: Optional[float] = None,
        low_water: float = 0.9,
        log_idle_s: float = 60.0,
        tmp_max_age_s: float = 3600.0,
        on_evict: Sequence[EvictCallback] = (),
        lease_s: float = LEASE_S,
        lease_margin_s: float = LEASE_MARGIN_S,
        lease_wait_s: float = LEASE_WAIT_S,
        recycle_pool_bytes: int = 0,
    ):
        if recycle_pool_bytes < 0 or (max_bytes is not None and recycle_pool_bytes > max_bytes // 2):
            raise InvalidInputError(f"recycle pool of {recycle_pool_bytes} bytes (recycle_pool_mib) must be between 0 and half "
                                    f"of max_bytes ({max_bytes}): the pool's room is kept free below the limit")
        self.recycle_pool_bytes = recycle_pool_bytes
        self.eviction_policy = make_policy(policy, max_age_s)
        if not 0.0 < low_water <= 1.0:
            raise InvalidInputError("low_water must be in (0, 1]")
        self.root = os.fspath(root)
        self.paths = StorePaths(root)
        self.max_bytes = max_bytes
        self.namespace_max_bytes = dict(namespace_max_bytes or {})
        self.group_max_bytes = {name: (frozenset(fps), int(limit)) for name, (fps, limit) in (group_max_bytes or {}).items()}
        self.policy: Policy = policy
        self.max_age_s = max_age_s
        self.low_water = low_water
        self.log_idle_s = log_idle_s
        self.tmp_max_age_s = tmp_max_age_s
        self.on_evict: list[EvictCallback] = list(on_evict)
        self.lease_s = lease_s
        self.lease_margin_s = lease_margin_s
        self.lease_wait_s = lease_wait_s
        self.totals = PruneReport()
        self.ledger_heals = 0  # scans that found the ledger below the truth (forged or lost)

    def lock(self) -> Any:
        """The root lock (flock + lease) with this pruner's lease settings."""
        return root_lock(self.root, lease_s=self.lease_s, margin_s=self.lease_margin_s, wait_s=self.lease_wait_s)

    def usage(self) -> dict[str, int]:
        """Bytes per namespace, plus in-flight temporaries under the key :data:`INFLIGHT`."""
        inflight = inflight_bytes(self.root, self.max_bytes)  # first: see run_locked
        u = usage_by_namespace(self.root)
        u[INFLIGHT] = inflight
        return u

    def run_once(self, need_bytes: int = 0, need_namespace: Optional[str] = None, now: Optional[float] = None) -> PruneReport:
        """Compact logs, then evict what the limits and the TTL require to fit ``need_bytes`` more.

        ``need_bytes`` is space a caller is about to write into ``need_namespace``; a periodic
        run passes 0 and only acts when a limit is already exceeded (or blocks are past TTL).
        """
        shared_log(self.root).flush()  # this process's own recent hits count in this round
        with self.lock() as lock:
            return self.run_locked(lock, need_bytes, need_namespace, now)

    def run_locked(self, lock: RootLock, need_bytes: int = 0, need_namespace: Optional[str] = None,
                   now: Optional[float] = None) -> PruneReport:
        """:meth:`run_once` for a caller that already holds :func:`root_lock` (``lock``)."""
        t0 = time.perf_counter()
        now = time.time() if now is None else now
        rep = PruneReport()
        rep.temporaries_removed, _ = gc_temporaries(self.root, self.tmp_max_age_s, now=now)
        # In-flight bytes *before* the block walk: every reserved put then shows up in one count
        # or the other (or both), never in neither. No put can reserve while we hold the lock,
        # and a put drops its reservation file only after its blocks are published.
        pooled = pool_bytes(self.paths)
        rep.inflight_bytes = temporary_bytes(self.root, self.max_bytes) + pooled
        # Room the pool may still fill from this round's victims: treated as used, so moving
        # victims there instead of unlinking them never ends the round above a limit.
        pool_room = max(0, self.recycle_pool_bytes - pooled)
        idx = AccessIndex.load(self.root)
        rep.records_folded = idx.fold_logs(self.root, consume=True, idle_s=self.log_idle_s)
        blocks = scan_blocks(self.root)
        self._join(idx, blocks)
        rep.scanned_chunks = len(blocks)
        rep.scanned_bytes = sum(b.size for b in blocks)
        order = order_for_eviction([b for b in blocks if not b.unknown], self.eviction_policy)
        victims: dict[bytes, tuple[Block, str]] = {}

        for b in order:  # a corrupt block goes with its subtree (no load can reach it)
            if b.corrupt or b.under_corrupt:
                victims[b.key] = (b, "corrupt")
        if self.max_age_s is not None:
            cutoff = now - self.max_age_s
            for b in order:  # subtree recency: a stale parent of a fresh child is kept
                if b.recent < cutoff:
                    victims.setdefault(b.key, (b, "ttl"))

        usage_ns: dict[str, int] = defaultdict(int)
        for b in blocks:
            usage_ns[b.fp] += b.size
        for b, _ in victims.values():
            usage_ns[b.fp] -= b.size
        for fp, limit in self.namespace_max_bytes.items():
            extra = need_bytes if fp == need_namespace else 0
            if usage_ns[fp] + extra > limit:
                evict_down_to(order, victims, usage_ns, fp, max(0, int(limit * self.low_water) - extra), "namespace")
        for fps, limit in self.group_max_bytes.values():
            extra = need_bytes if need_namespace in fps else 0
            if sum(usage_ns[f] for f in fps) + extra > limit:
                evict_down_to(order, victims, usage_ns, fps, max(0, int(limit * self.low_water) - extra), "group")
        if self.max_bytes is not None:
            if sum(usage_ns.values()) + rep.inflight_bytes + pool_room + need_bytes > self.max_bytes:
                evict_down_to(order, victims, usage_ns, None, max(0, int(self.max_bytes * self.low_water) - need_bytes),
                              "capacity", extra_used=rep.inflight_bytes + pool_room)

        if not lock.valid():  # paused past the lease: another host may be pruning; act on nothing
            log.warning("root lease of %s lost during a pruning scan; this round evicts nothing", self.root)
            victims = {}
        self._evict(order, victims, rep, pool_room)
        self._prune_index(idx, blocks, victims)
        idx.save(self.root)
        rep.usage_after_ns = {fp: n for fp, n in usage_ns.items() if n > 0}
        rep.usage_after = sum(rep.usage_after_ns.values())
        truth = rep.usage_after + rep.inflight_bytes
        before = read_ledger(lock)
        if before is not None and before < truth:
            # below the truth: unguarded writers, a deposed holder's fenced-off reservation, or a forged ledger
            self.ledger_heals += 1
            log.info("usage ledger of %s was %d B, scan says %d B: reset", self.root, before, truth)
        write_ledger(lock, truth, scanned=True)  # the truth, as of this scan
        rep.seconds = time.perf_counter() - t0
        self._accumulate(rep)
        if rep.evicted_chunks:
            log.info("pruned %d chunks (%d bytes) from %s: %s", rep.evicted_chunks, rep.evicted_bytes, self.root, rep.reasons)
        return rep

    # ---- internals -----------------------------------------------------------------------

    def _join(self, idx: AccessIndex, blocks: list[Block]) -> None:
        """Attach recency, hit counts and parents; read a header only for a never-seen block."""
        for b in blocks:
            e = idx.blocks.get(b.fp, {}).get(b.key)
            if e is None or e[2] is None:
                try:
                    h = read_header_file(b.path)
                    if h.key != b.key:
                        raise CorruptBlockError("key in header does not match the file name")
                    e = idx.entry(b.fp, b.key)
                    e[2] = h.parent
                except FileNotFoundError:
                    continue
                except CorruptBlockError as exc:
                    log.info("block %s is corrupt (%s): evicted with its subtree", b.path, exc)
                    b.corrupt = True
                    continue
                except OSError as exc:
                    # Cannot tell where it sits in its chain (permissions, I/O error): leave it
                    # alone rather than risk orphaning its children. It still counts as usage.
                    log.warning("block %s unreadable for pruning (%s): not evicted", b.path, exc)
                    b.unknown = True
                    continue
            b.last = max(float(e[0]), b.mtime)
            b.hits = int(e[1])
            b.parent = e[2]

    def _evict(self, order: list[Block], victims: dict[bytes, tuple[Block, str]], rep: PruneReport, pool_room: int = 0) -> None:
        if not victims:
            return
        chosen = [b for b in order if b.key in victims]  # leaves first
        in_order = {b.key for b in chosen}
        chosen += [b for b, _ in victims.values() if b.key not in in_order]  # corrupt ones outside the forest
        by_ns: dict[str, list[bytes]] = defaultdict(list)
        for b in chosen:
            by_ns[b.fp].append(b.key)
        for fp, keys in by_ns.items():
            for cb in self.on_evict:
                try:
                    cb(fp, keys)
                except Exception:  # an observer must not stop eviction half way
                    log.exception("eviction callback failed")
        alog = shared_log(self.root)
        pool_dirs: set[str] = set()  # checked once per round
        for b in chosen:
            reason = victims[b.key][1]
            try:
                if reason != "corrupt" and b.size <= pool_room and give(self.paths, b.path, pool_dirs):
                    pool_room -= b.size
                    rep.recycled_chunks += 1
                    rep.inflight_bytes += b.size
                else:
                    os.unlink(b.path)
            except FileNotFoundError:
                continue  # removed by someone else meanwhile
            except OSError as exc:
                log.warning("cannot evict %s: %s", b.path, exc)
                continue
            alog.record(EVICTED, bytes.fromhex(b.fp), b.key)  # counted when the log is next folded
            rep.evicted_chunks += 1
            rep.evicted_bytes += b.size
            rep.reasons[reason] = rep.reasons.get(reason, 0) + 1
            rep.per_namespace[b.fp] = rep.per_namespace.get(b.fp, 0) + 1
            rep.evicted.setdefault(b.fp, []).append(b.key)
        alog.flush()

    @staticmethod
    def _prune_index(idx: AccessIndex, blocks: list[Block], victims: dict[bytes, tuple[Block, str]]) -> None:
        present: dict[str, set[bytes]] = defaultdict(set)
        for b in blocks:
            if b.key not in victims:
                present[b.fp].add(b.key)
        for fp in list(idx.blocks):
            keep = present.get(fp, set())
            ns = idx.blocks[fp]
            for key in [k for k in ns if k not in keep]:
                del ns[key]
            if not ns:
                del idx.blocks[fp]

    def _accumulate(self, rep: PruneReport) -> None:
        t = self.totals
        t.scanned_chunks, t.scanned_bytes, t.usage_after = rep.scanned_chunks, rep.scanned_bytes, rep.usage_after
        t.evicted_chunks += rep.evicted_chunks
        t.evicted_bytes += rep.evicted_bytes
        t.recycled_chunks += rep.recycled_chunks
        t.records_folded += rep.records_folded
        t.seconds += rep.seconds
        for k, v in rep.reasons.items():
            t.reasons[k] = t.reasons.get(k, 0) + v
        for k, v in rep.per_namespace.items():
            t.per_namespace[k] = t.per_namespace.get(k, 0) + v


class BackgroundPruner:
    """Runs :meth:`Pruner.run_once` every ``period_s`` seconds on a daemon thread.

    Meant for a worker process (``start()`` at startup, ``stop()`` at shutdown). Errors are
    logged and the next period tries again: pruning is maintenance, never a reason to die.
    """

    def __init__(self, pruner: Pruner, period_s: float = 60.0):
        if period_s <= 0:
            raise InvalidInputError("period_s must be positive")
        self.pruner = pruner
        self.period_s = period_s
        self.last_report: Optional[PruneReport] = None
        self.runs = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "BackgroundPruner":
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="vua-nixl-pruner", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> "BackgroundPruner":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.last_report = self.pruner.run_once()
                self.runs += 1
            except Exception:
                self.errors += 1
                log.exception("background prune of %s failed", self.pruner.root)
            self._stop.wait(self.period_s)
