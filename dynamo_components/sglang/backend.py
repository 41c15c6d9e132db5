"""VuaNixlHiCacheStorage: SGLang's HiCache L3 tier on the shared vua-nixl store.

Data path: SGLang's host KV pool <-> the store's NIXL agent <-> block files. The host pool is
registered with the agent once (``register_mem_pool_host``); every ``batch_set_v1`` /
``batch_get_v1`` then moves all pages of the batch in one NIXL request, straight from/into the
pool for the ``layer_first`` and ``page_first_direct`` layouts (see pages.py), with no per-call
registration and no temporary tensors.

What SGLang gets from the store: pages written atomically (temp file + rename, all-or-nothing
per batch), a header and XXH3 checksum verified on every load (a corrupt page is a miss, and
is quarantined), strict prefixes (``batch_exists`` = leading run present; a load stops at the
first bad page), namespacing by model / dtype / layout / TP / PP / page size / tenant, and
sharing across processes and nodes that mount the same root.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, List, Optional

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from dynamo_components.sglang.pagekeys import key_bits, page_tokens
from dynamo_components.sglang.pages import PageGeometry, geometry
from dynamo_components.sglang.settings import BackendSettings, namespace_for, open_store, settings_from
from vua_nixl.kvlayout import inner_contiguous, non_overlapping

log = logging.getLogger(__name__)


class _Bounce:
    """A registered, reusable canonical-page buffer for layouts that cannot be moved in place."""

    def __init__(self, geo: PageGeometry, pages: int, agent: Any):
        self.lock = threading.Lock()
        self.buf = torch.empty((pages, *geo.canonical_shape()), dtype=geo.kv_buffer.dtype)
        self.pages = pages
        try:
            agent.register_tensor(self.buf, cache=True)
        except Exception as exc:  # the store registers it per transfer instead
            log.debug("bounce buffer pre-registration failed: %s", exc)


class VuaNixlHiCacheStorage(HiCacheStorage):
    """A ``HiCacheStorage`` whose pages live in the shared vua-nixl store.

    Constructed by SGLang's dynamic backend loader as ``cls(storage_config, kwargs)``; the
    store opens when SGLang hands over the host pool (its layout and dtype fix the namespace).
    """

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None):
        self.storage_config = storage_config
        self.settings: BackendSettings = settings_from(storage_config.extra_config)
        self.is_mla_model = bool(storage_config.is_mla_model)
        # MLA pages are identical on every TP rank: rank 0 writes, all ranks read (as SGLang's own backends).
        self.backup_skip = self.is_mla_model and int(storage_config.tp_rank) != 0
        self.store: Any = None
        self.geo: Optional[PageGeometry] = None
        self.page_size = 0
        self._bounce: dict[str, _Bounce] = {}
        self._lock = threading.Lock()

    # ---- set-up --------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        from vua_nixl.dtypes import dtype_name, torch_dtype

        geo = geometry(mem_pool_host, torch_dtype(self.settings.kv_dtype) if self.settings.kv_dtype else None)

        ns = namespace_for(self.settings, self.storage_config, geo, dtype_name(geo.kv_buffer.dtype))
        with self._lock:
            if self.store is not None:
                self.store.close()
            self.store = open_store(self.settings, ns, geo.page_size)
            self.geo = geo
            self.page_size = geo.page_size
            # Register the whole host pool with the store's NIXL agent once: every page view shares
            # its storage, so later transfers find the registration and never register again.
            self.store.agent.register_tensor(geo.kv_buffer, cache=True)
            if not geo.zero_copy:
                page_bytes = geo.kv_buffer.element_size() * int(torch.Size(geo.canonical_shape()).numel())
                pages = max(1, min(128, (self.settings.bounce_mib << 20) // page_bytes))
                self._bounce = {op: _Bounce(geo, pages, self.store.agent) for op in ("set", "get")}
        if geo.page_size < 3:
            log.warning("vua_nixl HiCache backend: page_size %d keeps %d bits of each SGLang page key; "
                        "use page_size >= 4 with L3 storage", geo.page_size, key_bits(geo.page_size))
        log.info("vua_nixl HiCache backend: root=%s namespace=%s layout=%s (%s) page=%d tokens, %d bytes/page, NIXL %s",
                 self.store.paths.root, self.store.fp_hex[:12], geo.layout, "zero-copy" if geo.zero_copy else "bounce",
                 geo.page_size, self.store.chunk_bytes, self.store.agent.backend)

    def close(self) -> None:
        with self._lock:
            if self.store is not None:
                self.store.close()
                self.store = None

    def clear(self) -> None:
        """SGLang's "flush cache" asks backends to clear; a shared store is not this worker's to wipe."""
        log.info("vua_nixl HiCache backend: clear() ignored (shared store; use `vua-nixl gc` to evict)")

    def stats(self) -> dict[str, Any]:
        return self.store.stats() if self.store is not None else {}

    # ---- zero-copy v1 interface ----------------------------------------------------------

    def batch_exists(self, keys: List[str], extra_info: Any = None) -> int:
        """Number of leading keys whose pages are stored (SGLang keys are prefix-chained)."""
        store = self._ready()
        if store is None:
            return 0
        n = 0
        for key in keys:
            if store.lookup(page_tokens(key, self.page_size)) == 0:
                break
            n += 1
        return n

    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info: Any = None) -> List[bool]:
        if not keys:
            return []
        if self.backup_skip:
            return [True] * len(keys)
        store = self._ready()
        starts = self._page_starts(keys, host_indices)
        if store is None or starts is None:
            return [False] * len(keys)
        assert self.geo is not None
        try:
            if self.geo.zero_copy:
                store.put_many([(page_tokens(k, self.page_size), self.geo.view(s)) for k, s in zip(keys, starts)])
            else:
                bounce = self._bounce["set"]
                with bounce.lock:
                    for lo in range(0, len(keys), bounce.pages):
                        chunk = list(zip(keys[lo : lo + bounce.pages], starts[lo : lo + bounce.pages]))
                        for j, (_, s) in enumerate(chunk):
                            bounce.buf[j].copy_(self.geo.view(s))
                        store.put_many([(page_tokens(k, self.page_size), bounce.buf[j]) for j, (k, _) in enumerate(chunk)])
        except Exception as exc:  # nothing of a failed put is published
            log.warning("vua_nixl HiCache backend: storing %d pages failed: %s", len(keys), exc)
            return [False] * len(keys)
        return [True] * len(keys)

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info: Any = None) -> List[bool]:
        if not keys:
            return []
        store = self._ready()
        starts = self._page_starts(keys, host_indices)
        if store is None or starts is None:
            return [False] * len(keys)
        assert self.geo is not None
        ok: list[bool] = []
        try:
            if self.geo.zero_copy:
                outs = [self.geo.view(s) for s in starts]
                res = store.get_many([page_tokens(k, self.page_size) for k in keys], outs=outs)
                ok = [r.tokens == self.page_size for r in res]
            else:
                bounce = self._bounce["get"]
                with bounce.lock:
                    for lo in range(0, len(keys), bounce.pages):
                        sub = keys[lo : lo + bounce.pages]
                        res = store.get_many([page_tokens(k, self.page_size) for k in sub],
                                            outs=[bounce.buf[j] for j in range(len(sub))])
                        got = [r.tokens == self.page_size for r in res]
                        for j, good in enumerate(got):
                            if not good:
                                break
                            self.geo.view(starts[lo + j]).copy_(bounce.buf[j])
                        ok.extend(got)
                        if not all(got):
                            break
        except Exception as exc:
            log.warning("vua_nixl HiCache backend: loading %d pages failed: %s", len(keys), exc)
            return [False] * len(keys)
        return _leading_run(ok, len(keys))

    # ---- legacy (non-v1) interface: flat page copies -------------------------------------

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) > 0

    def get(self, key: str, target_location: Optional[Any] = None, target_sizes: Optional[Any] = None) -> Optional[torch.Tensor]:
        store = self._ready()
        if store is None or target_location is None or self.geo is None:
            return None
        canon = self.geo.flat_view(target_location)
        in_place = inner_contiguous(canon, 1 if self.geo.mla else 2) and non_overlapping(canon)
        res = store.get(page_tokens(key, self.page_size), out=canon if in_place else None)
        if res.tokens != self.page_size or res.kv is None:
            return None
        if res.kv.data_ptr() != canon.data_ptr():
            canon.copy_(res.kv)
        return target_location

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None, target_sizes: Optional[Any] = None) -> List[Optional[torch.Tensor]]:
        targets = target_locations or [None] * len(keys)
        out: list[Optional[torch.Tensor]] = []
        for key, target in zip(keys, targets):
            got = self.get(key, target)
            out.append(got)
            if got is None:  # strict prefix: nothing after a miss
                out.extend([None] * (len(keys) - len(out)))
                break
        return out

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None, target_sizes: Optional[Any] = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: List[str], values: Optional[Any] = None, target_locations: Optional[Any] = None, target_sizes: Optional[Any] = None) -> bool:
        if self.backup_skip:
            return True
        store = self._ready()
        if store is None or values is None or self.geo is None:
            return False
        try:
            store.put_many([(page_tokens(k, self.page_size), self.geo.flat_view(v)) for k, v in zip(keys, values)])
        except Exception as exc:
            log.warning("vua_nixl HiCache backend: storing %d pages failed: %s", len(keys), exc)
            return False
        return True

    # ---- helpers -------------------------------------------------------------------------

    def _ready(self) -> Any:
        store = self.store
        if store is None:
            log.error("vua_nixl HiCache backend: register_mem_pool_host was not called (or the backend is closed)")
        return store

    def _page_starts(self, keys: List[str], host_indices: torch.Tensor) -> Optional[list[int]]:
        P = self.page_size
        if host_indices is None or host_indices.numel() != len(keys) * P:
            log.error("vua_nixl HiCache backend: %d keys but %s host indices (page_size %d)",
                      len(keys), None if host_indices is None else host_indices.numel(), P)
            return None
        return [int(i) for i in host_indices[::P].tolist()]


def _leading_run(ok: list[bool], n: int) -> List[bool]:
    """SGLang counts successes up to the first failure; make that explicit and total."""
    out = []
    for good in ok:
        if not good:
            break
        out.append(True)
    return out + [False] * (n - len(out))

