"""Benchmarks of a store at capacity: its blocks evicted into the recycle pool between rounds.

A pooled file may be overwritten only ``recycle_after_s`` (300 s) after its eviction; a
benchmark runs the store's pool clock ahead instead of sleeping, outside its timed region.
"""

from __future__ import annotations

import time
from typing import Any

from vua_nixl.recycle import give


def age_pool(store: Any) -> None:
    """Make every file in ``store``'s recycle pool old enough to overwrite, for this store."""
    store._writer._pool.clock = lambda: time.time() + 1e6


def pool_blocks(store: Any, tokens: Any) -> None:
    """Evict the blocks of prefix ``tokens`` into the recycle pool (as the pruner of a full
    store does) and age the pool; raises if a block could not be pooled."""
    for key in store.keys_for(tokens):
        path = store.block_path(key)
        if not give(store.paths, path):
            raise RuntimeError(f"{path} could not be pooled")
    age_pool(store)
