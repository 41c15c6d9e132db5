"""Worker side of the connector: register the paged KV cache, load and save in the background.

Every transfer goes through the store (one NIXL agent per worker) and a staging buffer in the
store's canonical form, on the same device as the KV cache:

  load:  NIXL reads the chunk files into the staging buffer (the store verifies every header and
         checksum and stops at the first bad or missing chunk), then one scatter per layer plane
         places the *verified* tokens into vLLM's blocks. Blocks beyond the verified prefix are
         reported through ``get_block_ids_with_load_errors`` and vLLM recomputes them; their
         contents are never written from an unverified buffer.
  save:  one gather per layer plane copies the finished request's blocks into the staging buffer,
         then the store writes every chunk it does not have yet. vLLM keeps those blocks
         allocated until the save is reported (``finished_sending``), so the copy needs no
         synchronization with later steps.

Both run on background threads (one for loads, one for saves) so neither the forward pass nor
the scheduler waits for storage. On GPU the copies run on their own CUDA stream and are
synchronized before a load is reported done.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

import torch

from dynamo_components.vllm.config import backend_of as _backend
from dynamo_components.vllm.config import kv_plan, namespace_for, open_store, parallel_sizes, settings_from
from dynamo_components.vllm.metadata import LoadSpec, SaveSpec, VuaConnectorMetadata, VuaWorkerMetadata
from dynamo_components.vllm.paged import PagedKV

log = logging.getLogger(__name__)


def _parallel_ranks() -> tuple[int, int]:
    from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

    return int(get_tensor_model_parallel_rank()), int(get_pp_group().rank_in_group)


class WorkerSide:
    def __init__(self, vllm_config: Any, kv_cache_config: Any, ranks: Optional[tuple[int, int]] = None) -> None:
        from vua_nixl.dtypes import torch_dtype

        self.plan = kv_plan(vllm_config, kv_cache_config)
        self.settings = settings_from(vllm_config, self.plan.block_size)
        self.block_size = self.plan.block_size
        self.chunk = self.settings.chunk_tokens
        tp, pp = parallel_sizes(vllm_config)
        tp_rank, pp_rank = ranks if ranks is not None else _parallel_ranks()
        self.rank = pp_rank * tp + tp_rank
        self.namespace = namespace_for(self.settings, self.plan, tp, tp_rank, pp, pp_rank)
        self.store = open_store(self.settings, self.namespace)
        self.dtype = torch_dtype(self.plan.store_dtype)
        self.paged: Optional[PagedKV] = None
        self._load_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vua-load")
        self._save_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vua-save")
        self._loads: dict[str, Future] = {}
        self._saves: dict[str, Future] = {}
        self._finished_seen: set[str] = set()
        self._load_errors: set[int] = set()
        self._report = VuaWorkerMetadata()
        self._staging: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._stream: Any = None
        log.info("VuaNixlConnector worker rank %d: store %s, backend %s, namespace %s", self.rank,
                 self.settings.store_root, _backend(self.store), self.namespace.fingerprint(self.chunk).hex()[:12])

    # ---- registration --------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        missing = [n for n in self.plan.layer_names if n not in kv_caches]
        if missing:
            raise ValueError(f"VuaNixlConnector: KV caches missing for layers {missing[:4]}")
        tensors = [kv_caches[n] if isinstance(kv_caches[n], torch.Tensor) else kv_caches[n][0] for n in self.plan.layer_names]
        self.paged = PagedKV(
            tensors, num_blocks=self.plan.num_blocks, block_size=self.block_size, num_kv_heads=self.plan.num_kv_heads,
            head_size=self.plan.head_size, mla=self.plan.mla, names=self.plan.layer_names,
        )
        if self.paged.device.type == "cuda":
            self._stream = torch.cuda.Stream(device=self.paged.device)
        # The staging buffers are the NIXL-visible memory: allocate them once, up front, so the
        # store registers them with its agent once (registrations of caller buffers are cached).
        for kind in ("load", "save"):
            self._staging_for(kind, self.settings.staging_tokens)
        log.info("VuaNixlConnector: registered %d KV layers (%s, %s)", self.paged.num_layers,
                 tuple(tensors[0].shape), self.paged.device)

    def _staging_for(self, kind: str, tokens: int) -> torch.Tensor:
        """A canonical-form buffer of at least ``tokens`` tokens (grown by doubling)."""
        buf = self._staging.get(kind)
        tdim = 1 if self.plan.mla else 2
        if buf is None or buf.shape[tdim] < tokens:
            cap = max(tokens, 2 * buf.shape[tdim]) if buf is not None else tokens
            cap = -(-cap // self.chunk) * self.chunk
            shape = self.namespace.layout.shape(cap)
            assert self.paged is not None
            buf = torch.empty(shape, dtype=self.dtype, device=self.paged.device)
            self._staging[kind] = buf
        return buf.narrow(tdim, 0, tokens)

    # ---- submission (called on the model runner's thread) ---------------------------------------

    def _fence(self) -> Any:
        if self._stream is None:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def start_loads(self, meta: VuaConnectorMetadata) -> None:
        for spec in meta.loads:
            self._loads[spec.req_id] = self._load_pool.submit(self._load, spec)

    def start_saves(self, meta: VuaConnectorMetadata) -> None:
        fence = self._fence() if meta.saves else None
        for spec in meta.saves:
            self._saves[spec.req_id] = self._save_pool.submit(self._save, spec, fence)

    # ---- background jobs -------------------------------------------------------------------------

    def _load(self, spec: LoadSpec) -> tuple[int, set[int]]:
        from vua_nixl import VuaNixlError

        assert self.paged is not None, "register_kv_caches was not called"
        got = 0
        staging = self._staging_for("load", len(spec.tokens))
        try:
            got = self.store.get(spec.tokens, out=staging).tokens
        except (VuaNixlError, OSError) as exc:
            log.warning("VuaNixlConnector: load of %s failed: %s", spec.req_id, exc)
        valid = 0
        for i in range(len(spec.block_ids)):
            end = min((spec.first_block + i + 1) * self.block_size, spec.num_tokens)
            if end > got:
                break
            valid += 1
        try:
            if valid:
                self._copy(lambda: self.paged.scatter(spec.block_ids[:valid], staging, spec.first_block * self.block_size))
        except Exception:
            log.exception("VuaNixlConnector: placing loaded KV of %s failed", spec.req_id)
            valid, got = 0, 0
        bad = set(spec.block_ids[valid:])
        loaded = min(got, spec.num_tokens) if not bad else (spec.first_block + valid) * self.block_size
        return loaded, bad

    def _save(self, spec: SaveSpec, fence: Any) -> int:
        from vua_nixl import VuaNixlError

        assert self.paged is not None, "register_kv_caches was not called"
        staging = self._staging_for("save", len(spec.tokens))
        try:
            self._copy(lambda: self.paged.gather(spec.block_ids, staging), fence)
            return self.store.put(spec.tokens, staging)
        except (VuaNixlError, OSError) as exc:
            log.warning("VuaNixlConnector: save of %s failed, nothing published: %s", spec.req_id, exc)
        except Exception:
            log.exception("VuaNixlConnector: save of %s failed", spec.req_id)
        return 0

    def _copy(self, fn: Any, fence: Any = None) -> None:
        if self._stream is None:
            fn()
            return
        with torch.cuda.stream(self._stream):
            if fence is not None:
                self._stream.wait_event(fence)
            fn()
        self._stream.synchronize()

    # ---- completion ------------------------------------------------------------------------------

    def get_finished(self, finished_req_ids: set[str]) -> tuple[Optional[set[str]], Optional[set[str]]]:
        self._finished_seen |= set(finished_req_ids)
        recving: set[str] = set()
        for rid, fut in list(self._loads.items()):
            if fut.done():
                del self._loads[rid]
                loaded, bad = fut.result()
                self._load_errors |= bad
                self._report.loaded[rid] = {self.rank: loaded}
                recving.add(rid)
        sending: set[str] = set()
        for rid, fut in list(self._saves.items()):
            if fut.done() and rid in self._finished_seen:
                del self._saves[rid]
                self._finished_seen.discard(rid)
                self._report.saved[rid] = {self.rank: fut.result()}
                sending.add(rid)
        self._finished_seen &= set(self._saves)  # only ids whose save is still running matter
        return (sending or None), (recving or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    def build_worker_meta(self) -> Optional[VuaWorkerMetadata]:
        if not self._report.loaded and not self._report.saved:
            return None
        out, self._report = self._report, VuaWorkerMetadata()
        return out

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Block until every submitted load and save has finished (shutdown, tests)."""
        for fut in list(self._loads.values()) + list(self._saves.values()):
            fut.result(timeout=timeout)

    def shutdown(self) -> None:
        self._load_pool.shutdown(wait=True)
        self._save_pool.shutdown(wait=True)
        self._staging.clear()
        self.store.close()
