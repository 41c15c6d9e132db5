"""``VuaNixlConnector``: vLLM V1 KV connector over the shared vua-nixl store.

This module imports vLLM (the class must subclass ``KVConnectorBase_V1``); the package
``dynamo_components.vllm`` only imports it when the class is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Optional

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from dynamo_components.vllm.metadata import VuaConnectorMetadata

if TYPE_CHECKING:  # pragma: no cover
    from dynamo_components.vllm.scheduler import SchedulerSide
    from dynamo_components.vllm.worker import WorkerSide


class VuaNixlConnector(KVConnectorBase_V1):
    """Shared, persistent prefix cache for vLLM: the vua-nixl store, read and written through NIXL.

    Scheduler side: store lookups (no KV read, never blocking the scheduler), async loads,
    saves of every full chunk when a request finishes (prompt and generated tokens), and
    ``BlockStored``/``BlockRemoved`` events for Dynamo's router (external tier).
    Worker side: background loads into and saves from vLLM's paged blocks through a staging
    buffer; failed chunks are reported so vLLM recomputes exactly those blocks.
    """

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        if kv_cache_config is None:
            raise ValueError("VuaNixlConnector needs vLLM's kv_cache_config (vLLM >= 0.11)")
        self._scheduler: Optional["SchedulerSide"] = None
        self._worker: Optional["WorkerSide"] = None
        if role == KVConnectorRole.SCHEDULER:
            from dynamo_components.vllm.scheduler import SchedulerSide

            self._scheduler = SchedulerSide(vllm_config, kv_cache_config)
        else:
            from dynamo_components.vllm.worker import WorkerSide

            self._worker = WorkerSide(vllm_config, kv_cache_config)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is only a future miss

    # ---- worker side ------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        if isinstance(meta, VuaConnectorMetadata):
            self._worker.start_loads(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous, between steps (is_async=True)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return  # saves read finished requests' blocks off the critical path

    def wait_for_save(self) -> None:
        assert self._worker is not None
        meta = self._connector_metadata
        if isinstance(meta, VuaConnectorMetadata):
            self._worker.start_saves(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[Optional[set[str]], Optional[set[str]]]:
        assert self._worker is not None
        return self._worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self._worker is not None
        return self._worker.get_block_ids_with_load_errors()

    def build_connector_worker_meta(self) -> Optional[KVConnectorWorkerMetadata]:
        if self._worker is None:
            return None
        return self._worker.build_worker_meta()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.shutdown()

    # ---- scheduler side -----------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[Optional[int], bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        assert self._scheduler is not None
        self._scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, Optional[dict[str, Any]]]:
        assert self._scheduler is not None
        return self._scheduler.request_finished(request, block_ids)

    def take_events(self) -> Iterable[Any]:
        if self._scheduler is None:
            return ()
        return self._scheduler.take_events()
