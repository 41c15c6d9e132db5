"""Store observers: the access recorder and Prometheus metrics.

Both plug into :class:`vua_nixl.store.KVStore` through ``observers=[...]`` and never touch the
data path: they run after a put is published or a load is validated, and they only append to
memory (the access log flushes in batches).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Optional, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram

from vua_nixl.lifecycle.accesslog import CORRUPT, MISS, REMOVED, STORED, AccessLog, shared_log, u64_pair
from vua_nixl.store.observers import StoreObserver

if TYPE_CHECKING:
    from vua_nixl.store import KVStore, StoredChunk

log = logging.getLogger(__name__)


class AccessRecorder(StoreObserver):
    """Writes stored / hit / miss / removed / corrupt records to the root's shared access log.

    Disabled for a store whose ``config.access_log`` is false. Evictions are recorded by the
    pruner itself (it is the one that knows), so ``on_removed(..., "evict")`` is ignored here.
    """

    def __init__(self, log_: Optional[AccessLog] = None):
        self._log = log_

    def _alog(self, store: "KVStore") -> Optional[AccessLog]:
        if not store.config.access_log:
            return None
        if self._log is None:
            self._log = shared_log(store.paths.root, file_mode=store.config.file_mode)
        return self._log

    def on_stored(self, store: "KVStore", chunks: Sequence["StoredChunk"]) -> None:
        alog = self._alog(store)
        if alog is not None and chunks:
            alog.record_many(STORED, store.fingerprint, [c.key for c in chunks], [c.parent for c in chunks])

    def on_hit(self, store: "KVStore", keys: Sequence[bytes], nbytes: int, seconds: float) -> None:
        alog = self._alog(store)
        if alog is not None and keys:
            alog.hits(store.fingerprint, keys, store.chunk_bytes)

    def on_miss(self, store: "KVStore", requested_tokens: int, matched_tokens: int) -> None:
        alog = self._alog(store)
        if alog is not None:
            alog.record(MISS, store.fingerprint, aux=u64_pair(requested_tokens, matched_tokens))

    def on_removed(self, store: "KVStore", keys: Sequence[bytes], reason: str) -> None:
        alog = self._alog(store)
        if alog is not None and keys and reason != "evict":
            alog.record_many(REMOVED, store.fingerprint, list(keys))

    def on_corrupt(self, store: "KVStore", path: str, reason: str) -> None:
        alog = self._alog(store)
        if alog is None:
            return
        try:
            key = bytes.fromhex(os.path.basename(path).split(".")[0])
        except ValueError:
            return
        if len(key) == 16:
            alog.record(CORRUPT, store.fingerprint, key)

    def flush(self) -> None:
        if self._log is not None:
            self._log.flush()


#: Load latency buckets: page-cache hits take ~100 us, cold NVMe/NFS loads of GBs take seconds.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class StoreMetrics(StoreObserver):
    """Prometheus metrics for one or more stores, labelled by namespace fingerprint (12 hex).

    A private :class:`CollectorRegistry` is created unless one is given, so several instances
    (tests, several stores) never collide on metric names; a Dynamo worker exposes it with
    ``prometheus_client.start_http_server(port, registry=metrics.registry)`` or mounts
    ``generate_latest(metrics.registry)`` on its own HTTP server.

    ``hits`` counts loads that returned at least one chunk (one per ``get`` / ``get_many`` call
    with any hit), ``chunk_hits`` the chunks they returned; ``misses`` counts sequences that
    matched nothing.
    """

    def __init__(self, registry: Optional[CollectorRegistry] = None, prefix: str = "vua_nixl"):
        self.registry = registry if registry is not None else CollectorRegistry()
        r, p, lbl = self.registry, prefix, ["namespace"]
        self.hits = Counter(f"{p}_hits", "loads that returned KV", lbl, registry=r)
        self.chunk_hits = Counter(f"{p}_chunk_hits", "chunks loaded", lbl, registry=r)
        self.misses = Counter(f"{p}_misses", "sequences with no stored prefix", lbl, registry=r)
        self.bytes_read = Counter(f"{p}_bytes_read", "KV bytes loaded", lbl, registry=r)
        self.bytes_written = Counter(f"{p}_bytes_written", "block bytes written", lbl, registry=r)
        self.chunks_written = Counter(f"{p}_chunks_written", "chunks written", lbl, registry=r)
        self.chunks_recycled = Counter(f"{p}_chunks_recycled", "chunks written into evicted block files of the recycle pool",
                                       lbl, registry=r)
        self.load_seconds = Histogram(f"{p}_load_seconds", "latency of a load call", lbl, buckets=LATENCY_BUCKETS, registry=r)
        self.evictions = Counter(f"{p}_evictions", "chunks evicted by policy", lbl, registry=r)
        self.deletes = Counter(f"{p}_deletes", "chunks deleted by callers", lbl, registry=r)
        self.corrupt = Counter(f"{p}_corrupt_files", "block files that failed validation (quarantined)", lbl, registry=r)

    @staticmethod
    def _ns(store: "KVStore") -> str:
        return store.fp_hex[:12]

    def on_stored(self, store: "KVStore", chunks: Sequence["StoredChunk"]) -> None:
        ns = self._ns(store)
        self.chunks_written.labels(ns).inc(len(chunks))
        self.bytes_written.labels(ns).inc(sum(c.nbytes for c in chunks))
        self.chunks_recycled.labels(ns).inc(sum(1 for c in chunks if c.recycled))

    def on_hit(self, store: "KVStore", keys: Sequence[bytes], nbytes: int, seconds: float) -> None:
        ns = self._ns(store)
        self.hits.labels(ns).inc()
        self.chunk_hits.labels(ns).inc(len(keys))
        self.bytes_read.labels(ns).inc(nbytes)
        self.load_seconds.labels(ns).observe(seconds)

    def on_miss(self, store: "KVStore", requested_tokens: int, matched_tokens: int) -> None:
        self.misses.labels(self._ns(store)).inc()

    def on_removed(self, store: "KVStore", keys: Sequence[bytes], reason: str) -> None:
        counter = self.evictions if reason == "evict" else self.deletes
        counter.labels(self._ns(store)).inc(len(keys))

    def on_corrupt(self, store: "KVStore", path: str, reason: str) -> None:
        self.corrupt.labels(self._ns(store)).inc()

    def value(self, name: str, store: "KVStore") -> float:
        """Current value of one metric for a store (tests and the soak report read it)."""
        v = self.registry.get_sample_value(name, {"namespace": self._ns(store)})
        return 0.0 if v is None else v
