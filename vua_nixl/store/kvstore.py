"""KVStore: a persistent, prefix-addressed KV block store on a shared file system.

The guarantees callers build on:
  * a hit is always the right KV: every loaded chunk's header (namespace, key, parent key,
    tokens, dtype, shape) and payload checksum are verified before it is counted;
  * prefixes are strict: a load stops at the first chunk that is missing or fails validation,
    so a hole never yields non-contiguous KV;
  * a chunk exists iff its final file exists: writes go to a unique temporary and are renamed
    into place only after every byte has landed; a failed put publishes nothing;
  * nothing lives only in this process: any process or host mounting the root sees every chunk.

This class is the facade; the work is done by :mod:`~vua_nixl.store.writer` (publish path),
:mod:`~vua_nixl.store.reader` (read-and-verify pipeline), :mod:`~vua_nixl.store.planning`
(descriptor rows) and :mod:`~vua_nixl.store.presence` (lookup cache).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from contextlib import ExitStack
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence, TypeVar

import torch

from vua_nixl.agent import GDS_BACKENDS, NixlAgent, StagingPool, aligned_empty
from vua_nixl.config import StoreConfig
from vua_nixl.dtypes import DTYPES
from vua_nixl.errors import InvalidInputError, StoreRootError, VuaNixlError
from vua_nixl.keys import Namespace, as_token_array
from vua_nixl.kvlayout import check_out, to_canonical, token_dim
from vua_nixl.paths import StorePaths
from vua_nixl.store.core import StoreCore
from vua_nixl.store.observers import ObserverList, StoredChunk, StoreObserver
from vua_nixl.store.planning import DIRECT_ALIGN, Arena, ChunkGeometry, Plan, group_by_memory, memory_kind
from vua_nixl.store.pool import OutputPool
from vua_nixl.store.presence import PresenceCache
from vua_nixl.store.reader import BlockReader
from vua_nixl.store.verified import VerifiedFiles
from vua_nixl.store.writer import BlockWriter

log = logging.getLogger(__name__)


class GetResult(NamedTuple):
    """Outcome of a load: how many leading tokens were matched, and their KV (None on a miss)."""

    tokens: int
    kv: Optional[torch.Tensor]


class KVStore:
    """Prefix-addressed KV block store for one namespace under one root.

    Thread-safe. Share one :class:`NixlAgent` between stores of different namespaces with
    ``agent=`` (the VUA facade does); otherwise each store creates its own.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None,
        namespace: Namespace,
        *,
        chunk_tokens: Optional[int] = None,
        backend: Optional[str] = None,
        config: Optional[StoreConfig] = None,
        agent: Optional[NixlAgent] = None,
        observers: Iterable[StoreObserver] = (),
        **overrides: Any,
    ):
        explicit = {k: v for k, v in {"root": root, "chunk_tokens": chunk_tokens, "backend": backend}.items() if v is not None}
        explicit.update(overrides)
        base = config.model_dump(exclude_unset=True) if config is not None else {}
        self.config = cfg = StoreConfig(**{**base, **explicit})
        if not isinstance(namespace, Namespace):
            raise InvalidInputError(f"namespace must be a vua_nixl.Namespace, got {type(namespace).__name__}")
        self.namespace = namespace
        self.chunk_tokens = cfg.chunk_tokens
        self.paths = StorePaths(cfg.root)
        if self.paths.root.exists() and not self.paths.root.is_dir():
            raise StoreRootError(f"store root {self.paths.root} is not a directory")
        self.paths.ensure()
        self.layout = namespace.layout
        self.dtype = DTYPES[namespace.dtype]
        self.chain = namespace.chain(self.chunk_tokens)
        self.fingerprint = self.chain.fingerprint
        self.fp_hex = self.fingerprint.hex()
        self.paths.write_namespace(self.fp_hex, {**namespace.describe(), "chunk_tokens": self.chunk_tokens})
        geo = ChunkGeometry(self.layout, self.dtype, namespace.dtype, self.chunk_tokens)
        self.geometry = geo
        self.chunk_bytes = geo.chunk_bytes
        self.file_bytes = geo.file_bytes
        # What a block file occupies on disk (capacity counts allocated blocks): its size rounded
        # up to the file system's allocation unit. Reservations use this, so a limit is not
        # overrun by the rounding of every file.
        try:
            unit = max(512, os.statvfs(self.paths.root).f_frsize or 4096)
        except OSError:
            unit = 4096
        self.file_alloc_bytes = -(-self.file_bytes // unit) * unit

        self._own_agent = agent is None
        self.agent = agent or NixlAgent.from_config(cfg, self.paths.tmp)
        if self.agent.backend in GDS_BACKENDS and not cfg.verify_checksums:
            if self._own_agent:
                self.agent.close()
            raise InvalidInputError(
                "verify_checksums=False is refused on GDS/GDS_MT: a failed or short cuFile I/O can look "
                "complete, and only the checksum stops its bytes from being served as KV"
            )
        aligned_io = (cfg.direct_io and self.agent.backend == "POSIX") or self.agent.backend in GDS_BACKENDS
        if aligned_io and geo.seg_bytes % DIRECT_ALIGN:
            if self._own_agent:
                self.agent.close()
            raise InvalidInputError(
                f"{'direct_io' if self.agent.backend == 'POSIX' else self.agent.backend} needs chunk segments that are "
                f"multiples of {DIRECT_ALIGN} bytes; this layout and chunk_tokens={self.chunk_tokens} give "
                f"{geo.seg_bytes} (choose chunk_tokens so that chunk_tokens x kv_heads x head_dim x itemsize is a multiple of 4096)"
            )
        self.observers = ObserverList(observers)
        self._core = StoreCore(
            config=cfg, namespace=namespace, fingerprint=self.fingerprint, chain=self.chain, paths=self.paths, geo=geo,
            agent=self.agent, presence=PresenceCache(cfg.presence_ttl_s, cfg.presence_entries),
            staging=StagingPool(self.agent, cfg.staging_mib << 20),
            direct=cfg.direct_io or self.agent.backend in ("GDS", "GDS_MT"),
            vram_ok=self.agent.supports("VRAM_SEG") or self.agent.supports("VRAM"),
            notify=lambda hook, *args: self.observers.notify(hook, self, *args),
            arenas={"READ": Arena(self.agent), "WRITE": Arena(self.agent)},
            verified=VerifiedFiles(cfg.verify_cache_s),
        )
        self._pool = OutputPool(self.agent, cfg.output_pool_mib << 20)
        self._writer = BlockWriter(self._core)
        self._reader = BlockReader(self._core)
        self._closed = False
        log.debug("KVStore %s ns=%s chunk=%d tokens, %d bytes/chunk", self.paths.root, self.fp_hex[:12], self.chunk_tokens, self.chunk_bytes)

    # ---- context manager -----------------------------------------------------------------

    def __enter__(self) -> "KVStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for arena in self._core.arenas.values():
            arena.release()
        self._core.staging.release()
        self._pool.release()
        self._reader.close()
        self._writer.close()
        self._core.close_lanes()
        if self._own_agent:
            self.agent.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def backend(self) -> str:
        """The NIXL backend this store's agent uses (GDS, GDS_MT or POSIX)."""
        return str(self.agent.backend)

    @property
    def direct(self) -> bool:
        """Whether block files are opened with O_DIRECT (configured, or implied by GDS)."""
        return self._core.direct

    # ---- keys and presence ---------------------------------------------------------------

    def keys_for(self, tokens: Any) -> list[bytes]:
        """Chained keys of every full chunk of ``tokens`` in this namespace."""
        return self.chain.keys(as_token_array(tokens), self.chunk_tokens)

    def block_path(self, key: bytes) -> str:
        return self._core.block_path(key)

    def _present(self, key: bytes, now: float, cached: bool = True) -> bool:
        """Is the chunk published? ``cached`` trusts a positive answer younger than presence_ttl_s."""
        presence = self._core.presence
        if cached and presence.fresh(key, now):
            return True
        try:
            st = os.lstat(self.block_path(key))  # a symlink under a block name is not a block
        except OSError:
            presence.forget([key])
            return False
        if st.st_size != self.file_bytes or not stat.S_ISREG(st.st_mode):
            return False
        presence.remember([key], now)
        return True

    def forget(self, keys: Iterable[bytes]) -> None:
        """Drop keys from this process's presence cache (another component removed them)."""
        self._core.presence.forget(keys)

    def notify_removed(self, keys: Sequence[bytes], reason: str, *, skip: Any = None) -> None:
        """Someone removed ``keys`` (eviction, expiry): forget them and tell the observers."""
        self._core.presence.forget(keys)
        if keys:
            self.observers.notify("on_removed", self, list(keys), reason, skip=skip)

    # ---- lookup --------------------------------------------------------------------------

    def lookup(self, tokens: Any) -> int:
        """Length in tokens of the longest stored contiguous prefix. Reads no KV data.

        A positive answer is a promise that the files exist with the right size, not that they
        will still validate (or exist) when loaded: ``get`` may return fewer tokens.
        """
        self._check_open()
        now = time.monotonic()
        n = 0
        for key in self.keys_for(tokens):
            if not self._present(key, now):
                break
            n += 1
        self._core.bump(lookups=1)
        return n * self.chunk_tokens

    def lookup_many(self, tokens_list: Sequence[Any]) -> list[int]:
        return [self.lookup(t) for t in tokens_list]

    # ---- put -----------------------------------------------------------------------------

    def put(self, tokens: Any, kv: Any) -> int:
        """Store every full chunk of ``tokens`` not already present; return tokens now covered."""
        return self.put_many([(tokens, kv)])[0]

    def put_many(self, items: Sequence[tuple[Any, Any]]) -> list[int]:
        """Store several sequences with one NIXL write. All-or-nothing: on error nothing is published.

        Items in different kinds of memory (host and GPU) go as one write per kind, each
        all-or-nothing on its own (a NIXL request has one memory type)."""
        self._check_open()
        groups = group_by_memory([memory_kind(kv) for _, kv in items])
        if len(groups) > 1:
            return _per_group(groups, len(items), lambda idx: self.put_many([items[i] for i in idx]))
        now = time.monotonic()
        plans: list[Plan] = []
        todo: dict[bytes, tuple[int, int]] = {}  # key -> (plan index, chunk index): dedupes shared prefixes
        results = []
        for tokens, kv in items:
            toks = as_token_array(tokens)
            canon = to_canonical(kv, self.layout, self.namespace.dtype, len(toks))
            keys = self.chain.keys(toks, self.chunk_tokens)
            results.append(len(keys) * self.chunk_tokens)
            plans.append(Plan(keys, toks, canon))
            for i, key in enumerate(keys):
                if key not in todo and not self._present(key, now, cached=False):
                    todo[key] = (len(plans) - 1, i)
        skipped = sum(len(p.keys) for p in plans) - len(todo)
        if not todo:
            self._core.bump(puts=len(items), chunks_skipped=skipped)
            return results
        nbytes = len(todo) * self.file_alloc_bytes
        self.observers.before_write(self, nbytes)
        try:
            stored = self._writer.write(plans, list(todo.items()))
        except Exception as exc:
            self.observers.notify("on_put_failed", self, nbytes, exc)
            raise
        self._core.presence.remember((c.key for c in stored), time.monotonic())
        self._core.bump(puts=len(items), chunks_written=len(stored), chunks_skipped=skipped,
                        bytes_written=len(stored) * self.file_bytes)
        self.observers.notify("on_stored", self, stored)
        return results

    # ---- get -----------------------------------------------------------------------------

    def get(self, tokens: Any, out: Optional[torch.Tensor] = None, device: Any = "cpu") -> GetResult:
        """Load the longest stored, valid, contiguous prefix of ``tokens``.

        With ``out`` (canonical layout, dtype of the namespace) the KV lands there and the
        result's ``kv`` is a view of it; at most ``out``'s token capacity is loaded. Bytes of
        ``out`` past the returned token count are unspecified afterwards.
        """
        return self.get_many([tokens], outs=None if out is None else [out], device=device)[0]

    def get_many(self, tokens_list: Sequence[Any], outs: Optional[Sequence[Optional[torch.Tensor]]] = None,
                 device: Any = "cpu") -> list[GetResult]:
        """Load several prefixes with one NIXL read for all of them."""
        self._check_open()
        if outs is not None and len(outs) != len(tokens_list):
            raise InvalidInputError(f"{len(outs)} output buffers given for {len(tokens_list)} token sequences")
        device = torch.device(device)
        kinds = [memory_kind(outs[r]) if outs is not None and outs[r] is not None else device.type for r in range(len(tokens_list))]
        groups = group_by_memory(kinds)
        if len(groups) > 1:  # one NIXL read per kind of destination memory
            return _per_group(groups, len(tokens_list), lambda idx: self.get_many(
                [tokens_list[i] for i in idx], [outs[i] for i in idx] if outs is not None else None, device))
        t0 = time.perf_counter()
        plans: list[Plan] = []
        with ExitStack() as stack:
            try:
                for r, tokens in enumerate(tokens_list):
                    plans.append(self._plan_get(tokens, outs[r] if outs is not None else None, device))
                self._stage(plans, stack)
                self._reader.read(plans)
            finally:
                for plan in plans:
                    for fd in plan.fds:
                        os.close(fd)
            results = [self._finish_get(plan) for plan in plans]
        seconds = time.perf_counter() - t0
        self._core.bump(load_seconds=seconds)
        keys = [k for p in plans for k in p.keys[: p.n]]
        if keys:
            self.observers.notify("on_hit", self, keys, len(keys) * self.chunk_bytes, seconds)
        for p in plans:
            if p.n == 0:
                self.observers.notify("on_miss", self, len(p.tokens), 0)
        return results

    def _plan_get(self, tokens: Any, out: Optional[torch.Tensor], device: torch.device) -> Plan:
        """Open the prefix's files and decide where its bytes land (``plan.mem``)."""
        toks = as_token_array(tokens)
        limit = None
        if out is not None:
            limit = check_out(out, self.layout, self.namespace.dtype) // self.chunk_tokens
        plan = Plan(self.chain.keys(toks, self.chunk_tokens, limit), toks)
        self._reader.open_prefix(plan)
        if plan.n and out is not None:
            plan.out_view = plan.mem = out
            plan.user_out = True
        elif plan.n:
            shape = self.layout.shape(plan.n * self.chunk_tokens)
            if device.type == "cuda":
                plan.out_view = plan.mem = torch.empty(shape, dtype=self.dtype, device=device)
            else:
                # Pooled memory is registered, page aligned and already faulted in; the caller
                # owns the result (the slab returns to the pool only once it is garbage).
                pooled = self._pool.take(shape, self.dtype) if device.type == "cpu" else None
                if pooled is not None:
                    plan.out_view = plan.mem = pooled
                elif self._core.direct:
                    plan.out_view = plan.mem = aligned_empty(shape, self.dtype)
                else:
                    plan.out_view = plan.mem = torch.empty(shape, dtype=self.dtype)
        return plan

    def _stage(self, plans: list[Plan], stack: ExitStack) -> None:
        """Point plans whose destination the agent cannot reach at staging-pool bounce buffers."""
        bounce = [p for p in plans if p.n and p.mem is not None and self._core.needs_bounce(p.mem)]
        if bounce:
            shapes = [(self.layout.shape(p.n * self.chunk_tokens), self.dtype) for p in bounce]
            for plan, buf in zip(bounce, stack.enter_context(self._core.staging.carve(shapes))):
                plan.mem = buf

    def _finish_get(self, plan: Plan) -> GetResult:
        n_tok = plan.n * self.chunk_tokens
        self._core.bump(gets=1, tokens_requested=len(plan.tokens), tokens_hit=n_tok, chunks_read=plan.n,
                        bytes_read=plan.n * self.chunk_bytes, hits=int(plan.n > 0), misses=int(plan.n == 0))
        if plan.n == 0:
            return GetResult(0, None)
        assert plan.out_view is not None and plan.mem is not None
        tdim = token_dim(self.layout)
        view = plan.out_view.narrow(tdim, 0, n_tok)
        if plan.mem is not plan.out_view:  # bounced through staging
            view.copy_(plan.mem.narrow(tdim, 0, n_tok))
        return GetResult(n_tok, view)

    # ---- delete --------------------------------------------------------------------------

    def delete(self, tokens: Any) -> int:
        """Remove every stored chunk of ``tokens``; return how many files were removed.

        Readers that already opened a chunk finish reading it (POSIX unlink semantics); later
        lookups miss from the first removed chunk on.
        """
        self._check_open()
        keys = self.keys_for(tokens)
        removed = []
        for key in keys:
            try:
                os.unlink(self.block_path(key))
                removed.append(key)
            except FileNotFoundError:
                pass
        self._core.presence.forget(keys)
        self._core.bump(deletes=len(removed))
        if removed:
            self.observers.notify("on_removed", self, removed, "delete")
        return len(removed)

    # ---- stats ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        s = self._core.snapshot()
        s.update(
            root=str(self.paths.root), namespace=self.fp_hex, chunk_tokens=self.chunk_tokens,
            chunk_bytes=self.chunk_bytes, backend=self.agent.backend, engine=self.agent.report.engine,
        )
        return s

    def expected_block(self, index: int, tokens: Any) -> Any:
        """The header a valid block for chunk ``index`` of ``tokens`` carries (tests, tools)."""
        toks = as_token_array(tokens)
        keys = self.chain.keys(toks, self.chunk_tokens)
        c = self.chunk_tokens
        return self.geometry.expected(self.chain, keys[index], self._core.parent_of(keys, index),
                                      toks[index * c : (index + 1) * c])

    def _check_open(self) -> None:
        if self._closed:
            raise VuaNixlError("KVStore is closed")



T = TypeVar("T")


def _per_group(groups: list[list[int]], n: int, run: Callable[[list[int]], list[T]]) -> list[T]:
    """Run ``run`` on each group of item indices and put the results back in item order."""
    out: list[Optional[T]] = [None] * n
    for idx in groups:
        for i, r in zip(idx, run(idx)):
            out[i] = r
    return out  # type: ignore[return-value]  # every index is in exactly one group

__all__ = ["KVStore", "GetResult", "StoredChunk", "StoreObserver"]
