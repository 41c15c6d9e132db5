"""vua-nixl: a shared, persistent, prefix-addressed KV cache tier whose data path is NIXL.

Public API (names are stable; other components and users rely on them):
  KVStore, GetResult, Namespace, KVLayout, StoreConfig  - the store
  VUA, VUAConfig, ClosestKV                             - drop-in facade for code written for VUA
"""

from vua_nixl.config import StoreConfig
from vua_nixl.errors import (
    BackendUnavailableError,
    CorruptBlockError,
    InvalidInputError,
    LayoutMismatchError,
    StoreRootError,
    TransferError,
    VuaNixlError,
)
from vua_nixl.keys import KVLayout, Namespace
from vua_nixl.store import GetResult, KVStore, StoredChunk
from vua_nixl.vua import VUA, ClosestKV, VUAConfig

__version__ = "0.1.0"

__all__ = [
    "KVStore", "GetResult", "StoredChunk", "Namespace", "KVLayout", "StoreConfig",
    "VUA", "VUAConfig", "ClosestKV",
    "VuaNixlError", "InvalidInputError", "LayoutMismatchError", "StoreRootError", "CorruptBlockError",
    "BackendUnavailableError", "TransferError",
]
