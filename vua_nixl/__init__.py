"""vua-nixl: a shared, persistent, prefix-addressed KV cache tier whose data path is NIXL.

Public API (names are stable; other components and users rely on them):
  KVStore, GetResult, Namespace, KVLayout, StoreConfig  - the store
  VUA, VUAConfig, ClosestKV                             - drop-in facade for code written for VUA
"""

import os as _os

# torch's OpenMP threads spin-wait at barriers; on a CPU host shared with other processes (a
# Dynamo graph of several workers on a few cores, CI) that makes prefill 3-10x slower. libgomp
# reads this once, when torch is first imported, so it must be set before that import. Only a
# default: an explicit OMP_WAIT_POLICY in the environment wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from vua_nixl.config import StoreConfig  # noqa: E402
from vua_nixl.errors import (  # noqa: E402
    BackendUnavailableError,
    CorruptBlockError,
    InvalidInputError,
    LayoutMismatchError,
    StoreRootError,
    TransferError,
    VuaNixlError,
)
from vua_nixl.keys import KVLayout, Namespace  # noqa: E402
from vua_nixl.store import GetResult, KVStore, StoredChunk, StoreObserver  # noqa: E402
from vua_nixl.vua import VUA, ClosestKV, VUAConfig  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "KVStore", "GetResult", "StoredChunk", "StoreObserver", "Namespace", "KVLayout", "StoreConfig",
    "VUA", "VUAConfig", "ClosestKV",
    "VuaNixlError", "InvalidInputError", "LayoutMismatchError", "StoreRootError", "CorruptBlockError",
    "BackendUnavailableError", "TransferError",
]
