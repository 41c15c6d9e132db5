"""The same nixlbench matrix through the vua_nixl store's put/get path ("store" rows).

Mapping from nixlbench's terms to the store's:

* block size  -> chunk bytes: a KV layout and ``chunk_tokens`` are chosen so one chunk's payload
  is exactly one block (headers are extra and not counted, so bandwidths compare payload bytes);
* batch size  -> chunks per request (``batch * chunk_tokens`` tokens);
* num_threads -> requests per call: one ``put_many`` / ``get_many`` of ``num_threads`` requests,
  which the store turns into one NIXL transfer, the same bytes in flight as nixlbench's threads;
* iterations / warm-up per thread -> calls, with nixlbench's counts for that block size;
* op WRITE    -> ``put_many`` of fresh chunks (the previous iteration's chunks are deleted
  outside the timed region, since ``put`` skips chunks already present);
* op READ     -> ``get_many`` into caller-owned, page-aligned output tensors (the way an engine
  loads into its own KV buffer, registered once), after one untimed ``put``;
* storage_enable_direct -> ``direct_io``; posix_api_type -> ``posix_io``; backend -> backend.

The store's work per call (key hashing, opening one file per chunk, headers, XXH3 checksums,
temp-file + rename publishing on writes, validation on reads) is all inside the timed region:
that overhead is exactly what the store/raw ratio is meant to expose. The store API is
synchronous, so its rows have no Prep/Post split: Tx is the whole call.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .nbconfig import NixlbenchConfig, format_bytes
from .raw import RunOptions
from .results import BenchRow, LatencyStats

log = logging.getLogger(__name__)

POSIX_API_TO_STORE = {"AIO": "aio", "URING": "uring", "POSIXAIO": "posix_aio"}


@dataclass(frozen=True)
class StoreShape:
    """The KV layout the store bench uses for one block size."""

    num_layers: int
    kv_heads: int
    head_dim: int
    mla: bool
    dtype: str
    chunk_tokens: int

    @property
    def itemsize(self) -> int:
        return {"bfloat16": 2, "uint8": 1}[self.dtype]

    @property
    def chunk_bytes(self) -> int:
        per_tok = self.head_dim * self.itemsize * (1 if self.mla else 2 * self.kv_heads)
        return self.num_layers * self.chunk_tokens * per_tok


def store_shape_for(block: int, chunk_tokens: int = 256, mode: str = "model") -> StoreShape:
    """A layout whose chunk payload is exactly ``block`` bytes.

    ``model`` (default) looks like a real GQA model: bf16, head_dim 128, up to 8 KV heads and as
    many layers as the block needs, so a chunk is ``2 * layers`` strided segments in memory,
    like an engine's KV; for blocks under 128 KiB ``chunk_tokens`` shrinks instead. ``flat`` is
    one contiguous uint8 latent per chunk (an MLA-like single layer): the store's best case.
    """
    if block <= 0:
        raise ValueError("block size must be positive")
    if mode == "model":
        per_layer_head = chunk_tokens * 2 * 128 * 2  # K+V, head_dim 128, bf16
        if block % per_layer_head == 0:
            units = block // per_layer_head
            for h in (8, 4, 2, 1):
                if units % h == 0:
                    return StoreShape(units // h, h, 128, False, "bfloat16", chunk_tokens)
        if block % 512 == 0:  # one layer, one head, fewer tokens per chunk
            return StoreShape(1, 1, 128, False, "bfloat16", block // 512)
        mode = "flat"
    if mode == "flat":
        c = chunk_tokens if block % chunk_tokens == 0 else 1
        return StoreShape(1, 1, block // c, True, "uint8", c)
    raise ValueError(f"unknown store layout mode {mode!r} (model, flat)")


def model_shape_for(block: int, model: Any, tp: int = 1, dtype: str = "bfloat16") -> Optional[StoreShape]:
    """``model``'s own KV layout (a :class:`~vua_nixl_bench.plan.ModelShape`, one TP rank) with
    as many tokens per chunk as make one chunk exactly ``block`` bytes; None if none do."""
    per_token = model.kv_bytes_per_token(dtype, tp)
    if block <= 0 or block % per_token:
        return None
    if model.mla:
        return StoreShape(model.num_layers, 1, model.kv_lora_rank + model.qk_rope_head_dim, True, dtype, block // per_token)
    return StoreShape(model.num_layers, model.kv_heads_per_rank(tp), model.head_dim, False, dtype, block // per_token)


_PLAN_LINE = re.compile(r"vua-nixl plan --model (\S+?)`?\s.*?--tokens \d+(?:\s+--tp (\d+))?")


def model_of_config(text: str) -> Optional[tuple[str, int]]:
    """(model, tp) named by a KV-shaped config's header (``From `vua-nixl plan --model M
    --tokens N [--tp T]```), or None: those configs are one model's chunks, and the store rows
    should use that model's layout, not a generic one."""
    for line in text.splitlines():
        if not line.lstrip().startswith("#"):
            continue
        m = _PLAN_LINE.search(line)
        if m:
            return m.group(1), int(m.group(2) or 1)
    return None


class StoreBench:
    """Runs matrix points through a fresh KVStore per point, under ``opts.directory``."""

    def __init__(self, cfg: NixlbenchConfig, opts: RunOptions, backend: str, layout_mode: str = "model",
                 chunk_tokens: int = 256, verify_checksums: bool = True, model: Any = None, tp: int = 1,
                 recycle: bool = False):
        self.cfg = cfg
        self.recycle = recycle and cfg.op == "WRITE"
        self.model, self.tp = model, tp  # a ModelShape: its real layout wherever a block is its chunk
        self.opts = opts
        self.backend = backend
        self.layout_mode = layout_mode
        self.chunk_tokens = chunk_tokens
        self.verify_checksums = verify_checksums
        self.op = cfg.op
        self.threads = cfg.num_threads
        self.direct = cfg.direct
        self._shared_agent: Any = None
        from .raw import cuda_available

        # Engines load KV straight into GPU memory when GDS is in play; mirror the config's buffer.
        vram = str(cfg["initiator_seg_type"]).upper() == "VRAM"
        self.device = "cuda" if vram and backend in ("GDS", "GDS_MT") and cuda_available() else "cpu"
        need = 3 * self.threads * int(cfg["max_batch_size"]) * int(cfg["max_block_size"])
        if need > opts.max_memory:
            raise MemoryError(
                f"the store bench needs ~{format_bytes(need)} (source KV, output buffers, slack) "
                f"> --max-memory {format_bytes(opts.max_memory)}"
            )

    def shape_for(self, block: int) -> StoreShape:
        """The model's own layout when one is given and fits the block, else the generic one."""
        if self.model is not None:
            shape = model_shape_for(block, self.model, self.tp)
            if shape is not None:
                return shape
            log.warning("block %d B is not a whole number of %s tokens: generic layout for it", block, self.model.name)
        return store_shape_for(block, self.chunk_tokens, self.layout_mode)

    def _agent(self) -> Any:
        """One NIXL agent for every point, as one engine process would hold.

        It is probed with buffered I/O even for O_DIRECT runs: the store opens its block files
        with O_DIRECT from its own ``direct_io`` setting, and the agent's direct probe cannot
        pass on POSIX today (its read-back buffer is not page aligned).
        """
        if self._shared_agent is None:
            from vua_nixl.agent import NixlAgent

            posix_io = POSIX_API_TO_STORE.get(str(self.cfg["posix_api_type"]).upper(), "auto")
            self.opts.directory.mkdir(parents=True, exist_ok=True)
            self._shared_agent = NixlAgent(
                self.backend, posix_io=posix_io if self.backend == "POSIX" else "auto",
                probe_dir=self.opts.directory, direct_io=False,
            )
        return self._shared_agent

    def close(self) -> None:
        if self._shared_agent is not None:
            self._shared_agent.close()
            self._shared_agent = None

    def _open_store(self, shape: StoreShape, root: Path) -> Any:
        from vua_nixl import KVLayout, KVStore, Namespace

        layout = KVLayout(num_layers=shape.num_layers, kv_heads=shape.kv_heads, head_dim=shape.head_dim, mla=shape.mla)
        ns = Namespace(model=f"vua-bench/{self.cfg.name}", dtype=shape.dtype, layout=layout)
        return KVStore(
            str(root), ns, chunk_tokens=shape.chunk_tokens, backend=self.backend, direct_io=self.direct,
            verify_checksums=self.verify_checksums, access_log=False, agent=self._agent(),
        )

    def run_point(self, block: int, batch: int, point_index: int = 0) -> BenchRow:
        import torch

        from vua_nixl.agent import aligned_empty

        shape = self.shape_for(block)
        assert shape.chunk_bytes == block, (shape, block)
        per_thread_iters, warmup = self.cfg.iters_for_block(block)
        per_thread_iters = max(per_thread_iters, 1)
        root = self.opts.directory / f"vua_bench_store_{uuid.uuid4().hex[:8]}"
        tokens_per_req = batch * shape.chunk_tokens
        rng = np.random.default_rng(1000 + point_index)
        reqs = [rng.integers(0, 2**31 - 1, size=tokens_per_req, dtype=np.int64) for _ in range(self.threads)]
        store = self._open_store(shape, root)
        lat: list[float] = []
        try:
            tdim = 1 if shape.mla else 2
            kv_shape = store.layout.shape(tokens_per_req)
            torch_dtype = store.dtype
            g = torch.Generator().manual_seed(point_index)
            def buffer() -> Any:
                if self.device == "cuda":
                    return torch.empty(kv_shape, dtype=torch_dtype, device="cuda")
                return aligned_empty(kv_shape, torch_dtype)

            srcs = []
            for _ in range(self.threads):
                t = buffer()
                t.view(torch.uint8).view(-1).copy_(
                    torch.randint(0, 256, (t.numel() * t.element_size(),), dtype=torch.uint8, generator=g))
                srcs.append(t)
            items = list(zip(reqs, srcs))
            if self.op == "WRITE":
                # Every iteration puts new prefixes (a store never rewrites a chunk it has), so the
                # first token is varied per iteration; the files are removed after the point.
                rounds = warmup + per_thread_iters
                fresh = not self.recycle and self._room_for(rounds * self.threads * batch * store.file_bytes)

                def round_items(i: int) -> list[tuple[Any, Any]]:
                    if self.recycle:  # evicted into the pool after each round: the same keys again,
                        return items  # into fan-out directories that exist, as in a store at capacity
                    if not fresh:
                        for r in reqs:
                            store.delete(r)
                        return items
                    out = []
                    for r, src in items:
                        r2 = r.copy()
                        r2[0] = 2**31 + i
                        out.append((r2, src))
                    return out

                total_s = 0.0
                last: list[tuple[Any, Any]] = items
                for i in range(rounds):
                    last = round_items(i)
                    t0 = time.perf_counter()
                    covered = store.put_many(last)
                    dt = time.perf_counter() - t0
                    if covered != [tokens_per_req] * self.threads:
                        raise RuntimeError(f"put covered {covered}, expected {tokens_per_req} per request")
                    if i >= warmup:
                        lat.append(dt * 1e6)
                        total_s += dt
                    if self.recycle and i + 1 < rounds:
                        self._evict_into_pool(store, root)
                if store.stats()["chunks_written"] < rounds * self.threads * batch:
                    raise RuntimeError("store skipped chunks it should have written")
                if self.recycle and store.stats()["chunks_recycled"] < (rounds - 1) * self.threads * batch:
                    raise RuntimeError(f"only {store.stats()['chunks_recycled']} chunks went into recycled files")
                outs = [buffer() for _ in range(self.threads)]
                res = store.get_many([r for r, _ in last], outs=outs, device=self.device)
            else:
                store.put_many(items)
                outs = [buffer() for _ in range(self.threads)]
                for o in outs:  # nixlbench's initiator byte: a read that moves nothing cannot pass
                    o.view(torch.uint8).view(-1).fill_(0xBB)
                for _ in range(warmup):
                    store.get_many(reqs, outs=outs, device=self.device)
                for o in outs:
                    o.view(torch.uint8).view(-1).fill_(0xBB)
                t_start = time.perf_counter()
                res = None
                for _ in range(per_thread_iters):
                    t0 = time.perf_counter()
                    res = store.get_many(reqs, outs=outs, device=self.device)
                    lat.append((time.perf_counter() - t0) * 1e6)
                total_s = time.perf_counter() - t_start
            verified, detail = self._verify(res, srcs, tokens_per_req, tdim)
            stats = store.stats()
            actual_backend = stats.get("backend", self.backend)
            engine = stats.get("engine")
            if store.direct != self.direct:  # the row must say what really ran
                raise RuntimeError(f"store direct_io={store.direct} but the config asks {self.direct}")
        finally:
            store.close()
            if not self.opts.keep_files:
                shutil.rmtree(root, ignore_errors=True)
        total_bytes = block * batch * per_thread_iters * self.threads
        note = f"layout L={shape.num_layers} H={shape.kv_heads} D={shape.head_dim} {shape.dtype} " \
               f"chunk_tokens={shape.chunk_tokens}" + ("" if self.verify_checksums else " no-checksum") \
               + (" recycled-files" if self.recycle else "")
        return BenchRow(
            path="store", op=self.op, backend=f"{actual_backend}" + (f"/{engine}" if engine else ""),
            direct=self.direct, block_size=block, batch_size=batch, bw_gbps=total_bytes / 1e9 / total_s,
            avg_lat_us=total_s * 1e6 / (per_thread_iters * batch), tx=LatencyStats.of(lat),
            threads=self.threads, iterations=per_thread_iters, total_bytes=total_bytes, total_s=total_s,
            verified=verified, verify_detail=detail, note=note,
        )

    @staticmethod
    def _evict_into_pool(store: Any, root: Path) -> None:
        """Untimed, between rounds: evict every block of the point's root into its recycle pool,
        as the pruner of a store at capacity does (telling the store, as its capacity guard
        would), and age the pool past ``recycle_after_s`` (the store's clock for it runs ahead
        instead of the bench sleeping)."""
        from vua_nixl.lifecycle import Pruner

        from .recycling import age_pool

        pruner = Pruner(root, max_age_s=1.0, recycle_pool_bytes=1 << 60)
        pruner.on_evict.append(lambda fp, keys: store.notify_removed(keys, "evict"))  # as a worker's guard does
        pruner.run_once(now=time.time() + 1e6)
        age_pool(store)
        os.sync()  # a file evicted recycle_after_s ago was written back long since

    def _room_for(self, nbytes: int) -> bool:
        """Whether ``nbytes`` of fresh block files fit in half the free space under the directory."""
        free = shutil.disk_usage(self.opts.directory).free
        if nbytes <= free // 2:
            return True
        log.warning("WRITE point needs %s of new files but only %s is free: rewriting the same chunks "
                    "(deleted between iterations, outside the timed region) instead",
                    format_bytes(nbytes), format_bytes(free))
        return False

    @staticmethod
    def _verify(res: Optional[list[Any]], srcs: list[Any], tokens: int, tdim: int) -> tuple[bool, str]:
        """Every request must come back whole and bit-identical to what was put."""
        import torch

        if res is None:
            return False, "no result"
        bad = []
        for i, (r, src) in enumerate(zip(res, srcs)):
            if r.tokens != tokens or r.kv is None:
                bad.append(f"request {i}: {r.tokens}/{tokens} tokens")
                continue
            got = r.kv.contiguous().view(torch.uint8)
            if not torch.equal(got, src.contiguous().view(torch.uint8)):
                bad.append(f"request {i}: bytes differ")
        if bad:
            log.error("store verification failed: %s", "; ".join(bad))
            return False, "; ".join(bad)
        return True, f"{len(srcs)} requests bit-identical"
