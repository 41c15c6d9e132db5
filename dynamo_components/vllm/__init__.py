"""vLLM V1 KV connector backed by the shared vua-nixl store.

Load it through vLLM's ``kv_transfer_config``::

    {"kv_connector": "VuaNixlConnector",
     "kv_connector_module_path": "dynamo_components.vllm",
     "kv_role": "kv_both",
     "kv_connector_extra_config": {"store_root": "/mnt/kv"}}

Importing this package is cheap: it does not import vLLM (nor torch). The connector class is
resolved on first attribute access (PEP 562), which is exactly what vLLM's connector factory
does (``getattr(import_module(path), "VuaNixlConnector")``).

Modules, split by role like vLLM's own ``mooncake/store`` connector:
  config.py     connector settings (extra config + ``VUA_NIXL_*``) and the store Namespace derived
                from the VllmConfig (model, revision, KV dtype, layout, TP/PP rank, block size)
  metadata.py   scheduler -> worker step metadata, worker -> scheduler results
  scheduler.py  scheduler side: lookups (off-thread), load/save planning, KV events
  worker.py     worker side: register_kv_caches, async loads and saves
  paged.py      paged KV <-> canonical store form (gather / scatter by block id)
  events.py     BlockStored / BlockRemoved for the shared tier (Dynamo's router: external tier)
  connector.py  VuaNixlConnector, the KVConnectorBase_V1 that dispatches to the two sides
"""

from __future__ import annotations

from typing import Any

#: vLLM release lines the connector is tested against (see docs/VLLM.md).
TESTED_VLLM_VERSIONS = ("0.31.0", "0.33.0")

__all__ = ["VuaNixlConnector", "TESTED_VLLM_VERSIONS"]


def __getattr__(name: str) -> Any:
    if name == "VuaNixlConnector":
        from dynamo_components.vllm.connector import VuaNixlConnector

        return VuaNixlConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
