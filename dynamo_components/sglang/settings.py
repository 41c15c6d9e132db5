"""Backend settings and the store namespace, both derived from SGLang's own configuration.

Settings come from ``--hicache-storage-backend-extra-config`` (JSON, per engine) and from
``VUA_NIXL_*`` environment variables (read by :class:`vua_nixl.StoreConfig`, per pod).

The namespace decides which engines share pages. Everything that changes a page's bytes goes
in: the model (``model_id``, default SGLang's ``--served-model-name`` / model path) and its
revision, the KV dtype, the layout (layers incl. MTP draft layers, KV heads, head dim, MLA),
the TP and PP size and rank (MHA; MLA caches are rank-replicated, so MLA namespaces carry
tp 1/0 and only TP rank 0 writes, like SGLang's own backends), and the page size. Attention
context-parallel ranks (``attn_cp_size > 1``) hold disjoint slices and are folded into the
revision. DP-attention ranks with the same attention-TP rank hold the same heads and share.

Nothing here imports SGLang.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # pragma: no cover
    from dynamo_components.sglang.pages import PageGeometry
    from vua_nixl import KVStore, Namespace

log = logging.getLogger(__name__)

#: keys SGLang itself reads from the same JSON (dynamic loader, HiCacheController).
SGLANG_KEYS = {"backend_name", "module_path", "class_name", "interface_v1", "tp_lcm_size"}

#: extra-config keys this backend understands (besides StoreConfig fields such as fsync).
BACKEND_KEYS = {
    "store_root": "path of the shared store (a mounted RWX volume); or VUA_NIXL_ROOT",
    "backend": "NIXL backend: auto | GDS | GDS_MT | POSIX (default auto: probes GDS, GDS_MT, POSIX)",
    "model_id": "model name used in keys (default: SGLang's model name)",
    "revision": "model revision used in keys (default empty)",
    "tenant": "tenant salt: engines of different tenants never share KV",
    "create_root": "create store_root if missing (default false: a missing mount is an error)",
    "bounce_mib": "bounce buffer per direction for page_first/page_head host layouts (default 64)",
    "kv_dtype": "KV dtype name when fp8 KV sits in uint8 tensors and the host pool does not say which (e.g. fp8_e4m3)",
}


@dataclass(frozen=True)
class BackendSettings:
    store_root: str
    backend: str
    model_id: Optional[str]
    revision: str
    tenant: Optional[str]
    create_root: bool
    bounce_mib: int
    kv_dtype: Optional[str] = None
    store_overrides: dict[str, Any] = field(default_factory=dict)


def settings_from(extra: Optional[dict]) -> BackendSettings:
    from vua_nixl import StoreConfig

    extra = dict(extra or {})
    store_fields = set(StoreConfig.model_fields) - {"root", "chunk_tokens", "backend"}
    unknown = set(extra) - SGLANG_KEYS - set(BACKEND_KEYS) - store_fields
    if unknown:
        raise ValueError(
            f"vua_nixl HiCache backend: unknown extra-config keys {sorted(unknown)}; "
            f"known: {sorted(BACKEND_KEYS)} and StoreConfig fields {sorted(store_fields)}"
        )
    root = extra.get("store_root") or os.environ.get("VUA_NIXL_ROOT")
    if not root:
        raise ValueError('vua_nixl HiCache backend needs "store_root" in the extra config (or VUA_NIXL_ROOT)')
    return BackendSettings(
        store_root=str(root),
        backend=str(extra.get("backend") or os.environ.get("VUA_NIXL_BACKEND") or "auto"),
        model_id=extra.get("model_id"),
        revision=str(extra.get("revision") or ""),
        tenant=extra.get("tenant"),
        create_root=bool(extra.get("create_root", False)),
        bounce_mib=int(extra.get("bounce_mib", 64)),
        kv_dtype=extra.get("kv_dtype"),
        store_overrides={k: v for k, v in extra.items() if k in store_fields},
    )


def namespace_for(settings: BackendSettings, storage_config: Any, geo: "PageGeometry", dtype_name: str) -> "Namespace":
    """The store namespace of this rank's pages."""
    from vua_nixl import KVLayout, Namespace

    model = settings.model_id or getattr(storage_config, "model_name", None) or "unknown-model"
    layout = KVLayout(num_layers=geo.num_layers, kv_heads=1 if geo.mla else geo.kv_heads, head_dim=geo.head_dim, mla=geo.mla)
    replicated = bool(getattr(storage_config, "is_mla_model", False)) or geo.mla
    tp_size, tp_rank = (1, 0) if replicated else (int(storage_config.tp_size), int(storage_config.tp_rank))
    tag = f"sglang:hicache-v1;page={geo.page_size}"
    cp_size = int(getattr(storage_config, "attn_cp_size", 1) or 1)
    if cp_size > 1:
        tag += f";cp={int(storage_config.attn_cp_rank)}/{cp_size}"
    if getattr(storage_config, "should_split_heads", False):
        log.warning("vua_nixl HiCache backend: tp_lcm_size head splitting is not supported; pages are shared "
                    "only between workers with the same TP size")
    return Namespace(
        model=str(model), dtype=dtype_name, layout=layout, revision=f"{settings.revision}|{tag}",
        tp_size=tp_size, tp_rank=tp_rank,
        pp_size=int(getattr(storage_config, "pp_size", 1) or 1), pp_rank=int(getattr(storage_config, "pp_rank", 0) or 0),
        tenant=settings.tenant,
    )


def open_store(settings: BackendSettings, namespace: "Namespace", chunk_tokens: int) -> "KVStore":
    """Open the store or fail with an error that names the path and the backend."""
    from vua_nixl import KVStore, StoreConfig

    root = os.path.expanduser(settings.store_root)
    if not os.path.isdir(root):
        if not settings.create_root:
            raise FileNotFoundError(
                f"vua_nixl HiCache backend: store_root {root} does not exist (mount the shared volume, "
                'or set "create_root": true for a local directory)'
            )
        os.makedirs(root, exist_ok=True)
    cfg = StoreConfig(root=root, chunk_tokens=chunk_tokens, backend=settings.backend, **settings.store_overrides)
    return KVStore(root, namespace, chunk_tokens=chunk_tokens, backend=settings.backend, config=cfg)
