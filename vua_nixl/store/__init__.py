"""The store: a facade (:class:`KVStore`) over a write path, a read pipeline, transfer planning
and a presence cache. See docs/ARCHITECTURE.md for how the parts fit."""

from vua_nixl.store.kvstore import GetResult, KVStore
from vua_nixl.store.observers import ObserverList, StoredChunk, StoreObserver

__all__ = ["KVStore", "GetResult", "StoredChunk", "StoreObserver", "ObserverList"]
