"""vua-nixl engine served as a Dynamo worker: aggregated, prefill or decode.

Run one per process::

    python -m dynamo_components.worker --role prefill --model /models/tiny --store /mnt/kv

The worker serves ``<namespace>.<component>.generate`` through a ``DistributedRuntime`` (token in,
token out: the stock frontend tokenizes with the model directory's tokenizer), registers the model
with ``register_model`` so the frontend and its KV router find it, and publishes KV events:

* shared tier (``EXTERNAL``) for every chunk in the shared store, its own and other workers'
  (see :mod:`dynamo_components.kv_events`), so the router credits *every* worker for a prefix
  any of them stored;
* device tier (``GPU`` medium) for the prompt prefixes in its own hot cache
  (:mod:`dynamo_components.hot_cache`), which it can reuse without reading the store.

Roles and the request protocol (what the frontend sends and expects):

* ``aggregated``: prefill (reusing the store) and decode in one worker.
* ``prefill``: prefill with reuse, save new chunks, answer with the first token and
  ``disaggregated_params.kv_transfer_params`` (``store`` or ``nixl`` mode, see
  :mod:`dynamo_components.handoff`). The frontend discards the token and forwards the params.
* ``decode``: gets ``prefill_result`` with those params, obtains the prompt's KV (load from the
  store, or READ from the prefill worker over NIXL), and streams the generated tokens. If the
  hand-off fails it says so in the log and recomputes: it never decodes from partial KV.

Engine calls run on worker threads (the engine serializes them with its own lock), so the
asyncio loop keeps serving the runtime, health checks and other requests' token streams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Optional

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from dynamo_components.handoff import (
    MODE_NIXL,
    MODE_STORE,
    MODES,
    HandoffError,
    NixlKvExporter,
    NixlKvImporter,
    store_params,
)
from vua_nixl.config import TypedConfig, add_config_flags, config_from_args
from vua_nixl.errors import InvalidInputError

log = logging.getLogger("dynamo_components.worker")

ROLES = ("aggregated", "prefill", "decode")
#: Annotation a client can send (``nvext.annotations``) to pick the hand-off mode per request.
HANDOFF_ANNOTATION = "vua_handoff="


class WorkerConfig(TypedConfig):
    """Everything a worker process needs. Each field is one flag (``--chunk-tokens``) and one
    environment variable (``VUA_NIXL_WORKER_CHUNK_TOKENS``); the Dynamo namespace also reads
    ``DYN_NAMESPACE``, which the Dynamo operator sets in every pod. Store tunables (backend,
    limits, checksums...) are not repeated here: the store reads them from ``VUA_NIXL_*``."""

    model_config = SettingsConfigDict(env_prefix="VUA_NIXL_WORKER_", extra="forbid", populate_by_name=True)

    role: Literal["aggregated", "prefill", "decode"] = Field("aggregated", description="worker role")
    model: str = Field("tiny", description="model directory (or preset name; the frontend needs a directory)")
    served_model_name: Optional[str] = Field(None, description="name clients use (default: the model path)")
    namespace: str = Field("vua", description="Dynamo namespace ($DYN_NAMESPACE when set)",
                           validation_alias=AliasChoices("VUA_NIXL_WORKER_NAMESPACE", "DYN_NAMESPACE"))
    component: Optional[str] = Field(None, description="Dynamo component (default: 'prefill' or 'backend')")
    endpoint: str = Field("generate", description="Dynamo endpoint name")
    store: Optional[str] = Field(None, description="shared store root (omit to run without the store)")
    chunk_tokens: Optional[int] = Field(None, gt=0, description="store chunk size, a multiple of --block-size "
                                        "(default: VUA_NIXL_CHUNK_TOKENS, else 256)")
    block_size: int = Field(16, gt=0, description="engine/router KV block size in tokens")
    handoff: Literal["store", "nixl"] = Field(MODE_STORE, description="prefill->decode KV hand-off mode")  # type: ignore[assignment]
    device: str = Field("cpu", description="torch device")
    max_num_seqs: int = Field(4, gt=0, description="sequences a worker's KV pool is sized for")
    kv_cache_tokens: Optional[int] = Field(None, gt=0, description="paged KV pool size in tokens (default: max-num-seqs x context)")
    default_max_tokens: int = Field(64, gt=0, description="max_tokens when a request gives none")
    events: bool = Field(True, description="publish KV events")
    log_poll_s: float = Field(0.5, gt=0, description="seconds between polls of the store's shared access log")
    validate_s: float = Field(10.0, gt=0, description="seconds between bounded re-checks of advertised chunks")
    handoff_ttl_s: float = Field(60.0, gt=0, description="seconds a NIXL hand-off buffer is kept for the decode side")
    seed: int = Field(0, description="weights seed when --model is a preset")
    stats_file: Optional[str] = Field(None, description="rewrite this JSON file with the worker's counters after each request")
    hot_cache_mb: int = Field(512, ge=0, description="worker-local prefix KV cache (router device tier); 0 disables it")
    partial_reuse: bool = Field(True, description="save and reuse the whole engine blocks of a prompt's partial "
                                "last chunk (a keyed partial block in the store)")
    max_batch: int = Field(8, gt=0, description="sequences decoded together, one forward pass per decode step "
                           "(1: one sequence at a time)")

    def component_name(self) -> str:
        return self.component or ("prefill" if self.role == "prefill" else "backend")


#: The name the rest of the project (and its tests) used before the config was typed.
WorkerOptions = WorkerConfig


@dataclass
class WorkerStats:
    """Counters served on the ``stats`` endpoint (tests and the benchmark read them)."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    computed_tokens: int = 0
    generated_tokens: int = 0
    handoff_store: int = 0
    handoff_nixl: int = 0
    handoff_failures: int = 0
    hot_hits: int = 0
    cancelled: int = 0
    saved_generated_tokens: int = 0
    decode_steps: int = 0  # forward passes of the decode batcher
    decode_batched_tokens: int = 0  # tokens produced by steps that served more than one sequence
    decode_batch_max: int = 0  # largest batch one step served
    ttft_s_total: float = 0.0
    last: dict[str, Any] = field(default_factory=dict)


