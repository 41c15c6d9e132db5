"""What the write path and the read path share: one namespace on one root, through one agent.

:class:`StoreCore` is built once by :class:`~vua_nixl.store.kvstore.KVStore` and handed to the
writer and the reader; it holds no per-request state.
"""

from __future__ import annotations

import errno
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from vua_nixl.agent import NixlAgent, StagingPool
from vua_nixl.config import StoreConfig
from vua_nixl.keys import KeyChain, Namespace
from vua_nixl.paths import StorePaths
from vua_nixl.store.cpus import FreeCpus
from vua_nixl.store.cpus import shared as shared_cpus
from vua_nixl.store.planning import DIRECT_ALIGN, Arena, ChunkGeometry
from vua_nixl.store.presence import PresenceCache
from vua_nixl.store.verified import VerifiedFiles


@dataclass
class StoreStats:
    """In-process counters; `vua-nixl stats` adds what is on disk."""

    puts: int = 0
    chunks_written: int = 0
    chunks_skipped: int = 0
    chunks_recycled: int = 0  # written into evicted block files claimed from the recycle pool
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
    digests_skipped: int = 0
    write_failures: int = 0
    load_seconds: float = 0.0


@dataclass
class StoreCore:
    config: StoreConfig
    namespace: Namespace
    fingerprint: bytes
    chain: KeyChain
    paths: StorePaths
    geo: ChunkGeometry
    agent: NixlAgent
    presence: PresenceCache
    staging: StagingPool
    direct: bool
    vram_ok: bool
    #: ``notify(hook, *args)`` tells the store's observers (set by the store).
    notify: Callable[..., None]
    stats: StoreStats = field(default_factory=StoreStats)
    _stats_lock: threading.Lock = field(default_factory=threading.Lock)
    arenas: dict[str, Arena] = field(default_factory=dict)
    #: Files whose digest matched recently (``verify_cache_s``; empty and unused when 0).
    verified: VerifiedFiles = field(default_factory=lambda: VerifiedFiles(0.0))
    #: CPUs free for helper threads and I/O lanes (``auto`` settings), measured process-wide.
    cpus: FreeCpus = field(default_factory=shared_cpus)
    _lanes: list[NixlAgent] = field(default_factory=list)
    _lane_pool: Optional[ThreadPoolExecutor] = None
    _lane_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def fp_hex(self) -> str:
        return self.fingerprint.hex()

    def block_path(self, key: bytes) -> str:
        return self.paths.block(self.fp_hex, key.hex())

    def parent_of(self, keys: list[bytes], ci: int) -> bytes:
        # A prompt's first chunk names the public fingerprint as its parent, also in a tenant
        # namespace whose keys chain from a secret root: the pruner must see where chains start,
        # and the fingerprint tells nothing about the keys.
        return keys[ci - 1] if ci > 0 else self.fingerprint

    def bump(self, **deltas: float) -> None:
        with self._stats_lock:
            for k, v in deltas.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    def snapshot(self) -> dict[str, Any]:
        with self._stats_lock:
            return dict(vars(self.stats))

    @property
    def pipeline_bytes(self) -> Optional[int]:
        """Sub-batch size from ``pipeline_kib`` (None: the measured default)."""
        kib = self.config.pipeline_kib
        return None if kib is None else kib << 10

    def hash_in_thread(self) -> bool:
        """Whether checksums should run on a helper thread, overlapped with the transfer.

        XXH3 and NIXL both release the GIL, so a second thread hides the checksum behind the
        I/O, but only when a second CPU is actually idle: on a busy host the GIL hand-offs
        cost more than the overlap saves (measured: docs/BENCHMARKS.md). ``auto`` asks
        :class:`~vua_nixl.store.cpus.FreeCpus` (at most every half second)."""
        mode = self.config.hash_overlap
        if mode != "auto":
            return mode == "thread"
        return self.cpus.free() >= 1.5

    def lanes(self, mem_type: str) -> list[NixlAgent]:
        """The agents one large batch is spread over, the store's own first: one lane per usable
        CPU (``io_lanes``: 0 = auto, only while a CPU is idle) for POSIX transfers of host
        memory. NIXL copies one agent's requests one after the other, so parallel page-cache
        copies need agents of their own. GDS keeps one agent (GDS_MT has its own threads), and
        so does O_DIRECT: there the device is the limit, and one request with every I/O of the
        batch in flight keeps its queue deeper than lanes taking turns."""
        if mem_type != "DRAM" or self.agent.backend != "POSIX" or self.direct:
            return [self.agent]
        n = self.config.io_lanes
        if n == 0:  # one lane per CPU other processes leave free
            n = min(MAX_AUTO_LANES, int(self.cpus.free() + 0.5))
        if n < 2:
            return [self.agent]
        with self._lane_lock:
            while len(self._lanes) < n - 1:
                self._lanes.append(self.agent.twin())
            if self._lane_pool is None:  # as many workers as twins could ever be made
                self._lane_pool = ThreadPoolExecutor(max_workers=MAX_AUTO_LANES - 1 if self.config.io_lanes == 0
                                                     else n - 1, thread_name_prefix="vua-nixl-lane")
        return [self.agent, *self._lanes[: n - 1]]

    def run_on_lanes(self, lanes: list[NixlAgent], nitems: int, step: Callable[[NixlAgent, int], None],
                     tensors: Sequence[tuple[torch.Tensor, bool]], fds_of: Callable[[int], Sequence[int]]) -> None:
        """``step(agent, k)`` for sub-batches k = 0..nitems-1 dealt round-robin over ``lanes``,
        each lane taking its share in order; the first lane runs on this thread. A twin lane
        first registers the batch's memory (``tensors``, as in :meth:`NixlAgent.register_batch`)
        and the files of its share (``fds_of(k)``). Returns or raises (the first error) only
        after every lane has finished, so no transfer is still writing into memory the caller
        reuses."""
        def work(agent: NixlAgent, ks: list[int]) -> None:
            with self._lane_holds(agent, tensors, [fd for k in ks for fd in fds_of(k)]):
                for k in ks:
                    step(agent, k)

        parts = [list(range(i, nitems, len(lanes))) for i in range(len(lanes))]
        pool = self._lane_pool
        assert pool is not None or len(lanes) == 1
        futures = [pool.submit(work, a, p) for a, p in zip(lanes[1:], parts[1:]) if p] if pool else []
        error: Optional[BaseException] = None
        try:
            work(lanes[0], parts[0])
        except BaseException as exc:
            error = exc
        for f in futures:
            try:
                f.result()
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error

    @contextmanager
    def _lane_holds(self, agent: NixlAgent, tensors: Sequence[tuple[torch.Tensor, bool]], fds: Sequence[int]) -> Iterator[None]:
        """On a twin lane: register ``tensors`` and ``fds`` for its share, released after. The
        store's own agent already holds the batch's registrations: nothing to do there."""
        if agent is self.agent:
            yield
            return
        regs = agent.register_batch(tensors)
        try:
            with agent.files(fds):
                yield
        finally:
            for reg in regs:
                agent.release(reg)

    def close_lanes(self) -> None:
        with self._lane_lock:
            if self._lane_pool is not None:
                self._lane_pool.shutdown(wait=True)
                self._lane_pool = None
            for lane in self._lanes:
                lane.close()
            self._lanes.clear()

    def streams_writes(self) -> bool:
        """Whether writes from host memory are posted sub-batch by sub-batch as their files
        open (``BlockWriter._write_streamed``): O_DIRECT POSIX, where the device is the limit
        and idle while a batch's files are opened. Through the page cache a POSIX request is
        copied as it is posted, so nothing would overlap, and lanes copy in parallel instead."""
        return self.direct and self.agent.backend == "POSIX"

    def stages_files(self) -> bool:
        """Whether this store's block files move whole through lane slabs (``stage_max_kib``):
        POSIX page-cache I/O of files up to the limit. Callers add what their direction needs
        (host memory; for reads, something to verify)."""
        return (self.agent.backend == "POSIX" and not self.direct
                and 0 < self.geo.file_bytes <= self.config.stage_max_kib << 10)

    def needs_bounce(self, t: torch.Tensor) -> bool:
        """Whether the agent cannot use ``t``'s memory directly (see StagingPool)."""
        if t.device.type == "cuda" and not self.vram_ok:
            return True
        if not self.direct:
            return False
        # O_DIRECT and GDS: every segment's address must be aligned, so the base and the strides
        # between segments (layer, K/V, chunk start) must all be multiples of the alignment
        # (unaligned GPU memory would make cuFile bounce and read-modify-write behind our back).
        isz = t.element_size()
        st = t.stride()
        c = self.geo.chunk_tokens
        steps = (st[0], c * st[1]) if self.geo.layout.mla else (st[0], st[1], c * st[2])
        return t.data_ptr() % DIRECT_ALIGN != 0 or any((x * isz) % DIRECT_ALIGN for x in steps)


