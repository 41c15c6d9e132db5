"""SGLang HiCache L3 storage backend backed by the shared vua-nixl store.

Load it through SGLang's ``dynamic`` storage backend::

    python -m sglang.launch_server ... --enable-hierarchical-cache \\
        --hicache-storage-backend dynamic \\
        --hicache-storage-backend-extra-config '{"backend_name":"vua_nixl",
            "module_path":"dynamo_components.sglang","class_name":"VuaNixlHiCacheStorage",
            "interface_v1":1,"store_root":"/mnt/kv"}'

(``python -m dynamo.sglang`` takes the same flags.) ``interface_v1: 1`` makes SGLang's
HiCacheController use the zero-copy ``batch_get_v1`` / ``batch_set_v1`` calls.

Importing this package is cheap: it imports neither SGLang nor torch. The backend class is
resolved on first attribute access (PEP 562), which is what SGLang's backend factory does
(``getattr(importlib.import_module(module_path), class_name)``).

Modules:
  settings.py   extra-config keys, the store Namespace derived from SGLang's storage config + pool
  pagekeys.py   SGLang page hash (a string) -> the store's block identity
  pages.py      SGLang host pool layouts -> canonical per-page views (zero-copy where possible)
  backend.py    VuaNixlHiCacheStorage (a HiCacheStorage)
  cpu_compat.py stand-ins that let SGLang's CPU-testable classes import without torchvision
"""

from __future__ import annotations

from typing import Any

#: SGLang release lines the backend is tested against (see docs/SGLANG.md).
TESTED_SGLANG_VERSIONS = ("0.5.21", "0.5.23")

__all__ = ["VuaNixlHiCacheStorage", "TESTED_SGLANG_VERSIONS"]


def __getattr__(name: str) -> Any:
    if name == "VuaNixlHiCacheStorage":
        from dynamo_components.sglang.backend import VuaNixlHiCacheStorage

        return VuaNixlHiCacheStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
