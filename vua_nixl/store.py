"""KVStore: a persistent, prefix-addressed KV block store on a shared file system.

The guarantees callers build on:
  * a hit is always the right KV: every loaded chunk's header (namespace, key, parent key,
    tokens, dtype, shape) and payload checksum are verified before it is counted;
  * prefixes are strict: a load stops at the first chunk that is missing or fails validation,
    so a hole never yields non-contiguous KV;
  * a chunk exists iff its final file exists: writes go to a unique temporary and are renamed
    into place only after every byte has landed; a failed put publishes nothing;
  * nothing lives only in this process: any process or host mounting the root sees every chunk.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Protocol, Sequence

import numpy as np
import torch

from vua_nixl.agent import NixlAgent, StagingPool, aligned_empty
from vua_nixl.config import StoreConfig
from vua_nixl.dtypes import DTYPES
from vua_nixl.errors import CorruptBlockError, InvalidInputError, StoreRootError, TransferError, VuaNixlError
from vua_nixl.format import ExpectedBlock, checksum, decode_header, encode_header, payload_offset
from vua_nixl.keys import Namespace, as_token_array, chunk_keys
from vua_nixl.kvlayout import check_out, to_canonical, token_dim
from vua_nixl.paths import StorePaths

log = logging.getLogger(__name__)

_O_DIRECT = getattr(os, "O_DIRECT", 0)
#: files opened per NIXL request; bounded so a 1M-token batch cannot exhaust descriptors.
_MAX_FILES_PER_TRANSFER = 2048
#: O_DIRECT alignment for addresses, offsets and lengths (the largest common logical block size).
_DIRECT_ALIGN = 4096
#: bytes per pipelined read sub-batch (verification of one overlaps the read of the next).
_PIPELINE_BYTES = 64 << 20


class GetResult(NamedTuple):
    """Outcome of a load: how many leading tokens were matched, and their KV (None on a miss)."""

    tokens: int
    kv: Optional[torch.Tensor]


@dataclass(frozen=True)
class StoredChunk:
    """A chunk that this process just published (handed to observers, e.g. Dynamo KV events)."""

    index: int
    key: bytes
    parent: bytes
    tokens: np.ndarray
    nbytes: int
    path: str


class StoreObserver(Protocol):
    """Hooks for lifecycle, metrics and router events. Every method is optional."""

    def before_write(self, store: "KVStore", nbytes: int) -> None: ...
    def on_stored(self, store: "KVStore", chunks: Sequence[StoredChunk]) -> None: ...
    def on_hit(self, store: "KVStore", keys: Sequence[bytes], nbytes: int, seconds: float) -> None: ...
    def on_miss(self, store: "KVStore", requested_tokens: int, matched_tokens: int) -> None: ...
    def on_removed(self, store: "KVStore", keys: Sequence[bytes], reason: str) -> None: ...
    def on_corrupt(self, store: "KVStore", path: str, reason: str) -> None: ...
    def on_put_failed(self, store: "KVStore", nbytes: int, error: Exception) -> None: ...


@dataclass
class StoreStats:
    """In-process counters; `vua-nixl stats` adds what is on disk."""

    puts: int = 0
    chunks_written: int = 0
    chunks_skipped: int = 0
    bytes_written: int = 0
    gets: int = 0
    hits: int = 0
    misses: int = 0
    tokens_requested: int = 0
    tokens_hit: int = 0
    chunks_read: int = 0
    bytes_read: int = 0
    lookups: int = 0
    deletes: int = 0
    corrupt: int = 0
    io_errors: int = 0
    write_failures: int = 0
    load_seconds: float = 0.0


class _Plan:
    """One request's share of a batched transfer."""

    __slots__ = ("keys", "tokens", "fds", "paths", "mem", "n", "out_view", "user_out")

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.paths: list[str] = []
        self.n = 0
        self.user_out = False  # mem is the caller's buffer: worth keeping registered


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
        self.config = StoreConfig(**{**base, **explicit})
        if not isinstance(namespace, Namespace):
            raise InvalidInputError(f"namespace must be a vua_nixl.Namespace, got {type(namespace).__name__}")
        self.namespace = namespace
        self.chunk_tokens = self.config.chunk_tokens
        self.paths = StorePaths(self.config.root)
        if self.paths.root.exists() and not self.paths.root.is_dir():
            raise StoreRootError(f"store root {self.paths.root} is not a directory")
        self.paths.ensure()

        layout = namespace.layout
        self.layout = layout
        self.dtype = DTYPES[namespace.dtype]
        self.fingerprint = namespace.fingerprint(self.chunk_tokens)
        self.fp_hex = self.fingerprint.hex()
        self.paths.write_namespace(self.fp_hex, {**namespace.describe(), "chunk_tokens": self.chunk_tokens})
        itemsize = self.dtype.itemsize
        self._tok_bytes = (layout.head_dim if layout.mla else layout.kv_heads * layout.head_dim) * itemsize
        self._nseg = layout.num_layers if layout.mla else 2 * layout.num_layers
        self._seg_bytes = self.chunk_tokens * self._tok_bytes
        self.chunk_bytes = self._nseg * self._seg_bytes
        self._payload_off = payload_offset(self.chunk_tokens)
        self.file_bytes = self._payload_off + self.chunk_bytes
        self._layout_desc = {"layers": layout.num_layers, "kv_heads": layout.kv_heads, "head_dim": layout.head_dim, "mla": layout.mla}
        self._chunk_shape = layout.shape(self.chunk_tokens)

        self._own_agent = agent is None
        self.agent = agent or NixlAgent(
            self.config.backend,
            posix_io=self.config.posix_io,
            probe_dir=self.paths.tmp,
            name=self.config.agent_name,
            direct_io=self.config.direct_io,
            timeout_s=self.config.transfer_timeout_s,
        )
        self._direct = self.config.direct_io or self.agent.backend in ("GDS", "GDS_MT")
        self._vram_ok = self.agent.supports("VRAM_SEG") or self.agent.supports("VRAM")
        if self.config.direct_io and self.agent.backend == "POSIX" and self._seg_bytes % _DIRECT_ALIGN:
            if self._own_agent:
                self.agent.close()
            raise InvalidInputError(
                f"direct_io needs chunk segments that are multiples of {_DIRECT_ALIGN} bytes; "
                f"this layout and chunk_tokens={self.chunk_tokens} give {self._seg_bytes}"
            )
        self.observers: list[StoreObserver] = list(observers)
        self._stats = StoreStats()
        self._stats_lock = threading.Lock()
        self._presence: OrderedDict[bytes, float] = OrderedDict()
        self._presence_lock = threading.Lock()
        self._arenas = {"READ": _Arena(self.agent), "WRITE": _Arena(self.agent)}
        self._staging = StagingPool(self.agent, self.config.staging_mib << 20)
        self._verifier: Optional[ThreadPoolExecutor] = None
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
        for arena in self._arenas.values():
            arena.release()
        self._staging.release()
        if self._verifier is not None:
            self._verifier.shutdown(wait=True)
        if self._own_agent:
            self.agent.close()

    # ---- keys and presence ---------------------------------------------------------------

    def keys_for(self, tokens: Any) -> list[bytes]:
        """Chained keys of every full chunk of ``tokens`` in this namespace."""
        return chunk_keys(self.fingerprint, as_token_array(tokens), self.chunk_tokens)

    def block_path(self, key: bytes) -> str:
        return self.paths.block(self.fp_hex, key.hex())

    def _present(self, key: bytes, now: float, cached: bool = True) -> bool:
        """Is the chunk published? ``cached`` trusts a positive answer younger than presence_ttl_s."""
        if cached:
            with self._presence_lock:
                seen = self._presence.get(key)
                if seen is not None and now - seen < self.config.presence_ttl_s:
                    return True
        try:
            st = os.stat(self.block_path(key))
        except OSError:
            self._forget([key])
            return False
        if st.st_size != self.file_bytes:
            return False
        self._remember([key], now)
        return True

    def _remember(self, keys: Iterable[bytes], now: float) -> None:
        limit = self.config.presence_entries
        if limit == 0 or self.config.presence_ttl_s == 0:
            return
        with self._presence_lock:
            for k in keys:
                self._presence[k] = now
                self._presence.move_to_end(k)
            while len(self._presence) > limit:
                self._presence.popitem(last=False)

    def forget(self, keys: Iterable[bytes]) -> None:
        """Drop keys from this process's presence cache (e.g. after another component evicted them)."""
        self._forget(keys)

    def _forget(self, keys: Iterable[bytes]) -> None:
        with self._presence_lock:
            for k in keys:
                self._presence.pop(k, None)

    # ---- lookup --------------------------------------------------------------------------

    def lookup(self, tokens: Any) -> int:
        """Length in tokens of the longest stored contiguous prefix. Reads no KV data.

        A positive answer is a promise that the files exist with the right size, not that they
        will still validate (or exist) when loaded: ``get`` may return fewer tokens.
        """
        keys = self.keys_for(tokens)
        now = time.monotonic()
        n = 0
        for key in keys:
            if not self._present(key, now):
                break
            n += 1
        self._bump(lookups=1)
        return n * self.chunk_tokens

    def lookup_many(self, tokens_list: Sequence[Any]) -> list[int]:
        return [self.lookup(t) for t in tokens_list]

    # ---- put -----------------------------------------------------------------------------

    def put(self, tokens: Any, kv: Any) -> int:
        """Store every full chunk of ``tokens`` not already present; return tokens now covered."""
        return self.put_many([(tokens, kv)])[0]

    def put_many(self, items: Sequence[tuple[Any, Any]]) -> list[int]:
        """Store several sequences with one NIXL write. All-or-nothing: on error nothing is published."""
        self._check_open()
        now = time.monotonic()
        plans = []
        todo: dict[bytes, tuple[int, int]] = {}  # key -> (plan index, chunk index): dedupes shared prefixes
        results = []
        for tokens, kv in items:
            toks = as_token_array(tokens)
            canon = to_canonical(kv, self.layout, self.namespace.dtype, len(toks))
            keys = chunk_keys(self.fingerprint, toks, self.chunk_tokens)
            results.append(len(keys) * self.chunk_tokens)
            plan = _Plan()
            plan.keys, plan.tokens, plan.mem = keys, toks, canon
            plans.append(plan)
            for i, key in enumerate(keys):
                if key not in todo and not self._present(key, now, cached=False):
                    todo[key] = (len(plans) - 1, i)
        skipped = sum(len(p.keys) for p in plans) - len(todo)
        if not todo:
            self._bump(puts=len(items), chunks_skipped=skipped)
            return results
        for obs in self.observers:
            if hasattr(obs, "before_write"):
                obs.before_write(self, len(todo) * self.file_bytes)
        jobs = list(todo.items())
        stored: list[StoredChunk] = []
        try:
            with self._write_sources(plans, sorted({pi for _, (pi, _) in jobs})) as sources:
                for start in range(0, len(jobs), _MAX_FILES_PER_TRANSFER):
                    stored.extend(self._write_batch(plans, jobs[start : start + _MAX_FILES_PER_TRANSFER], sources))
        except Exception as exc:
            for obs in self.observers:
                if hasattr(obs, "on_put_failed"):
                    obs.on_put_failed(self, len(todo) * self.file_bytes, exc)
            raise
        self._remember((c.key for c in stored), time.monotonic())
        self._bump(puts=len(items), chunks_written=len(stored), chunks_skipped=skipped, bytes_written=len(stored) * self.file_bytes)
        for obs in self.observers:
            if hasattr(obs, "on_stored"):
                obs.on_stored(self, stored)
        return results

    @contextmanager
    def _write_sources(self, plans: list[_Plan], used: list[int]) -> Iterator[dict[int, torch.Tensor]]:
        """Memory the agent writes from, per plan: the KV itself, or a staging-pool copy of its
        whole chunks when the agent cannot use it directly (made once per put, not per batch)."""
        bounce = [pi for pi in used if self._needs_bounce(plans[pi].mem)]
        tdim = token_dim(self.layout)
        full = {pi: len(plans[pi].keys) * self.chunk_tokens for pi in bounce}
        with self._staging.carve([(self.layout.shape(full[pi]), self.dtype) for pi in bounce]) as bufs:
            sources = {pi: plans[pi].mem for pi in used}
            for pi, buf in zip(bounce, bufs):
                buf.copy_(plans[pi].mem.narrow(tdim, 0, full[pi]))
                sources[pi] = buf
            yield sources

    def _write_batch(self, plans: list[_Plan], jobs: list[tuple[bytes, tuple[int, int]]],
                     host_mem: dict[int, torch.Tensor]) -> list[StoredChunk]:
        arena = self._arenas["WRITE"]
        temps: list[str] = []
        fds: list[int] = []
        regs: list[Optional[tuple[int, int, str]]] = []
        chunks: list[StoredChunk] = []
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | (_O_DIRECT if self._direct else 0)
        try:
            with arena.lock:
                arena.ensure(len(jobs) * self._payload_off)
                hdr_m, hdr_f, pay_m, pay_f = [], [], [], []
                for j, (key, (pi, ci)) in enumerate(jobs):
                    plan = plans[pi]
                    src = host_mem[pi]
                    addrs = self._segment_addrs(src, ci)
                    csum = self._chunk_checksum(src, ci, addrs)
                    parent = plan.keys[ci - 1] if ci > 0 else self.fingerprint
                    toks = plan.tokens[ci * self.chunk_tokens : (ci + 1) * self.chunk_tokens]
                    hdr = encode_header(self._expected(key, parent, toks).make_header(csum))
                    hdr_addr = arena.addr + j * self._payload_off
                    ctypes.memmove(hdr_addr, hdr, len(hdr))
                    tmp = self.paths.tmp_file(key.hex())
                    fd = os.open(tmp, flags, self.config.file_mode)
                    temps.append(tmp)
                    fds.append(fd)
                    _preallocate(fd, self.file_bytes, tmp)
                    hdr_m.append((hdr_addr, self._payload_off, 0))
                    hdr_f.append((0, self._payload_off, fd))
                    pay_m.extend((a, self._seg_bytes, src.device.index or 0) for a in addrs)
                    pay_f.extend((self._payload_off + s * self._seg_bytes, self._seg_bytes, fd) for s in range(self._nseg))
                    path = self.block_path(key)
                    chunks.append(StoredChunk(ci, key, parent, toks, self.file_bytes, path))
                regs = self.agent.register_batch([(src, False) for src in host_mem.values()])
                rows = [np.array(r, dtype=np.uint64) for r in (hdr_m, hdr_f, pay_m, pay_f)]
                mem_type = self.agent.mem_type_of(next(iter(host_mem.values())))
                with self.agent.files(fds):
                    self._transfer_rows("WRITE", *rows, mem_type)
            for fd in fds:
                if self.config.fsync:
                    os.fsync(fd)
            for fd in fds:
                os.close(fd)
            fds = []
            dirs = set()
            for tmp, chunk in zip(temps, chunks):
                d = os.path.dirname(chunk.path)
                if d not in dirs:
                    os.makedirs(d, exist_ok=True)
                    dirs.add(d)
                os.replace(tmp, chunk.path)
            temps = []
            if self.config.fsync:
                for d in dirs:
                    _fsync_dir(d)
            return chunks
        except VuaNixlError:
            self._bump(write_failures=1)
            raise
        except OSError as exc:
            self._bump(write_failures=1)
            raise StoreRootError(f"put failed, nothing published: {_describe_oserror(exc, self.paths.root)}") from None
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            for tmp in temps:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            for key in regs:
                self.agent.release(key)

    def _needs_bounce(self, t: torch.Tensor) -> bool:
        """Whether the agent cannot use ``t``'s memory directly (see StagingPool)."""
        if t.device.type == "cuda" and not self._vram_ok:
            return True
        if not self._direct or t.device.type != "cpu":
            return False
        # O_DIRECT: every segment's address must be aligned, so the base and the strides between
        # segments (layer, K/V, chunk start) must all be multiples of the alignment.
        isz = t.element_size()
        st = t.stride()
        steps = (st[0], self.chunk_tokens * st[1]) if self.layout.mla else (st[0], st[1], self.chunk_tokens * st[2])
        return t.data_ptr() % _DIRECT_ALIGN != 0 or any((x * isz) % _DIRECT_ALIGN for x in steps)

    # ---- get -----------------------------------------------------------------------------

    def get(self, tokens: Any, out: Optional[torch.Tensor] = None, device: Any = "cpu") -> GetResult:
        """Load the longest stored, valid, contiguous prefix of ``tokens``.

        With ``out`` (canonical layout, dtype of the namespace) the KV lands there and the
        result's ``kv`` is a view of it; at most ``out``'s token capacity is loaded. Bytes of
        ``out`` past the returned token count are unspecified afterwards.
        """
        return self.get_many([tokens], outs=None if out is None else [out], device=device)[0]

    def get_many(self, tokens_list: Sequence[Any], outs: Optional[Sequence[Optional[torch.Tensor]]] = None, device: Any = "cpu") -> list[GetResult]:
        """Load several prefixes with one NIXL read for all of them."""
        self._check_open()
        if outs is not None and len(outs) != len(tokens_list):
            raise InvalidInputError(f"{len(outs)} output buffers given for {len(tokens_list)} token sequences")
        t0 = time.perf_counter()
        device = torch.device(device)
        plans: list[_Plan] = []
        with ExitStack() as stack:
            try:
                for r, tokens in enumerate(tokens_list):
                    out = outs[r] if outs is not None else None
                    plans.append(self._plan_get(tokens, out, device))
                self._stage(plans, stack)
                self._read_plans(plans)
            finally:
                for plan in plans:
                    for fd in plan.fds:
                        os.close(fd)
            results = [self._finish_get(plan, device) for plan in plans]
        seconds = time.perf_counter() - t0
        self._bump(load_seconds=seconds)
        keys = [k for p in plans for k in p.keys[: p.n]]
        for obs in self.observers:
            if keys and hasattr(obs, "on_hit"):
                obs.on_hit(self, keys, len(keys) * self.chunk_bytes, seconds)
            for p in plans:
                if p.n == 0 and hasattr(obs, "on_miss"):
                    obs.on_miss(self, len(p.tokens), 0)
        return results

    def _plan_get(self, tokens: Any, out: Optional[torch.Tensor], device: torch.device) -> _Plan:
        """Open the prefix's files and decide where its bytes land (``plan.mem``)."""
        toks = as_token_array(tokens)
        limit = None
        if out is not None:
            limit = check_out(out, self.layout, self.namespace.dtype) // self.chunk_tokens
        plan = _Plan()
        plan.tokens = toks
        plan.keys = chunk_keys(self.fingerprint, toks, self.chunk_tokens, limit)
        self._open_prefix(plan)
        plan.mem = plan.out_view = None
        if plan.n and out is not None:
            plan.out_view = plan.mem = out
            plan.user_out = True
        elif plan.n:
            shape = self.layout.shape(plan.n * self.chunk_tokens)
            if device.type == "cuda":
                plan.out_view = plan.mem = torch.empty(shape, dtype=self.dtype, device=device)
            else:
                plan.out_view = plan.mem = aligned_empty(shape, self.dtype) if self._direct else torch.empty(shape, dtype=self.dtype)
        return plan

    def _stage(self, plans: list[_Plan], stack: ExitStack) -> None:
        """Point plans whose destination the agent cannot reach at staging-pool bounce buffers."""
        bounce = [p for p in plans if p.n and self._needs_bounce(p.mem)]
        if bounce:
            shapes = [(self.layout.shape(p.n * self.chunk_tokens), self.dtype) for p in bounce]
            for plan, buf in zip(bounce, stack.enter_context(self._staging.carve(shapes))):
                plan.mem = buf

    def _finish_get(self, plan: _Plan, device: torch.device) -> GetResult:
        n_tok = plan.n * self.chunk_tokens
        self._bump(gets=1, tokens_requested=len(plan.tokens), tokens_hit=n_tok, chunks_read=plan.n,
                   bytes_read=plan.n * self.chunk_bytes, hits=int(plan.n > 0), misses=int(plan.n == 0))
        if plan.n == 0:
            return GetResult(0, None)
        tdim = token_dim(self.layout)
        view = plan.out_view.narrow(tdim, 0, n_tok)
        if plan.mem is not plan.out_view:  # bounced through staging
            view.copy_(plan.mem.narrow(tdim, 0, n_tok))
        return GetResult(n_tok, view)

    def _open_prefix(self, plan: _Plan) -> None:
        """Open the contiguous run of chunk files from the start; stop at the first gap."""
        flags = os.O_RDONLY | (_O_DIRECT if self._direct else 0)
        for key in plan.keys:
            path = self.block_path(key)
            try:
                fd = os.open(path, flags)
            except FileNotFoundError:
                self._forget([key])
                break
            except OSError as exc:
                log.warning("cannot open %s: %s", path, exc.strerror)
                self._bump(io_errors=1)
                break
            size = os.fstat(fd).st_size
            if size != self.file_bytes:
                os.close(fd)
                self._quarantine(path, f"size {size} != expected {self.file_bytes}")
                break
            plan.fds.append(fd)
            plan.paths.append(path)
        plan.n = len(plan.fds)
        plan.keys = plan.keys[: plan.n]

    def _read_plans(self, plans: list[_Plan]) -> None:
        """One NIXL READ for every chunk of every plan (batched by file count), then validation."""
        jobs = [(p, i) for p in plans for i in range(p.n)]
        for start in range(0, len(jobs), _MAX_FILES_PER_TRANSFER):
            self._read_jobs(jobs[start : start + _MAX_FILES_PER_TRANSFER])

    def _read_jobs(self, jobs: list[tuple[_Plan, int]]) -> None:
        """Read headers and payloads of ``jobs`` and keep, per plan, its longest valid prefix.

        The read is pipelined in sub-batches of about _PIPELINE_BYTES: while NIXL moves
        sub-batch k+1, a worker thread verifies sub-batch k (XXH3 and NIXL both release the
        GIL), so checksum verification costs little beyond the I/O itself. Decisions
        (quarantine, cutting a prefix) are applied afterwards, in order, on this thread.
        """
        if not jobs:
            return
        arena = self._arenas["READ"]
        plans = list({id(p): p for p, _ in jobs}.values())
        with arena.lock:
            arena.ensure(len(jobs) * self._payload_off)
            tokens: list = []
            try:
                tokens = self.agent.register_batch([(p.mem, p.user_out and p.mem is p.out_view) for p in plans])
                mem_type = self.agent.mem_type_of(plans[0].mem)
                hdr_m, hdr_f, pay_m, pay_f, seg_addrs = self._read_rows(jobs, arena)
                per = max(1, _PIPELINE_BYTES // self.file_bytes)
                groups = [(i, min(i + per, len(jobs))) for i in range(0, len(jobs), per)]
                checks: list[Any] = []
                try:
                    with self.agent.files([fd for p in plans for fd in p.fds]):
                        for lo, hi in groups:
                            seg = slice(lo * self._nseg, hi * self._nseg)
                            self._transfer_rows("READ", hdr_m[lo:hi], hdr_f[lo:hi], pay_m[seg], pay_f[seg], mem_type)
                            checks.append(self._submit_check(jobs, lo, hi, arena, seg_addrs, len(groups) > 1))
                    reasons = [r for c in checks for r in (c.result() if hasattr(c, "result") else c)]
                except TransferError as exc:
                    # Something failed (EIO, a file truncated under us): nothing from this batch is
                    # trusted. Retry chunk by chunk to keep the longest good prefix.
                    for c in checks:
                        if hasattr(c, "result"):
                            c.result()
                    log.warning("batched read failed (%s); retrying chunk by chunk", exc)
                    self._bump(io_errors=1)
                    self._read_one_by_one(jobs, hdr_m, hdr_f, pay_m, pay_f, mem_type)
                    reasons = self._check_range(jobs, 0, len(jobs), arena, seg_addrs)
                self._apply_checks(jobs, reasons)
            finally:
                for token in tokens:
                    self.agent.release(token)

    def _submit_check(self, jobs: list[tuple[_Plan, int]], lo: int, hi: int, arena: "_Arena",
                      seg_addrs: list[np.ndarray], pipelined: bool) -> Any:
        if not pipelined:
            return self._check_range(jobs, lo, hi, arena, seg_addrs)
        if self._verifier is None:
            self._verifier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vua-nixl-verify")
        return self._verifier.submit(self._check_range, jobs, lo, hi, arena, seg_addrs)

    def _read_rows(self, jobs: list[tuple[_Plan, int]], arena: "_Arena") -> tuple[Any, ...]:
        """Descriptor rows: one header row per chunk, and its payload segments in file order."""
        n = len(jobs)
        hdr_m = np.zeros((n, 3), dtype=np.uint64)
        hdr_f = np.zeros((n, 3), dtype=np.uint64)
        pay_m = np.zeros((n, self._nseg, 3), dtype=np.uint64)
        pay_f = np.zeros((n, self._nseg, 3), dtype=np.uint64)
        seg_offsets = self._payload_off + np.arange(self._nseg, dtype=np.uint64) * self._seg_bytes
        seg_addrs = []
        for j, (plan, ci) in enumerate(jobs):
            fd = plan.fds[ci]
            addrs = self._segment_addrs(plan.mem, ci)
            seg_addrs.append(addrs)
            hdr_m[j] = (arena.addr + j * self._payload_off, self._payload_off, 0)
            hdr_f[j] = (0, self._payload_off, fd)
            pay_m[j, :, 0] = addrs
            pay_m[j, :, 1] = self._seg_bytes
            pay_m[j, :, 2] = plan.mem.device.index or 0
            pay_f[j, :, 0] = seg_offsets
            pay_f[j, :, 1] = self._seg_bytes
            pay_f[j, :, 2] = fd
        return hdr_m, hdr_f, pay_m.reshape(-1, 3), pay_f.reshape(-1, 3), seg_addrs

    def _read_one_by_one(self, jobs: list[tuple[_Plan, int]], hdr_m: np.ndarray, hdr_f: np.ndarray,
                         pay_m: np.ndarray, pay_f: np.ndarray, mem_type: str) -> None:
        for j, (plan, ci) in enumerate(jobs):
            if ci >= plan.n:
                continue
            seg = slice(j * self._nseg, (j + 1) * self._nseg)
            try:
                with self.agent.files([plan.fds[ci]]):
                    self._transfer_rows("READ", hdr_m[j : j + 1], hdr_f[j : j + 1], pay_m[seg], pay_f[seg], mem_type)
            except TransferError as exc:
                log.warning("read of %s failed: %s; prefix ends at chunk %d", plan.paths[ci], exc, ci)
                plan.n = ci

    def _check_range(self, jobs: list[tuple[_Plan, int]], lo: int, hi: int, arena: "_Arena",
                     seg_addrs: list[np.ndarray]) -> list[Optional[str]]:
        """Why each loaded chunk in jobs[lo:hi] is invalid (None: valid). No side effects."""
        reasons: list[Optional[str]] = []
        for j in range(lo, hi):
            plan, ci = jobs[j]
            if ci >= plan.n:
                reasons.append(None)
                continue
            parent = plan.keys[ci - 1] if ci > 0 else self.fingerprint
            toks = plan.tokens[ci * self.chunk_tokens : (ci + 1) * self.chunk_tokens]
            try:
                header = decode_header(ctypes.string_at(arena.addr + j * self._payload_off, self._payload_off))
                self._expected(plan.keys[ci], parent, toks).check(header)
                if self.config.verify_checksums:
                    if self._chunk_checksum(plan.mem, ci, seg_addrs[j]) != header.checksum:
                        raise CorruptBlockError("payload checksum mismatch")
                reasons.append(None)
            except CorruptBlockError as exc:
                reasons.append(str(exc))
        return reasons

    def _apply_checks(self, jobs: list[tuple[_Plan, int]], reasons: list[Optional[str]]) -> None:
        """Cut each plan at its first invalid chunk and quarantine that file."""
        for (plan, ci), reason in zip(jobs, reasons):
            if reason is not None and ci < plan.n:
                self._quarantine(plan.paths[ci], reason, fd=plan.fds[ci])
                plan.n = ci
        for plan in {id(p): p for p, _ in jobs}.values():
            plan.keys = plan.keys[: plan.n]

    # ---- delete / quarantine ---------------------------------------------------------------

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
        self._forget(keys)
        self._bump(deletes=len(removed))
        if removed:
            for obs in self.observers:
                if hasattr(obs, "on_removed"):
                    obs.on_removed(self, removed, "delete")
        return len(removed)

    def _quarantine(self, path: str, reason: str, fd: Optional[int] = None) -> None:
        """Move a bad block aside (only if the path still names the inode we judged)."""
        log.warning("corrupt block %s: %s (quarantined)", path, reason)
        self._bump(corrupt=1)
        key_hex = os.path.basename(path).split(".")[0]
        try:
            if fd is not None:
                st_fd, st_path = os.fstat(fd), os.stat(path)
                if (st_fd.st_ino, st_fd.st_dev) != (st_path.st_ino, st_path.st_dev):
                    return  # replaced by a writer since we opened it: not ours to move
            os.replace(path, self.paths.quarantine_file(key_hex))
        except OSError:
            pass
        try:
            self._forget([bytes.fromhex(key_hex)])
        except ValueError:
            pass
        for obs in self.observers:
            if hasattr(obs, "on_corrupt"):
                obs.on_corrupt(self, path, reason)

    # ---- stats ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            s = dict(vars(self._stats))
        s.update(
            root=str(self.paths.root), namespace=self.fp_hex, chunk_tokens=self.chunk_tokens,
            chunk_bytes=self.chunk_bytes, backend=self.agent.backend, engine=self.agent.report.engine,
        )
        return s

    def _bump(self, **deltas: float) -> None:
        with self._stats_lock:
            for k, v in deltas.items():
                setattr(self._stats, k, getattr(self._stats, k) + v)

    # ---- helpers -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise VuaNixlError("KVStore is closed")

    def _expected(self, key: bytes, parent: bytes, toks: np.ndarray) -> ExpectedBlock:
        return ExpectedBlock(
            namespace=self.fingerprint, key=key, parent=parent, tokens=toks.tobytes(),
            dtype=self.namespace.dtype, shape=self._chunk_shape, layout=self._layout_desc,
            payload_offset=self._payload_off, payload_len=self.chunk_bytes,
        )

    def _transfer_rows(self, op: str, hdr_m: np.ndarray, hdr_f: np.ndarray, pay_m: np.ndarray,
                       pay_f: np.ndarray, mem_type: str) -> None:
        """Move block headers (always host memory) and payloads (host or GPU) of a batch."""
        hm, hf = _coalesce(hdr_m, hdr_f)
        pm, pf = _coalesce(pay_m, pay_f)
        if mem_type == "DRAM":  # one request for everything
            self.agent.transfer(op, np.concatenate([hm, pm]), np.concatenate([hf, pf]), "DRAM")
        else:  # GDS: headers from host memory, payloads straight between GPU and storage
            self.agent.transfer(op, hm, hf, "DRAM")
            self.agent.transfer(op, pm, pf, mem_type)

    def _chunk_checksum(self, t: torch.Tensor, chunk: int, addrs: np.ndarray) -> int:
        """XXH3 of a chunk's payload as laid out in its file, from host or GPU memory."""
        if t.device.type == "cuda":  # device pointers cannot be read from the host
            c = self.chunk_tokens
            host = t.narrow(token_dim(self.layout), chunk * c, c).contiguous().cpu()
            return checksum([host.view(torch.uint8).numpy()])
        return checksum(_segments(addrs, self._seg_bytes))

    def _segment_addrs(self, t: torch.Tensor, chunk: int) -> np.ndarray:
        """Addresses of chunk ``chunk``'s segments inside canonical tensor ``t``, in file order."""
        isz = t.element_size()
        base = t.data_ptr()
        st = t.stride()
        start = chunk * self.chunk_tokens
        if self.layout.mla:
            offs = np.arange(self.layout.num_layers, dtype=np.int64) * st[0] + start * st[1]
        else:
            offs = (np.arange(self.layout.num_layers, dtype=np.int64)[:, None] * st[0] + np.arange(2)[None, :] * st[1]).reshape(-1) + start * st[2]
        return (base + offs * isz).astype(np.uint64)


class _Arena:
    """A page-aligned DRAM buffer registered once, for block headers; grows on demand."""

    def __init__(self, agent: NixlAgent):
        self.agent = agent
        self.lock = threading.Lock()
        self.buf: Optional[torch.Tensor] = None
        self.key: Optional[tuple[int, int, str]] = None
        self.addr = 0
        self.size = 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.size:
            self.release()
            size = max(nbytes, 1 << 20)
            self.buf = aligned_empty((size,), torch.uint8)
            self.key = self.agent.register_tensor(self.buf, cache=False)
            self.addr, self.size = self.buf.data_ptr(), size
        return self.addr

    def release(self) -> None:
        if self.key is not None:
            self.agent.release(self.key)
        self.buf, self.key, self.addr, self.size = None, None, 0, 0


def _segments(addrs: np.ndarray, seg_bytes: int) -> Iterable[Any]:
    for a in addrs.tolist():
        yield (ctypes.c_char * seg_bytes).from_address(a)


def _coalesce(mem: np.ndarray, fil: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge runs of descriptors that are adjacent in both memory and file (fewer I/Os)."""
    if len(mem) < 2:
        return mem, fil
    end_m = mem[:-1, 0] + mem[:-1, 1]
    end_f = fil[:-1, 0] + fil[:-1, 1]
    joins = (mem[1:, 0] == end_m) & (fil[1:, 0] == end_f) & (fil[1:, 2] == fil[:-1, 2]) & (mem[1:, 2] == mem[:-1, 2])
    if not joins.any():
        return mem, fil
    starts = np.concatenate(([True], ~joins))
    idx = np.flatnonzero(starts)
    lengths = np.add.reduceat(mem[:, 1], idx)
    m = mem[idx].copy()
    f = fil[idx].copy()
    m[:, 1] = lengths
    f[:, 1] = lengths
    return m, f


def _preallocate(fd: int, size: int, path: str) -> None:
    """Reserve the file's blocks up front so a full disk fails here, cleanly, not mid-transfer."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return  # file system cannot preallocate (some NFS); the transfer will report ENOSPC
        raise


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe_oserror(exc: OSError, root: os.PathLike[str] | str) -> str:
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device holding {root}"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"store root {root} is not writable ({exc.strerror})"
    return f"{exc.strerror or exc} ({exc.filename or root})"
