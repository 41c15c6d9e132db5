"""Lifecycle of a store root: capacity, eviction, the shared access log, audit and metrics.

Typical worker wiring::

    from vua_nixl.lifecycle import Lifecycle
    lc = Lifecycle(root, max_bytes=500 << 30, policy="lru", prune_period_s=60)
    store = KVStore(root, ns, observers=lc.observers())   # access log + capacity guard + metrics
    lc.start()            # background pruner thread
    ...
    lc.stop()

Everything the lifecycle knows lives under ``<root>/access/`` (see docs/LIFECYCLE.md), so any
process or host mounting the root can prune it, report on it, or continue after a restart.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from prometheus_client import CollectorRegistry

from vua_nixl.config import StoreConfig
from vua_nixl.errors import CapacityError
from vua_nixl.lifecycle.accesslog import AccessLog, shared_log
from vua_nixl.lifecycle.capacity import CapacityGuard
from vua_nixl.lifecycle.index import AccessIndex, compact, load_current
from vua_nixl.lifecycle.observers import AccessRecorder, StoreMetrics
from vua_nixl.lifecycle.policies import EvictionPolicy, LFUPolicy, LRUPolicy, Policy, TTLPolicy, make_policy
from vua_nixl.lifecycle.pruner import (
    BackgroundPruner,
    Pruner,
    PruneReport,
    fingerprints_of,
    order_for_eviction,
    scan_blocks,
    usage_by_namespace,
)

__all__ = [
    "Lifecycle", "Pruner", "BackgroundPruner", "CapacityGuard", "CapacityError", "PruneReport", "Policy",
    "AccessLog", "AccessRecorder", "AccessIndex", "StoreMetrics", "shared_log", "compact", "load_current",
    "order_for_eviction", "scan_blocks", "usage_by_namespace", "fingerprints_of",
    "EvictionPolicy", "LRUPolicy", "LFUPolicy", "TTLPolicy", "make_policy",
]


class Lifecycle:
    """One root's lifecycle services for a worker: observers for its stores plus a pruner.

    Every setting not passed explicitly comes from the store config (``max_bytes``,
    ``eviction``, ``max_age_s``, ``tmp_max_age_s``, ``low_water``, ``prune_period_s``,
    ``recycle_pool_mib``; env
    ``VUA_NIXL_MAX_BYTES`` etc.), so a worker configured by environment needs no code changes.
    """

    def __init__(
        self,
        root: Optional[str | os.PathLike[str]] = None,
        *,
        config: Optional[StoreConfig] = None,
        max_bytes: Optional[int] = None,
        namespace_max_bytes: Optional[dict[str, int]] = None,
        group_max_bytes: Optional[dict[str, tuple[Any, int]]] = None,
        policy: Optional[Policy] = None,
        max_age_s: Optional[float] = None,
        prune_period_s: Optional[float] = None,
        metrics: bool | StoreMetrics = True,
        registry: Optional[CollectorRegistry] = None,
        refresh_s: float = 2.0,
    ):
        cfg = config or (StoreConfig(root=Path(root)) if root is not None else StoreConfig())
        self.root = os.fspath(root if root is not None else cfg.root)
        self.pruner = Pruner(
            self.root,
            max_bytes=max_bytes if max_bytes is not None else cfg.max_bytes,
            namespace_max_bytes=namespace_max_bytes,
            group_max_bytes=group_max_bytes,
            policy=policy or cfg.eviction,
            max_age_s=max_age_s if max_age_s is not None else cfg.max_age_s,
            tmp_max_age_s=cfg.tmp_max_age_s,
            recycle_pool_bytes=cfg.recycle_pool_mib << 20,
            low_water=cfg.low_water,
            lease_s=cfg.lease_s,
            lease_margin_s=cfg.lease_margin_s,
            lease_wait_s=cfg.lease_wait_s,
        )
        self.recorder = AccessRecorder()
        self.guard = CapacityGuard(self.pruner, refresh_s=refresh_s, ledger_rescan_s=cfg.ledger_rescan_s)
        if isinstance(metrics, StoreMetrics):
            self.metrics: Optional[StoreMetrics] = metrics
        else:
            self.metrics = StoreMetrics(registry) if metrics else None
        self.config = cfg
        self.background = BackgroundPruner(self.pruner, prune_period_s if prune_period_s is not None else cfg.prune_period_s)

    def observers(self) -> list[Any]:
        obs: list[Any] = [self.recorder, self.guard]
        if self.metrics is not None:
            obs.append(self.metrics)
        return obs

    def start(self) -> "Lifecycle":
        self.background.start()
        return self

    def stop(self) -> None:
        self.background.stop()
        self.recorder.flush()

    def __enter__(self) -> "Lifecycle":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