#: lanes ``io_lanes=0`` uses at most (beyond a few, memory bandwidth, not CPUs, is the limit).
MAX_AUTO_LANES = 4


def describe_oserror(exc: OSError, root: os.PathLike[str] | str) -> str:
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device holding {root}"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"store root {root} is not writable ({exc.strerror})"
    return f"{exc.strerror or exc} ({exc.filename or root})"


@contextmanager
def on_device(tensors: Iterable[Optional[torch.Tensor]]) -> Iterator[None]:
    """Stream discipline around a transfer that touches GPU memory.

    Before: every CUDA device involved has its current stream synchronised, so kernels still
    queued on the source (a put of KV produced on a side stream) or on the destination (a get
    into blocks a queued kernel still reads or writes) finish before cuFile's DMA starts: NIXL
    moves bytes outside CUDA stream order. After the transfer returns the bytes are in place,
    so work the caller enqueues next sees them. During: the device of the first CUDA tensor is
    current, because NIXL's registration calls ``cudaSetDevice`` on the calling thread and
    allocations must not drift to another GPU. A no-op for host memory."""
    devices = sorted({t.device.index or 0 for t in tensors if t is not None and t.device.type == "cuda"})
    if not devices:
        yield
        return
    for d in devices:
        torch.cuda.current_stream(d).synchronize()
    with torch.cuda.device(devices[0]):
        yield