def http_error_for(exc: BaseException) -> Exception:
    """The Dynamo exception the frontend turns into an HTTP status with ``exc``'s message.

    Invalid requests (a prompt longer than the context, token ids outside the vocabulary) are
    ``InvalidArgument`` (400, the message reaches the client); a full KV pool is 503; other
    engine and store errors are 500 with the error type and message."""
    from dynamo.llm import HttpError
    from dynamo.llm.exceptions import DynamoException, InvalidArgument

    from vua_nixl_engine.errors import OutOfBlocksError

    if isinstance(exc, (DynamoException, HttpError)):
        return exc  # type: ignore[return-value]
    if isinstance(exc, OutOfBlocksError):
        return HttpError(503, f"worker KV cache is full, retry later: {exc}")
    if isinstance(exc, InvalidInputError):
        return InvalidArgument(str(exc))
    return HttpError(500, f"{type(exc).__name__}: {exc}")


def advertise_device(device: str, env: dict[str, str] | None = None) -> str:
    """Make Dynamo advertise this worker's real device type (``/health``, instance listings).

    Dynamo's runtime reports every endpoint as ``cuda`` unless ``CUDA_VISIBLE_DEVICES`` or
    ``NVIDIA_VISIBLE_DEVICES`` says no GPU is visible; it never asks the engine. A worker that
    computes on the CPU sets ``NVIDIA_VISIBLE_DEVICES=void`` in its own environment before the
    runtime starts (read only by container runtimes and Dynamo, so in-process CUDA libraries are
    unaffected). Returns the device type advertised."""
    import torch

    env = os.environ if env is None else env
    kind = torch.device(device).type
    if kind == "cpu":
        cvd = env.get("CUDA_VISIBLE_DEVICES")
        hidden = cvd is not None and cvd.strip().lower() in ("", "-1", "none", "void")
        if not hidden:
            env["NVIDIA_VISIBLE_DEVICES"] = "void"
        return "cpu"
    return "cuda"


