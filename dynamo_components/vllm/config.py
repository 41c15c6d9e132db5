"""Connector settings and the store namespace, both derived from vLLM's own configuration.

Settings come from ``kv_transfer_config.kv_connector_extra_config`` (explicit, per engine) and
from ``VUA_NIXL_*`` environment variables (read by :class:`vua_nixl.StoreConfig`, per pod).

The namespace decides which engines may share KV. Everything that changes the bytes of a
block goes in: the model and its revision, the KV cache dtype (``kv_cache_dtype=fp8`` is a
different namespace from bf16, and the exact vLLM cache dtype string is kept too), the layout
(layers, KV heads, head size, MLA), the TP/PP size and rank, and vLLM's block size
(``Namespace.block_size``, ``Namespace.cache_dtype``); the store chunk (``chunk_tokens``, itself
part of every key) is always a multiple of the block size.

Nothing here imports vLLM at module import time.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # pragma: no cover
    from vua_nixl import KVStore, Namespace

#: Extra-config keys this connector understands (besides StoreConfig fields).
CONNECTOR_KEYS = {
    "store_root": "path of the shared store (a mounted RWX volume); or VUA_NIXL_ROOT",
    "chunk_tokens": "tokens per store chunk; a multiple of vLLM's block size (default: >= 256)",
    "backend": "NIXL backend: auto | GDS | GDS_MT | POSIX (default auto: probes GDS, GDS_MT, POSIX)",
    "model_id": "model name used in keys (default: the served model path/name)",
    "revision": "model revision used in keys (default: --revision)",
    "tenant": "tenant salt: engines of different tenants never share KV",
    "create_root": "create store_root if missing (default false: a missing mount is an error)",
    "lookup_wait_ms": "how long the scheduler waits for a lookup before asking vLLM to retry (default 20)",
    "events": "emit BlockStored/BlockRemoved for the shared tier (default true)",
    "staging_tokens": "initial size of the worker's staging buffer in tokens (default 4 chunks)",
}


class StoreUnavailableError(RuntimeError):
    """The store cannot be opened at start-up (missing mount, not writable, no NIXL backend)."""


@dataclass(frozen=True)
class ConnectorSettings:
    store_root: str
    chunk_tokens: int
    backend: str
    model_id: str
    revision: str
    tenant: Optional[str]
    create_root: bool
    lookup_wait_s: float
    events: bool
    staging_tokens: int
    store_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class KVPlan:
    """What one engine's KV cache looks like (one full-attention group, as vLLM gives it)."""

    layer_names: tuple[str, ...]  # in layer order; one store "layer" each
    block_size: int
    num_kv_heads: int
    head_size: int
    mla: bool
    spec_dtype: Any  # torch.dtype of the cache tensors
    store_dtype: str  # vua-nixl dtype name, same item size
    cache_dtype: str  # vLLM's --kv-cache-dtype string
    num_blocks: int


def default_chunk_tokens(block_size: int, target: int = 256) -> int:
    """Smallest multiple of the block size that is at least ``target`` tokens."""
    return block_size * max(1, math.ceil(target / block_size))


def _layer_key(name: str) -> tuple[int, str]:
    m = re.search(r"\.(\d+)\.", f".{name}.")
    return (int(m.group(1)) if m else 1 << 30, name)


def kv_plan(vllm_config: Any, kv_cache_config: Any) -> KVPlan:
    """Read the KV layout from vLLM's KV cache config (never from hard-coded shapes)."""
    from vllm.v1.kv_cache_interface import AttentionSpec, MLAAttentionSpec, UniformTypeKVCacheSpecs

    groups = list(kv_cache_config.kv_cache_groups)
    if len(groups) != 1:
        raise ValueError(
            f"VuaNixlConnector supports models with one KV cache group; this one has {len(groups)} "
            f"({', '.join(type(g.kv_cache_spec).__name__ for g in groups)})"
        )
    spec = groups[0].kv_cache_spec
    if isinstance(spec, UniformTypeKVCacheSpecs):
        spec = next(iter(spec.kv_cache_specs.values()))
    if not isinstance(spec, AttentionSpec):
        raise ValueError(f"VuaNixlConnector needs an attention KV cache, got {type(spec).__name__}")
    mla = isinstance(spec, MLAAttentionSpec)
    packed = getattr(spec, "state_content_bytes", None) is not None or getattr(spec, "num_head_slots", None) is not None
    tps = getattr(spec, "tokens_per_state", 1)
    if packed or tps != 1:  # page padding is fine: strides are read from the tensors
        raise ValueError(
            f"VuaNixlConnector does not support packed KV pages ({type(spec).__name__}: "
            f"state_content_bytes={getattr(spec, 'state_content_bytes', None)}, tokens_per_state={tps})"
        )
    if not mla and spec.head_size_v != spec.head_size:
        raise ValueError(f"VuaNixlConnector needs head_size == head_size_v, got {spec.head_size} and {spec.head_size_v}")
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    store_dtype = _store_dtype(cache_dtype, spec.dtype)
    names = sorted(groups[0].layer_names, key=_layer_key)
    return KVPlan(
        layer_names=tuple(names), block_size=int(spec.block_size), num_kv_heads=1 if mla else int(spec.num_kv_heads),
        head_size=int(spec.head_size), mla=mla, spec_dtype=spec.dtype, store_dtype=store_dtype,
        cache_dtype=cache_dtype, num_blocks=int(kv_cache_config.num_blocks),
    )


