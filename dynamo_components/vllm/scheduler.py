"""Scheduler side of the connector: lookups, load/save planning, shared-tier KV events.

Runs inside vLLM's scheduler (engine core) process. It never reads KV: ``lookup`` only checks
that a prefix's chunk files exist, in a background thread, and vLLM is asked to retry (``None``)
if the file system has not answered within ``lookup_wait_ms``, so a slow mount never stalls the
scheduling loop. Loads are asynchronous (``is_async=True``): the request waits in
``WAITING_FOR_REMOTE_KVS`` while the workers read, and resumes when every worker has reported it
in ``finished_recving``. Saves happen when a request finishes: every full chunk of prompt *and*
generated tokens whose KV was computed; its blocks stay allocated (``delay_free``) until the
workers report the save landed (``finished_sending``).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Optional

from dynamo_components.vllm import events as ev
from dynamo_components.vllm.config import backend_of as _backend
from dynamo_components.vllm.config import kv_plan, namespace_for, open_store, parallel_sizes, settings_from
from dynamo_components.vllm.metadata import LoadSpec, SaveSpec, VuaConnectorMetadata, VuaWorkerMetadata

log = logging.getLogger(__name__)

#: bound on the hashes remembered as announced (events are idempotent; this only limits repeats)
_ANNOUNCED_MAX = 1 << 20


def eligible(request: Any) -> Optional[str]:
    """Why a request's KV must not be shared through the store (None: it may)."""
    if getattr(request, "lora_request", None) is not None:
        return "LoRA adapter (KV depends on the adapter)"
    if getattr(request, "mm_features", None) or getattr(request, "mm_inputs", None):
        return "multimodal input (placeholder tokens do not identify the KV)"
    if getattr(request, "cache_salt", None):
        return "cache_salt set (per-request isolation)"
    if getattr(request, "prompt_embeds", None) is not None:
        return "prompt embeddings (token ids do not identify the KV)"
    return None