class DecodeBatcher:
    """Batched decoding for one worker: every request that needs its next token registers a
    demand; each step takes up to ``max_batch`` waiting sequences and runs **one**
    ``engine.step_batch`` (one forward pass over the batch on the paged cache). Requests join
    and leave between steps; a step that fails is retried one sequence at a time so an error
    fails only its own request."""

    def __init__(self, engine: Any, pool: ThreadPoolExecutor, max_batch: int, stats: "WorkerStats | None" = None) -> None:
        self.engine = engine
        self.pool = pool
        self.max_batch = max(1, int(max_batch))
        self.stats = stats
        self._waiting: list[tuple[Any, asyncio.Future]] = []
        self._task: asyncio.Future | None = None

    async def next_token(self, seq: Any) -> int:
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append((seq, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # let streams that just got a token ask for the next one, so they join this step
            for _ in range(3):
                await asyncio.sleep(0)
            live = [(s, f) for s, f in self._waiting if not f.done()]
            if not live:
                self._waiting = []
                return
            batch, self._waiting = live[: self.max_batch], live[self.max_batch :]
            seqs = [s for s, _ in batch]
            before = [len(s.tokens) for s in seqs]
            try:
                toks = await loop.run_in_executor(self.pool, self.engine.step_batch, seqs)
                results: list[Any] = list(toks)
            except Exception:
                results = []
                for s, n in zip(seqs, before):
                    if len(s.tokens) > n:  # already stepped before the failure
                        results.append(s.tokens[n])
                        continue
                    try:
                        results.append(await loop.run_in_executor(self.pool, self.engine.step, s))
                    except Exception as exc:  # this request's own error
                        results.append(exc)
            st = self.stats
            if st is not None:
                st.decode_steps += 1
                st.decode_batch_max = max(st.decode_batch_max, len(batch))
                if len(batch) > 1:
                    st.decode_batched_tokens += len(batch)
            for (_, fut), res in zip(batch, results):
                if fut.done():
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(int(res))


def _dtype_kv_ok(engine: Any, kv: Any) -> bool:
    return (
        kv.dim() == 5
        and tuple(kv.shape[:2]) == (engine.num_layers, 2)
        and tuple(kv.shape[3:]) == (engine.kv_heads, engine.head_dim)
        and kv.dtype == engine.dtype
    )


class VuaWorker:
    """One Dynamo worker process around one engine (and one store handle)."""

    def __init__(self, opts: WorkerOptions) -> None:
        if opts.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        if opts.handoff not in MODES:
            raise ValueError(f"handoff must be one of {MODES}")
        self.opts = opts
        self.stats = WorkerStats()
        self.engine: Any = None
        self.store: Any = None
        self.partial_store: Any = None
        self.advertiser: Any = None
        self.publisher: Any = None
        self.recorder: Any = None
        self.exporter: NixlKvExporter | None = None
        self.importer: NixlKvImporter | None = None
        self.instance_id: int | None = None
        self.hot: Any = None
        # Engine work is serialized by the engine's lock; a small pool lets a request's token
        # stream, a flush and access-log polling interleave without blocking the event loop.
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="vua-worker")
        self._housekeeping = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vua-house")
        self._stopping = asyncio.Event()
        # Prefills are serialized by the engine anyway; doing lookup -> prefill -> hot-cache
        # insert under one lock makes a concurrent identical prompt wait for its sibling's
        # prefix instead of computing it a second time.
        self._prefill_lock = threading.Lock()
        self.batcher: DecodeBatcher | None = None

    # ---- setup ------------------------------------------------------------------------------
    def build_engine(self) -> None:
        """Load the model, open the store in the model's namespace, and build the engine."""
        from vua_nixl_engine import Engine, load_model, namespace_for

        o = self.opts
        loaded = load_model(o.model, device=o.device, seed=o.seed)
        namespace = namespace_for(loaded)
        ctx = int(loaded.max_context)
        kv_tokens = o.kv_cache_tokens or o.max_num_seqs * (ctx + o.block_size)
        num_blocks = -(-kv_tokens // o.block_size) + 1
        if o.store:
            from vua_nixl.lifecycle.observers import AccessRecorder
            from vua_nixl.store import KVStore

            # Every put, hit and miss goes to the root's shared access log: `vua-nixl stats`
            # sees the workers' traffic, the pruner their recency, and other workers' shared-tier
            # advertisers what this one stored.
            self.recorder = AccessRecorder()
            self.store = KVStore(o.store, namespace, chunk_tokens=o.chunk_tokens, observers=[self.recorder])
            if self.store.chunk_tokens % o.block_size:
                chunk = self.store.chunk_tokens
                self.store.close()
                raise InvalidInputError(f"chunk_tokens {chunk} (--chunk-tokens or VUA_NIXL_CHUNK_TOKENS) must be a "
                                        f"multiple of --block-size {o.block_size}")
        self.engine = Engine(loaded, store=self.store, device=o.device, block_size=o.block_size, num_blocks=num_blocks)
        if self.store is not None and o.partial_reuse:
            from vua_nixl_engine.engine import open_partial_store

            self.partial_store = open_partial_store(self.store, o.block_size, observers=[self.recorder])
            self.engine.attach_partial_store(self.partial_store)
        if o.hot_cache_mb > 0:
            from dynamo_components.hot_cache import HotPrefixCache

            self.hot = HotPrefixCache(o.block_size, o.hot_cache_mb << 20)
        log.info(
            "engine ready: %s, %d layers, %d KV heads, block %d, %d blocks, store %s",
            loaded.model_id, self.engine.num_layers, self.engine.kv_heads, o.block_size, num_blocks,
            f"{o.store} (chunk {self.store.chunk_tokens})" if self.store is not None else "none",
        )

    def _setup_events(self, endpoint: Any) -> None:
        from dynamo_components.kv_events import (
            MEDIUM_DEVICE,
            KvTierPublisher,
            SharedTierAdvertiser,
        )
        from vua_nixl.lifecycle.accesslog import LogFollower

        o = self.opts
        self.publisher = KvTierPublisher(endpoint, o.block_size)
        if self.hot is not None:
            pub = self.publisher
            self.hot.on_insert = lambda toks, first, hashes: pub.stored(
                toks, first, len(hashes), MEDIUM_DEVICE, hashes=hashes
            )
            self.hot.on_evict = lambda hashes: pub.removed(hashes, MEDIUM_DEVICE)
        if self.store is None:
            return
        follower = LogFollower(self.store.paths.root, self.store.fingerprint)
        self.advertiser = SharedTierAdvertiser(self.publisher, self.store, follower)
        self.store.observers.append(self.advertiser)
        n = self.advertiser.replay()
        log.info("shared tier: %d chunks replayed from %s", n, self.store.paths.root)

    # ---- serving ----------------------------------------------------------------------------
    async def serve(self) -> None:
        """Build everything, register with Dynamo, serve until SIGTERM/SIGINT."""
        from dynamo.llm import ModelInput, ModelRuntimeConfig, ModelType, WorkerType, register_model
        from dynamo.runtime import DistributedRuntime

        o = self.opts
        loop = asyncio.get_running_loop()
        device_type = advertise_device(o.device)
        await loop.run_in_executor(None, self.build_engine)
        self.batcher = DecodeBatcher(self.engine, self._pool, o.max_batch, self.stats)
        if o.role == "prefill":
            try:
                self.exporter = NixlKvExporter(ttl_s=o.handoff_ttl_s)
            except Exception as exc:  # the store hand-off still works without NIXL UCX
                log.warning("NIXL UCX exporter unavailable (%s): using the store hand-off only", exc)
        if o.role == "decode":
            try:
                self.importer = NixlKvImporter()
            except Exception as exc:  # the store path still works without NIXL UCX
                log.warning("NIXL UCX importer unavailable (%s): nixl hand-offs will be recomputed", exc)

        runtime = DistributedRuntime(
            loop,
            os.environ.get("DYN_DISCOVERY_BACKEND", "file"),
            os.environ.get("DYN_REQUEST_PLANE", "tcp"),
            event_plane=os.environ.get("DYN_EVENT_PLANE", "zmq"),
        )
        comp = o.component_name()
        endpoint = runtime.endpoint(f"{o.namespace}.{comp}.{o.endpoint}")
        stats_ep = runtime.endpoint(f"{o.namespace}.{comp}.stats")
        self.instance_id = int(endpoint.connection_id())
        if o.events:
            self._setup_events(endpoint)

        serving = asyncio.ensure_future(endpoint.serve_endpoint(self.generate, graceful_shutdown=True))
        stats_serving = asyncio.ensure_future(stats_ep.serve_endpoint(self.stats_handler))

        rc = ModelRuntimeConfig()
        rc.total_kv_blocks = int(self.engine.paged.num_blocks)
        rc.max_num_seqs = int(o.max_num_seqs)
        rc.context_length = int(self.engine.max_context)
        rc.enable_local_indexer = bool(o.events)
        model_path = o.model
        name = o.served_model_name or model_path
        if o.role == "prefill":
            mtype, wtype, needs = ModelType.Prefill, WorkerType.Prefill, [[WorkerType.Decode]]
        elif o.role == "decode":
            mtype, wtype, needs = ModelType.Chat | ModelType.Completions, WorkerType.Decode, [[WorkerType.Prefill]]
        else:
            mtype, wtype, needs = ModelType.Chat | ModelType.Completions, WorkerType.Aggregated, None
        await register_model(
            ModelInput.Tokens, mtype, endpoint, model_path, name,
            worker_type=wtype, needs=needs, kv_cache_block_size=o.block_size, runtime_config=rc,
        )
        log.info(
            "%s worker %x serving %s.%s.%s (model %s, hand-off %s, device %s, max batch %d)",
            o.role, self.instance_id, o.namespace, comp, o.endpoint, name, o.handoff, device_type, o.max_batch,
        )
        self.write_stats()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        house = asyncio.ensure_future(self._housekeeping_loop())
        stop_wait = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait([serving, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        log.info("worker %x shutting down", self.instance_id)
        house.cancel()
        runtime.shutdown()
        for fut in (serving, stats_serving):
            fut.cancel()
        self.close()

    def close(self) -> None:
        """Flush pending saves and release sockets, NIXL registrations and the store."""
        try:
            if self.engine is not None:
                self.engine.flush(timeout=10)
                self.engine.close()
        except Exception:  # pragma: no cover - best effort at exit
            log.warning("engine close failed", exc_info=True)
        for obj in (self.exporter, self.importer, self.publisher):
            try:
                if obj is not None:
                    obj.close()
            except Exception:  # pragma: no cover
                log.debug("close failed", exc_info=True)
        if self.store is not None:
            self.store.close()

    async def _housekeeping_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last_validate = time.monotonic()
        while True:
            await asyncio.sleep(self.opts.log_poll_s)
            try:
                if self.recorder is not None:
                    await loop.run_in_executor(self._housekeeping, self.recorder.flush)
                if self.advertiser is not None:
                    await loop.run_in_executor(self._housekeeping, self.advertiser.poll_log)
                    if time.monotonic() - last_validate > self.opts.validate_s:
                        last_validate = time.monotonic()
                        await loop.run_in_executor(self._housekeeping, self.advertiser.validate)
                if self.exporter is not None:
                    await loop.run_in_executor(self._housekeeping, self.exporter.reap)
            except Exception:
                log.warning("housekeeping failed", exc_info=True)

    def stats_body(self) -> dict[str, Any]:
        """This worker's counters plus identity, as served and as written to ``--stats-file``."""
        body = asdict(self.stats)
        body.update(
            instance_id=self.instance_id,
            role=self.opts.role,
            pid=os.getpid(),
            handoff=self.opts.handoff,
            advertised_blocks=self.advertiser.advertised_blocks if self.advertiser else 0,
            live_handoff_buffers=self.exporter.live_buffers if self.exporter else 0,
            hot_cache={"entries": len(self.hot), "bytes": self.hot.nbytes} if self.hot is not None else None,
            store=self.store.stats() if self.store is not None else None,
            partial_tail=dict(self.engine.tail_stats) if self.engine is not None and self.engine.partial_store is not None else None,
        )
        return body

    def write_stats(self) -> None:
        """Atomically rewrite ``--stats-file`` (tests and benchmarks read it)."""
        path = self.opts.stats_file
        if not path:
            return
        try:
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as fh:
                json.dump(self.stats_body(), fh, default=str)
            os.replace(tmp, path)
        except OSError:
            log.warning("cannot write %s", path, exc_info=True)

    async def stats_handler(self, request: Any, context: Any = None) -> AsyncIterator[dict[str, Any]]:
        """``<ns>.<component>.stats``: this worker's counters (one response)."""
        body = self.stats_body()
        if isinstance(request, dict) and request.get("op") == "reset":
            self.stats = WorkerStats()
            if self.batcher is not None:
                self.batcher.stats = self.stats
        yield body

    # ---- request handling ---------------------------------------------------------------------
    def _handoff_mode(self, request: dict[str, Any]) -> str:
        for a in request.get("annotations") or []:
            if isinstance(a, str) and a.startswith(HANDOFF_ANNOTATION):
                mode = a[len(HANDOFF_ANNOTATION) :]
                if mode in MODES:
                    return mode
        return self.opts.handoff

    async def generate(self, request: dict[str, Any], context: Any = None) -> AsyncIterator[dict[str, Any]]:
        """The ``generate`` endpoint: dispatch on role; errors end the stream with an error."""
        self.stats.requests += 1
        try:
            if self.opts.role == "prefill":
                yield await self._prefill(request)
            else:
                async for out in self._decode(request, context):
                    yield out
        except Exception as exc:
            self.stats.errors += 1
            err = http_error_for(exc)
            if getattr(err, "code", 400) >= 500:
                log.exception("request failed")
            else:
                log.info("request rejected: %s", exc)
            raise err from exc
        finally:
            self.write_stats()

    def _run_prefill(self, tokens: list[int], save: bool = True) -> tuple[Any, Any]:
        """Prefill with the best reuse at hand: this worker's hot cache or the shared store.

        The engine computes at least the last prompt token (it needs its logits), so at most
        ``len(tokens) - 1`` tokens are reused. Afterwards the prompt's KV joins the hot cache.
        """
        with self._prefill_lock:
            return self._run_prefill_locked(tokens, save)

    def _run_prefill_locked(self, tokens: list[int], save: bool) -> tuple[Any, Any]:
        seq = None
        hot_n, hot_kv = (0, None)
        if self.hot is not None and len(tokens) > 1:
            hot_n, hot_kv = self.hot.lookup(tokens, max_tokens=len(tokens) - 1)
            if hot_n and self.store is not None:
                # the store may hold a longer prefix (written by another worker): take the longer
                if int(self.engine.stored_prefix(tokens[:-1])) > hot_n:
                    hot_n, hot_kv = 0, None
        try:
            if hot_n:
                seq = self.engine.start_with_kv(tokens, hot_kv)
                seq.prompt_len = len(tokens)  # all of it is prompt (new full chunks still get saved)
                self.stats.hot_hits += 1
            else:
                seq = self.engine.start(tokens)
            st = self.engine.prefill(seq, save=save)
            if self.hot is not None:
                self.hot.insert(tokens, self.engine.export_kv(seq))
        except BaseException:
            if seq is not None:
                self.engine.free(seq)
            raise
        return seq, st

    def _account_prefill(self, st: Any) -> None:
        self.stats.prompt_tokens += st.prompt_tokens
        self.stats.reused_tokens += st.reused_tokens
        self.stats.computed_tokens += st.computed_tokens
        self.stats.ttft_s_total += st.ttft_s
        self.stats.last = {
            "prompt_tokens": st.prompt_tokens,
            "reused_tokens": st.reused_tokens,
            "computed_tokens": st.computed_tokens,
            "ttft_s": st.ttft_s,
            "load_s": st.load_s,
            "compute_s": st.compute_s,
        }

    async def _prefill(self, request: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        tokens = [int(t) for t in request["token_ids"]]
        mode = self._handoff_mode(request)
        if mode == MODE_NIXL and self.exporter is None:
            mode = MODE_STORE
        if mode == MODE_STORE and self.store is None:
            mode = MODE_NIXL if self.exporter is not None else MODE_STORE

        def work() -> tuple[Any, dict[str, Any]]:
            seq, st = self._run_prefill(tokens)
            try:
                if mode == MODE_NIXL:
                    kv = self.engine.export_kv(seq)
                    params = self.exporter.export(  # type: ignore[union-attr]
                        kv, first_token=st.first_token, prompt_tokens=len(tokens), namespace=str(self.engine.namespace.model)
                    )
                    self.stats.handoff_nixl += 1
                else:
                    # Cache-mediated: the decode worker can only load what has landed.
                    stored = 0
                    if self.store is not None:
                        self.engine.flush(timeout=60)
                        stored = int(self.engine.stored_prefix(tokens))
                        if self.advertiser is not None:
                            self.advertiser.note_prompt(tokens)
                    params = store_params(
                        prompt_tokens=len(tokens), stored_tokens=stored, first_token=st.first_token,
                        namespace=str(self.engine.namespace.model),
                    )
                    self.stats.handoff_store += 1
            finally:
                self.engine.free(seq)
            return st, params

        st, params = await loop.run_in_executor(self._pool, work)
        self._account_prefill(st)
        if mode == MODE_NIXL and self.advertiser is not None:
            self._after_request(tokens)
        return {
            "token_ids": [st.first_token],
            "disaggregated_params": {"kv_transfer_params": params},
            "completion_usage": {
                "prompt_tokens": len(tokens),
                "completion_tokens": 1,
                "total_tokens": len(tokens) + 1,
                "prompt_tokens_details": {"cached_tokens": int(st.reused_tokens)},
            },
        }

    def _after_request(self, tokens: list[int]) -> None:
        """Once write-behind saves land, make sure the router hears about the prompt's chunks."""
        if self.advertiser is None:
            return

        def job() -> None:
            try:
                self.engine.flush(timeout=60)
                self.advertiser.note_prompt(tokens)
            except Exception:
                log.warning("advertising a prompt's chunks failed", exc_info=True)

        self._housekeeping.submit(job)

    def _start_decode(self, tokens: list[int], kv_params: dict[str, Any] | None) -> tuple[Any, int, int, int]:
        """Return (sequence, first_token, reused_tokens, computed_tokens) for a decode request."""
        mode = (kv_params or {}).get("mode")
        if mode == MODE_NIXL:
            try:
                if self.importer is None:
                    raise HandoffError("no NIXL importer in this worker")
                t0 = time.perf_counter()
                # Straight into the engine's device memory (VRAM on a GPU worker): no host bounce.
                kv = self.importer.fetch(kv_params, device=str(self.engine.device))  # type: ignore[arg-type]
                if not _dtype_kv_ok(self.engine, kv) or kv.shape[2] != len(tokens):
                    raise HandoffError(f"hand-off KV of shape {tuple(kv.shape)} does not fit a {len(tokens)}-token prompt")
                first = int(kv_params["first_token"])  # type: ignore[index]
                seq = self.engine.start_with_kv(tokens + [first], kv)
                self.stats.handoff_nixl += 1
                self.stats.last = {
                    "prompt_tokens": len(tokens), "reused_tokens": len(tokens), "computed_tokens": 0,
                    "handoff": MODE_NIXL, "handoff_s": time.perf_counter() - t0,
                }
                log.debug("nixl hand-off of %d tokens in %.1f ms", len(tokens), 1e3 * (time.perf_counter() - t0))
                return seq, first, len(tokens), 0
            except (HandoffError, KeyError, TypeError, ValueError) as exc:
                self.stats.handoff_failures += 1
                log.warning("NIXL hand-off failed, recomputing the prompt instead: %s", exc)
        # store mode, no params (aggregated), or a failed direct hand-off
        seq, st = self._run_prefill(tokens, save=self.opts.role == "aggregated")
        if mode == MODE_STORE:
            self.stats.handoff_store += 1
            expect = (kv_params or {}).get("first_token")
            if expect is not None and int(expect) != st.first_token:
                log.warning("decode first token %d differs from the prefill worker's %d", st.first_token, expect)
        self._account_prefill(st)
        self.stats.last["handoff"] = mode or "none"
        return seq, st.first_token, st.reused_tokens, st.computed_tokens

    async def _decode(self, request: dict[str, Any], context: Any) -> AsyncIterator[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        tokens = [int(t) for t in request["token_ids"]]
        stop = request.get("stop_conditions") or {}
        max_tokens = int(stop.get("max_tokens") or self.opts.default_max_tokens)
        min_tokens = int(stop.get("min_tokens") or 0)
        stop_ids: set[int] = set()
        if not stop.get("ignore_eos"):
            stop_ids.update(int(t) for t in (request.get("eos_token_ids") or []))
            stop_ids.update(int(t) for t in (stop.get("stop_token_ids_hidden") or []))
        stop_ids.update(int(t) for t in (stop.get("stop_token_ids") or []))
        prefill_result = request.get("prefill_result") or {}
        kv_params = ((prefill_result.get("disaggregated_params") or {}).get("kv_transfer_params")) or None
        cached = ((prefill_result.get("prompt_tokens_details") or {}).get("cached_tokens")) if prefill_result else None

        seq, first, reused, _computed = await loop.run_in_executor(self._pool, self._start_decode, tokens, kv_params)
        if cached is None:
            cached = reused
        generated = 0
        finish: str | None = None
        output: list[int] = []
        try:
            tok = first
            while True:
                generated += 1
                output.append(tok)
                self.stats.generated_tokens += 1
                if generated >= min_tokens and tok in stop_ids:
                    finish = "stop"
                elif generated >= max_tokens or len(tokens) + generated >= self.engine.max_context:
                    finish = "length"
                elif context is not None and context.is_stopped():
                    finish = "cancelled"
                    self.stats.cancelled += 1
                out: dict[str, Any] = {"token_ids": [tok]}
                if finish:
                    out["finish_reason"] = finish
                    out["completion_usage"] = {
                        "prompt_tokens": len(tokens),
                        "completion_tokens": generated,
                        "total_tokens": len(tokens) + generated,
                        "prompt_tokens_details": {"cached_tokens": int(cached)},
                    }
                    yield out
                    break
                yield out
                if self.batcher is None:
                    self.batcher = DecodeBatcher(self.engine, self._pool, self.opts.max_batch, self.stats)
                tok = await self.batcher.next_token(seq)
        finally:
            self.stats.last = {**self.stats.last, "output": output, "finish_reason": finish}
            full = list(seq.tokens)
            await loop.run_in_executor(self._pool, self._end_sequence, seq)
            self._after_request(full)

    def _end_sequence(self, seq: Any) -> None:
        """Save the KV of the prompt and the generated tokens (full chunks), then free."""
        try:
            if self.store is not None:
                self.engine.save_sequence(seq)
                # chunks saved during decoding (engine.save_during_decode) count too
                self.stats.saved_generated_tokens += max(0, seq.stored_tokens - seq.prompt_len)
        except Exception:
            log.warning("saving a finished sequence failed", exc_info=True)
        finally:
            self.engine.free(seq)


# ---- command line ---------------------------------------------------------------------------------


#: Per-process flags the launcher sets itself (not shared by the graph launcher).
PROCESS_FIELDS = ("role", "component", "endpoint")


def add_worker_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by the worker entry point and the graph launcher: one per WorkerConfig field."""
    add_config_flags(p, WorkerConfig, [f for f in WorkerConfig.model_fields if f not in PROCESS_FIELDS])


def options_from_args(args: argparse.Namespace, role: str) -> WorkerConfig:
    return config_from_args(WorkerConfig, args, role=role)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynamo_components.worker", description=__doc__.split("\n\n")[0])
    add_config_flags(p, WorkerConfig, PROCESS_FIELDS)
    p.add_argument("-v", "--verbose", action="store_true")
    add_worker_arguments(p)
    args = p.parse_args(argv)
    opts = config_from_args(WorkerConfig, args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s {opts.role}[%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if opts.role != "prefill" and Path(opts.model).is_dir() is False and opts.served_model_name is None:
        log.warning("--model %s is not a directory: the frontend needs a model directory to tokenize", opts.model)
    worker = VuaWorker(opts)
    try:
        import uvloop

        uvloop.run(worker.serve())
    except ImportError:  # pragma: no cover
        asyncio.run(worker.serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