def _store_dtype(cache_dtype: str, spec_dtype: Any) -> str:
    """The vua-nixl dtype whose bytes are the cache's bytes (fp8 caches are often uint8 tensors)."""
    from vua_nixl.dtypes import dtype_name, itemsize

    cd = cache_dtype.lower()
    if cd.startswith("fp8_e5m2"):
        name = "float8_e5m2"
    elif cd.startswith("fp8"):
        name = "float8_e4m3fn"
    else:
        try:
            name = dtype_name(spec_dtype)
        except Exception as exc:  # an engine dtype the store has no name for
            raise ValueError(f"VuaNixlConnector: unsupported KV cache dtype {spec_dtype} ({cache_dtype})") from exc
    if itemsize(name) != spec_dtype.itemsize:
        raise ValueError(
            f"VuaNixlConnector: kv_cache_dtype={cache_dtype} maps to {name} but the cache tensors are {spec_dtype}"
        )
    return name


def settings_from(vllm_config: Any, block_size: int) -> ConnectorSettings:
    """Connector settings from kv_connector_extra_config (+ VUA_NIXL_* through StoreConfig)."""
    from vua_nixl import StoreConfig

    extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
    store_fields = set(StoreConfig.model_fields) - {"root", "chunk_tokens", "backend"}
    unknown = set(extra) - set(CONNECTOR_KEYS) - store_fields
    if unknown:
        raise ValueError(
            f"VuaNixlConnector: unknown kv_connector_extra_config keys {sorted(unknown)}; "
            f"known: {sorted(CONNECTOR_KEYS)} and the StoreConfig fields {sorted(store_fields)}"
        )
    root = extra.get("store_root") or os.environ.get("VUA_NIXL_ROOT")
    if not root:
        raise ValueError("VuaNixlConnector: set kv_connector_extra_config.store_root (or VUA_NIXL_ROOT)")
    chunk = extra.get("chunk_tokens") or os.environ.get("VUA_NIXL_CHUNK_TOKENS")
    chunk = int(chunk) if chunk else default_chunk_tokens(block_size)
    if chunk <= 0 or chunk % block_size:
        raise ValueError(
            f"VuaNixlConnector: chunk_tokens={chunk} must be a positive multiple of vLLM's block size {block_size}"
        )
    model = vllm_config.model_config
    return ConnectorSettings(
        store_root=str(root),
        chunk_tokens=chunk,
        backend=str(extra.get("backend") or os.environ.get("VUA_NIXL_BACKEND") or "auto"),
        model_id=str(extra.get("model_id") or model.model),
        revision=str(extra.get("revision") or model.revision or ""),
        tenant=extra.get("tenant"),
        create_root=_truthy(extra.get("create_root", False)),
        lookup_wait_s=float(extra.get("lookup_wait_ms", 20)) / 1000.0,
        events=_truthy(extra.get("events", True)),
        staging_tokens=int(extra.get("staging_tokens", 4 * chunk)),
        store_overrides={k: v for k, v in extra.items() if k in store_fields},
    )


def _truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def parallel_sizes(vllm_config: Any) -> tuple[int, int]:
    pc = vllm_config.parallel_config
    if getattr(pc, "decode_context_parallel_size", 1) > 1:
        raise ValueError("VuaNixlConnector does not support decode context parallelism (DCP shards tokens)")
    return int(pc.tensor_parallel_size), int(pc.pipeline_parallel_size)


def namespace_for(settings: ConnectorSettings, plan: KVPlan, tp_size: int, tp_rank: int,
                  pp_size: int = 1, pp_rank: int = 0) -> "Namespace":
    from vua_nixl import KVLayout, Namespace

    layout = KVLayout(num_layers=len(plan.layer_names), kv_heads=plan.num_kv_heads, head_dim=plan.head_size, mla=plan.mla)
    return Namespace(
        model=settings.model_id,
        dtype=plan.store_dtype,
        layout=layout,
        revision=settings.revision,
        block_size=plan.block_size,
        cache_dtype=f"vllm:{plan.cache_dtype}",
        tp_size=tp_size, tp_rank=tp_rank, pp_size=pp_size, pp_rank=pp_rank,
        tenant=settings.tenant,
    )


def open_store(settings: ConnectorSettings, namespace: "Namespace", agent: Any = None) -> "KVStore":
    """Open the store or fail with an error that names the path and the backend."""
    from vua_nixl import KVStore, StoreConfig, VuaNixlError

    root = settings.store_root
    where = f"the vua-nixl store at {root} (NIXL backend {settings.backend})"
    if not os.path.isdir(root):
        if os.path.exists(root):
            raise StoreUnavailableError(f"VuaNixlConnector: cannot open {where}: {root} is not a directory")
        if not settings.create_root:
            raise StoreUnavailableError(
                f"VuaNixlConnector: cannot open {where}: {root} does not exist (is the shared volume mounted? "
                "set create_root=true in kv_connector_extra_config to create it)"
            )
    try:
        config = StoreConfig(**settings.store_overrides) if settings.store_overrides else None
        return KVStore(root, namespace, chunk_tokens=settings.chunk_tokens, backend=settings.backend,
                       config=config, agent=agent)
    except (VuaNixlError, OSError, ValueError) as exc:
        raise StoreUnavailableError(f"VuaNixlConnector: cannot open {where}: {exc}") from exc


def backend_of(store: Any) -> str:
    """The NIXL backend a store's agent runs (for log lines)."""
    return store.backend