class SchedulerSide:
    def __init__(self, vllm_config: Any, kv_cache_config: Any) -> None:
        self.plan = kv_plan(vllm_config, kv_cache_config)
        self.settings = settings_from(vllm_config, self.plan.block_size)
        self.block_size = self.plan.block_size
        self.chunk = self.settings.chunk_tokens
        tp, pp = parallel_sizes(vllm_config)
        self.world = tp * pp
        # One store per parallel rank: a prefix counts only if every rank's chunks are there.
        self.stores = []
        for pp_rank in range(pp):
            for tp_rank in range(tp):
                ns = namespace_for(self.settings, self.plan, tp, tp_rank, pp, pp_rank)
                agent = self.stores[0].agent if self.stores else None
                self.stores.append(open_store(self.settings, ns, agent=agent))
        log.info(
            "VuaNixlConnector scheduler: store %s, backend %s, chunk %d tokens (block %d), %d rank namespace(s)",
            self.settings.store_root, _backend(self.stores[0]), self.chunk, self.block_size, len(self.stores),
        )
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vua-lookup")
        self._lookups: dict[str, Future] = {}
        self._hits: dict[str, tuple[int, int]] = {}  # req -> (stored tokens, local tokens)
        self._loads: list[LoadSpec] = []
        self._saves: list[SaveSpec] = []
        self._loading: dict[str, LoadSpec] = {}
        self._saving: dict[str, SaveSpec] = {}
        self._present: dict[str, int] = {}  # req -> tokens known to be in the store
        self._loaded: dict[str, dict[int, int]] = {}
        self._saved: dict[str, dict[int, int]] = {}
        self._events: list[Any] = []
        self._announced: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = {"lookups": 0, "hit_tokens": 0, "loads": 0, "saves": 0, "load_shortfall_tokens": 0}

    # ---- lookups --------------------------------------------------------------------------

    def _lookup(self, tokens: list[int]) -> int:
        return min(store.lookup(tokens) for store in self.stores)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[Optional[int], bool]:
        rid = request.request_id
        if eligible(request) is not None:
            return 0, False
        fut = self._lookups.get(rid)
        if fut is None:
            tokens = list(request.all_token_ids)
            if len(tokens) < self.chunk:
                return 0, False
            fut = self._lookups[rid] = self._pool.submit(self._lookup, tokens)
            self.stats["lookups"] += 1
        try:
            hit = fut.result(timeout=self.settings.lookup_wait_s)
        except FutureTimeout:
            return None, False  # the file system is slow: vLLM asks again next step
        except Exception as exc:  # an unreachable store must not fail the request
            log.warning("VuaNixlConnector: lookup failed for %s: %s (treated as a miss)", rid, exc)
            hit = 0
        ext = hit - num_computed_tokens
        if ext <= 0:
            self._hits.pop(rid, None)
            return 0, False
        self._hits[rid] = (hit, num_computed_tokens)
        return ext, True

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        rid = request.request_id
        self._lookups.pop(rid, None)
        hit = self._hits.pop(rid, None)
        if num_external_tokens <= 0 or hit is None:
            return
        _, local = hit
        end = local + num_external_tokens
        block_ids = list(blocks.get_block_ids()[0])
        first = local // self.block_size
        last = math.ceil(end / self.block_size)
        if len(block_ids) < last:
            raise RuntimeError(f"VuaNixlConnector: {rid} has {len(block_ids)} blocks, needs {last} for {end} tokens")
        n_read = math.ceil(end / self.chunk) * self.chunk
        tokens = [int(t) for t in list(request.all_token_ids)[:n_read]]
        spec = LoadSpec(req_id=rid, tokens=tokens, first_block=first, block_ids=block_ids[first:last], num_tokens=end)
        self._loads.append(spec)
        self._loading[rid] = spec
        self.stats["loads"] += 1
        self.stats["hit_tokens"] += num_external_tokens

    def build_connector_meta(self, scheduler_output: Any) -> VuaConnectorMetadata:
        meta = VuaConnectorMetadata(loads=self._loads, saves=self._saves)
        self._loads, self._saves = [], []
        return meta

    # ---- results from the workers -------------------------------------------------------------

    def _verified(self, results: dict[str, dict[int, int]], rid: str) -> int:
        ranks = results.pop(rid, {})
        if len(ranks) < self.world:
            return 0  # a rank that did not report counts as nothing
        return min(ranks.values())

    def update_connector_output(self, output: Any) -> None:
        meta = getattr(output, "kv_connector_worker_meta", None)
        if isinstance(meta, VuaWorkerMetadata):
            for src, dst in ((meta.loaded, self._loaded), (meta.saved, self._saved)):
                for rid, ranks in src.items():
                    dst.setdefault(rid, {}).update(ranks)
        for rid in output.finished_recving or ():
            spec = self._loading.pop(rid, None)
            if spec is None:
                continue
            got = min(self._verified(self._loaded, rid), spec.num_tokens)
            self._present[rid] = got
            full = got - got % self.block_size
            self._announce(spec.tokens[:full])
            if got < spec.num_tokens:
                short = spec.num_tokens - got
                self.stats["load_shortfall_tokens"] += short
                log.warning("VuaNixlConnector: %s loaded %d of %d tokens; vLLM recomputes the rest", rid, got, spec.num_tokens)
                self._withdraw(spec.tokens[: len(spec.tokens)], from_block=full // self.block_size)
        for rid in output.finished_sending or ():
            spec = self._saving.pop(rid, None)
            if spec is None:
                continue
            saved = self._verified(self._saved, rid)
            if saved:
                self._announce(spec.tokens[:saved])
            self._present.pop(rid, None)

    # ---- finish / save -------------------------------------------------------------------------

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, Optional[dict[str, Any]]]:
        rid = request.request_id
        self._lookups.pop(rid, None)
        self._hits.pop(rid, None)
        known = self._present.pop(rid, 0)
        if rid in self._loading:  # still loading: vLLM frees the blocks when the load reports back
            return False, None
        if eligible(request) is not None:
            return False, None
        computed = request.num_computed_tokens - int(getattr(request, "num_in_flight_tokens", 0) or 0)
        all_tokens = list(request.all_token_ids)
        n = min(computed, len(all_tokens), len(block_ids) * self.block_size)
        n -= n % self.chunk
        if n <= 0 or n <= known:
            return False, None
        spec = SaveSpec(req_id=rid, tokens=[int(t) for t in all_tokens[:n]], block_ids=list(block_ids[: n // self.block_size]))
        self._saves.append(spec)
        self._saving[rid] = spec
        self.stats["saves"] += 1
        return True, None

    # ---- events ------------------------------------------------------------------------------

    def _announce(self, tokens: list[int]) -> None:
        if not self.settings.events or len(tokens) < self.block_size:
            return
        hashes = ev.chained_block_hashes(tokens, self.block_size)
        first = 0
        while first < len(hashes) and hashes[first] in self._announced:
            first += 1
        if first == len(hashes):
            return
        event = ev.block_stored(tokens, self.block_size, first_block=first, hashes=hashes)
        with self._lock:
            self._events.append(event)
            for h in hashes[first:]:
                self._announced[h] = None
            while len(self._announced) > _ANNOUNCED_MAX:
                self._announced.popitem(last=False)

    def _withdraw(self, tokens: list[int], from_block: int) -> None:
        if not self.settings.events:
            return
        hashes = ev.chained_block_hashes(tokens, self.block_size)[from_block:]
        if not hashes:
            return
        with self._lock:
            self._events.append(ev.block_removed(hashes))
            for h in hashes:
                self._announced.pop(h, None)

    def take_events(self) -> list[Any]:
        with self._lock:
            out, self._events = self._events, []
        return out

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for store in reversed(self.stores):
            store.close()
