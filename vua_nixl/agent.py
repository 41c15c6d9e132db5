"""The NIXL agent: the only path bytes take between memory and block files.

Backend choice is made by *probing*, not by reading a list: a backend counts as working only if
it can be created and then completes a real write-and-read round trip of a test file in the
store root, because a plugin that loads can still fail at its first I/O (GDS without a driver,
io_uring forbidden by seccomp, O_DIRECT on tmpfs). Every rejected candidate is logged with its
reason, and an explicitly requested backend that fails is an error, never a silent fallback.

Memory is registered once per tensor storage and reused; file descriptors are registered per
batch; one transfer request carries every chunk of a batch (an O_DIRECT put posts one per
sub-batch as its files open: :meth:`NixlAgent.requests`); completion is polled without sleeps.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from vua_nixl.errors import BackendUnavailableError, TransferError

log = logging.getLogger(__name__)

#: auto order: GPU-direct storage first, then plain POSIX I/O. GDS_MT comes before GDS: NIXL
#: 1.5.1's GDS plugin counts cuFile batch completions without reading their status (a failed or
#: short I/O looks done; a later batch's success overwrites an earlier error), while GDS_MT
#: checks every I/O's result. Until a NIXL with a fixed GDS status path is pinned, GDS is only
#: used when GDS_MT cannot start (or when asked for by name).
AUTO_ORDER = ("GDS_MT", "GDS", "POSIX")
#: Backends that move VRAM straight to and from storage through cuFile.
GDS_BACKENDS = ("GDS", "GDS_MT")
#: NIXL's GDS plugin splits descriptors at 16 MiB and holds 16 batches x 128 I/Os per agent.
GDS_SPLIT_BYTES = 16 << 20
GDS_MAX_IOS = 128
#: POSIX I/O engines in probe order, with the NIXL init params that select them. libaio first:
#: NIXL writes into new files through it 1.2-1.6x faster than through io_uring (which punts
#: buffered writes that must allocate blocks to its worker threads), and reads are as fast or
#: faster, cold or warm (measured: docs/BENCHMARKS.md, "I/O engine").
POSIX_ENGINES: dict[str, dict[str, str]] = {
    "aio": {"use_aio": "true"},
    "uring": {"use_uring": "true"},
    "posix_aio": {"use_posix_aio": "true"},
    "sync": {},
}
_PROBE_BYTES = 8192
_SPIN_POLLS = 2000
_MAX_BACKOFF_S = 100e-6
_REG_CACHE_ENTRIES = 8

#: Test hook: called as hook(op, file_descs) before each transfer; raising simulates an I/O fault.
FaultHook = Callable[[str, np.ndarray], None]
#: A registered storage: (address, bytes, NIXL memory type).
RegToken = tuple[int, int, str]


@dataclass
class _Registration:
    reg: Any  # NIXL's registration handle
    storage: Any  # keeps the memory alive while it is registered
    cached: bool  # kept after the last holder releases it (until evicted)
    holders: int = 0


def _import_nixl() -> Any:
    try:
        from nixl._api import nixl_agent, nixl_agent_config  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - nixl is a hard dependency
        raise BackendUnavailableError(f"the nixl package is not importable: {exc}") from None
    if "NIXL_LOG_LEVEL" not in os.environ:
        # NIXL logs an INFO line per agent and backend to *stdout*; the probe makes several, and
        # stdout belongs to the program using us. NIXL_LOG_LEVEL still overrides this.
        logging.getLogger("nixl").setLevel(logging.WARNING)
    return nixl_agent, nixl_agent_config


def nixl_version() -> str:
    try:
        from importlib.metadata import version

        return version("nixl")
    except Exception:
        return "unknown"


@dataclass
class ProbeReport:
    """What `auto` tried, what it chose and why: printed by `vua-nixl info`, logged at start."""

    chosen: Optional[str] = None
    params: dict[str, str] = field(default_factory=dict)
    engine: Optional[str] = None
    rejected: list[tuple[str, str]] = field(default_factory=list)
    plugins: list[str] = field(default_factory=list)

    def summary(self) -> str:
        name = self.chosen if not self.engine else f"{self.chosen} ({self.engine})"
        why = "; ".join(f"{b}: {r}" for b, r in self.rejected) or "none"
        return f"NIXL backend {name} selected; rejected: {why}"


class NixlAgent:
    """A NIXL agent bound to one storage backend, with registration caching and batch transfers."""

    def __init__(
        self,
        backend: str = "auto",
        *,
        posix_io: str = "auto",
        probe_dir: str | os.PathLike[str] | None = None,
        name: Optional[str] = None,
        direct_io: bool = False,
        timeout_s: float = 120.0,
        backend_params: Optional[dict[str, dict[str, str]]] = None,
        max_ios_per_request: int = GDS_MAX_IOS,
        split_bytes: int = GDS_SPLIT_BYTES,
        gds_compat: bool = False,
    ):
        self.timeout_s = timeout_s
        self.gds_compat = gds_compat
        self.backend_params = backend_params or {}
        self.max_ios_per_request = max_ios_per_request
        self.split_bytes = split_bytes
        self.name = name or f"vua-nixl-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.direct_io = direct_io
        self._fault_hook: Optional[FaultHook] = None
        self._parent: Optional["NixlAgent"] = None
        self._probe_dir = Path(probe_dir or "/tmp")
        self._lock = threading.RLock()
        self._regs: OrderedDict[RegToken, _Registration] = OrderedDict()
        self._closed = False
        self.report = ProbeReport()
        self._agent, self.backend = self._select(backend, posix_io, Path(probe_dir or "/tmp"))
        self.mem_types: list[str] = list(self._agent.get_backend_mem_types(self.backend))
        #: cuFile refuses a file descriptor opened with O_NONBLOCK or O_NOFOLLOW (err 5019), the
        #: flags the store opens shared-root files with: GDS readers reopen each checked file plainly.
        self.plain_fds_only: bool = self.backend in GDS_BACKENDS
        log.info(self.report.summary())

    @classmethod
    def from_config(cls, cfg: Any, probe_dir: str | os.PathLike[str], name: Optional[str] = None) -> "NixlAgent":
        """The agent a :class:`~vua_nixl.config.StoreConfig` describes (backend, I/O engine,
        O_DIRECT, deadline, GDS request limits and plugin parameters)."""
        params: dict[str, dict[str, str]] = {}
        if cfg.gds_mt_threads is not None:
            params["GDS_MT"] = {"thread_count": str(cfg.gds_mt_threads)}
        if cfg.gds_batch_pool is not None:
            params["GDS"] = {"batch_pool_size": str(cfg.gds_batch_pool), "batch_limit": str(cfg.gds_max_ios)}
        return cls(cfg.backend, posix_io=cfg.posix_io, probe_dir=probe_dir, name=name or cfg.agent_name,
                   direct_io=cfg.direct_io, timeout_s=cfg.transfer_timeout_s, backend_params=params,
                   max_ios_per_request=cfg.gds_max_ios, split_bytes=cfg.gds_split_mib << 20,
                   gds_compat=cfg.gds_compat)

    def twin(self) -> "NixlAgent":
        """Another agent on the same backend and I/O engine, for a second I/O lane: NIXL moves
        one agent's requests one at a time, so two threads on one agent copy no faster than
        one, while two agents do (measured: docs/BENCHMARKS.md). The twin shares this agent's
        fault hook (tests inject faults on the store's agent) and must be closed by its owner."""
        twin = NixlAgent(self.backend, posix_io=self.report.engine or "auto", probe_dir=self._probe_dir,
                         name=f"{self.name}-lane-{uuid.uuid4().hex[:4]}", direct_io=self.direct_io,
                         timeout_s=self.timeout_s, backend_params=self.backend_params,
                         max_ios_per_request=self.max_ios_per_request, split_bytes=self.split_bytes,
                         gds_compat=self.gds_compat)
        twin._parent = self
        return twin

    @property
    def fault_hook(self) -> Optional[FaultHook]:
        """Test hook: hook(op, file_descs) before each transfer; raising simulates an I/O fault."""
        if self._fault_hook is None and self._parent is not None:
            return self._parent.fault_hook
        return self._fault_hook

    @fault_hook.setter
    def fault_hook(self, hook: Optional[FaultHook]) -> None:
        self._fault_hook = hook

    # ---- backend selection ---------------------------------------------------------------

    def _select(self, backend: str, posix_io: str, probe_dir: Path) -> tuple[Any, str]:
        nixl_agent, nixl_agent_config = _import_nixl()
        candidates = AUTO_ORDER if backend == "auto" else (backend,)
        for cand in candidates:
            engines: Sequence[str]
            if cand == "POSIX":
                engines = list(POSIX_ENGINES) if posix_io == "auto" else [posix_io]
            else:
                engines = [""]
            for engine in engines:
                label = f"{cand}/{engine}" if engine else cand
                if cand in GDS_BACKENDS and not torch.cuda.is_available():
                    self.report.rejected.append((label, "no CUDA device visible to torch"))
                    break
                if cand in GDS_BACKENDS and backend == "auto" and not self.gds_compat and gds_mode() == "compat":
                    # cuFile's compat mode is POSIX I/O through its own bounce buffer: on an H200
                    # host the store read 0.8-1.2 GB/s through it and 1.7-2.2 through POSIX.
                    self.report.rejected.append((label, "cuFile has only compat mode here (no nvidia-fs driver), "
                                                        "slower than POSIX with a host bounce; gds_compat=true allows it"))
                    break
                agent = nixl_agent(f"{self.name}-{cand}-{engine or 'x'}", nixl_agent_config(backends=[]))
                self.report.plugins = list(agent.get_plugin_list())
                if cand not in self.report.plugins:
                    self.report.rejected.append((label, "plugin not present in this NIXL build"))
                    break
                params = dict(POSIX_ENGINES.get(engine, {})) if cand == "POSIX" else {}
                params.update(self.backend_params.get(cand, {}))
                try:
                    agent.create_backend(cand, params)
                    self._probe(agent, cand, probe_dir)
                except Exception as exc:
                    reason = f"{type(exc).__name__}: {exc}".strip(": ")
                    if cand in GDS_BACKENDS:
                        reason += cufile_hint(probe_dir)
                    self.report.rejected.append((label, reason))
                    del agent
                    continue
                self.report.chosen, self.report.params, self.report.engine = cand, params, engine or None
                return agent, cand
        reasons = "; ".join(f"{b}: {r}" for b, r in self.report.rejected)
        if backend == "auto":
            raise BackendUnavailableError(f"no NIXL storage backend works on this host ({reasons})")
        raise BackendUnavailableError(f"NIXL backend {backend} cannot start on this host ({reasons})")

    def _probe(self, agent: Any, backend: str, probe_dir: Path) -> None:
        """A real write + read round trip through the candidate backend, shaped like real work.

        GDS candidates move VRAM *and* DRAM (puts from host memory go through them too), with
        more descriptors than one cuFile batch holds (so request splitting is exercised), at
        4 KiB-aligned offsets of a file opened with the store's flags (read-write, O_DIRECT)."""
        probe_dir.mkdir(parents=True, exist_ok=True)
        gpu = backend in GDS_BACKENDS
        kinds = ("VRAM", "DRAM") if gpu else ("DRAM",)
        ndesc = self.max_ios_per_request + 8 if gpu else 2
        for mem in kinds:
            self._probe_once(agent, backend, probe_dir, mem, ndesc)

    def _probe_once(self, agent: Any, backend: str, probe_dir: Path, mem: str, ndesc: int) -> None:
        path = probe_dir / f".probe.{self.name}.{backend}.{mem}.{uuid.uuid4().hex[:6]}"
        size = ndesc * _PROBE_BYTES // 2  # 4 KiB per descriptor
        piece = size // ndesc
        pattern = torch.randint(0, 255, (size,), dtype=torch.uint8)
        if mem == "VRAM":
            src, dst = pattern.cuda(), torch.zeros(size, dtype=torch.uint8, device="cuda")
        else:
            src, dst = _aligned_empty(size), _aligned_empty(size)
            src.copy_(pattern)
            dst.zero_()
        direct = backend in GDS_BACKENDS or self.direct_io
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | (getattr(os, "O_DIRECT", 0) if direct else 0)
        fd = os.open(path, flags, 0o600)
        try:
            dev = src.device.index or 0
            regs = [agent.register_memory([(t.data_ptr(), size, dev, "")], mem) for t in (src, dst)]
            freg = agent.register_memory([(0, 0, fd, "")], "FILE")
            fil = np.array([(i * piece, piece, fd) for i in range(ndesc)], dtype=np.uint64)
            for op, t in (("WRITE", src), ("READ", dst)):
                rows = np.array([(t.data_ptr() + i * piece, piece, dev) for i in range(ndesc)], dtype=np.uint64)
                spans = plan_requests(fil, self.max_ios_per_request, self.split_bytes) if backend in GDS_BACKENDS else [(0, ndesc)]
                for lo, hi in spans:
                    mdesc = agent.get_xfer_descs(rows[lo:hi], mem)
                    fdesc = agent.get_xfer_descs(fil[lo:hi], "FILE")
                    handle = agent.initialize_xfer(op, mdesc, fdesc, agent.name)
                    try:
                        state = agent.transfer(handle)
                        deadline = time.monotonic() + 30
                        while state == "PROC" and time.monotonic() < deadline:
                            state = agent.check_xfer_state(handle)
                        if state != "DONE":
                            raise TransferError(f"probe {op} of {mem} ended in state {state}")
                    finally:
                        agent.release_xfer_handle(handle)
            if not torch.equal(src.cpu(), dst.cpu()):
                raise TransferError(f"probe read back different bytes than it wrote ({mem})")
            agent.deregister_memory(freg)
            for r in regs:
                agent.deregister_memory(r)
        finally:
            os.close(fd)
            os.unlink(path)

    # ---- memory registration -------------------------------------------------------------

    def supports(self, mem_type: str) -> bool:
        return mem_type in self.mem_types

    def mem_type_of(self, tensor: torch.Tensor) -> str:
        return "VRAM" if tensor.device.type == "cuda" else "DRAM"

    def register_tensor(self, tensor: torch.Tensor, *, cache: bool = True) -> Optional[RegToken]:
        """Make the storage behind ``tensor`` transferable; return a token to :meth:`release`
        once the transfer is done.

        ``cache=True`` keeps the registration after release, for reuse: right for long-lived
        buffers (an engine's KV cache, a caller's output buffer, staging); it is evicted, least
        recently used first, only while no one holds a token for it. ``cache=False`` is for
        short-lived tensors: deregistered when the last token for it is released. A holder that
        never releases (a buffer registered for the process's life) pins it.
        """
        return self.register_batch([(tensor, cache)])[0]

    def register_batch(self, items: Sequence[tuple[torch.Tensor, bool]]) -> list[Optional[RegToken]]:
        """Register every tensor one transfer needs; one token per item, to release after it.

        Registrations are counted per holder, so two threads moving the same storage at once
        (two puts of one tensor, a put and a get into one buffer) never see it deregistered
        under them, and eviction never touches a registration a transfer in flight holds."""
        tokens: list[Optional[RegToken]] = []
        with self._lock:
            for tensor, cache in items:
                storage = tensor.untyped_storage()
                mem = self.mem_type_of(tensor)
                key = (storage.data_ptr(), storage.nbytes(), mem)
                entry = self._regs.get(key)
                if entry is None:
                    dev = tensor.device.index or 0
                    reg = self._agent.register_memory([(key[0], key[1], dev, "")], mem, backends=[self.backend])
                    entry = self._regs[key] = _Registration(reg, storage, cache)
                entry.cached |= cache
                entry.holders += 1
                self._regs.move_to_end(key)
                tokens.append(key)
            idle = [k for k, e in self._regs.items() if e.cached and e.holders == 0]
            for key in idle[: max(0, len(idle) - _REG_CACHE_ENTRIES)]:
                self._deregister(key)
        return tokens

    def release(self, key: Optional[RegToken]) -> None:
        """Give back a token from :meth:`register_batch`; the last holder of an uncached
        registration deregisters it."""
        if key is None:
            return
        with self._lock:
            entry = self._regs.get(key)
            if entry is None:
                return
            entry.holders = max(0, entry.holders - 1)
            if entry.holders == 0 and not entry.cached:
                self._deregister(key)

    def registered(self) -> set[RegToken]:
        """Storages registered now, as (address, bytes, memory type)."""
        with self._lock:
            return set(self._regs)

    def _deregister(self, key: RegToken) -> None:
        entry = self._regs.pop(key)
        self._agent.deregister_memory(entry.reg, backends=[self.backend])

    @contextmanager
    def files(self, fds: Sequence[int]) -> Iterator[None]:
        """Register file descriptors for the duration of one batch."""
        if not fds:
            yield
            return
        with self._lock:
            try:
                reg = self._agent.register_memory([(0, 0, fd, "") for fd in fds], "FILE", backends=[self.backend])
            except Exception as exc:  # nixl raises its own untyped errors; callers handle TransferError
                raise TransferError(f"{self.backend} refused to register {len(fds)} file(s): {exc}") from exc
        try:
            yield
        finally:
            with self._lock:
                self._agent.deregister_memory(reg, backends=[self.backend])

    # ---- transfers -----------------------------------------------------------------------

    def transfer(self, op: str, mem_descs: np.ndarray, file_descs: np.ndarray, mem_type: str = "DRAM") -> None:
        """Move bytes between registered memory and registered files, as ONE NIXL request.

        ``mem_descs`` rows are (address, length, device); ``file_descs`` rows are (offset,
        length, fd), pairwise. Returns only when every byte has moved; any failure raises
        TransferError, so a caller can never mistake a failed read for loaded data.
        """
        if len(mem_descs) == 0:
            return
        if self.backend in GDS_BACKENDS:
            # cuFile batches are bounded: one NIXL request may carry at most max_ios I/Os (each
            # descriptor counts once per split_bytes). Larger transfers go as several requests,
            # one in flight at a time, each checked before the next starts.
            spans = plan_requests(file_descs, self.max_ios_per_request, self.split_bytes)
            if len(spans) > 1:
                for lo, hi in spans:
                    self._transfer_one(op, mem_descs[lo:hi], file_descs[lo:hi], mem_type)
                return
        self._transfer_one(op, mem_descs, file_descs, mem_type)

    def _transfer_one(self, op: str, mem_descs: np.ndarray, file_descs: np.ndarray, mem_type: str) -> None:
        """One NIXL request: post it, then poll it to completion (spin, then back off, no fixed
        sleep floor; a deadline turns a hung transfer into an error) and release it."""
        self._finish(self._post(op, mem_descs, file_descs, mem_type), op, len(mem_descs))

    def transfer_pair(self, op: str, first: tuple[np.ndarray, np.ndarray], mem_type: str,
                      second: "Future[tuple[np.ndarray, np.ndarray]]") -> None:
        """Two requests: ``first`` now, and ``second`` as soon as another thread has made its rows
        ready (block headers that carry digests of ``first``'s bytes), posted while ``first`` is
        still in flight instead of one round trip after it. Returns when both moved; any
        failure raises only after both requests ended and ``second``'s producer finished (no
        I/O, and no thread, left reading memory the caller is about to reuse). GDS backends,
        which split requests, run them one after the other."""
        if self.backend in GDS_BACKENDS:
            try:
                self.transfer(op, *first, mem_type)
            finally:
                rows = second.result()
            self.transfer(op, *rows, mem_type)
            return
        handles: list[Any] = []
        deferred: list[BaseException] = []

        def post_second() -> None:
            if len(handles) == 1 and not deferred and second.done():
                try:
                    m, f = second.result()
                    handles.append(self._post(op, m, f, mem_type) if len(m) else None)
                except BaseException as exc:  # raised once the first request ended
                    deferred.append(exc)

        try:
            handles.append(self._post(op, *first, mem_type) if len(first[0]) else None)
            if handles[0] is not None:
                handle, handles[0] = handles[0], None
                self._finish(handle, op, len(first[0]), poll=post_second)
            wait_futures([second])
            post_second()
            if deferred:
                raise deferred[0]
            if handles[1] is not None:
                handle, handles[1] = handles[1], None
                self._finish(handle, op, len(second.result()[0]))
        finally:
            wait_futures([second])
            for h in handles:  # after an error: let the other request end before memory is reused
                if h is not None:
                    try:
                        self._finish(h, op, 0)
                    except TransferError:
                        pass

    @contextmanager
    def requests(self, op: str, mem_type: str = "DRAM") -> Iterator["RequestGroup"]:
        """Several requests in flight at once, posted as their rows become ready (a writer
        posts each chunk as soon as its file is open, instead of after opening them all).
        Leaving the block waits for every posted request (:meth:`RequestGroup.wait`, raising
        TransferError for a failed one); leaving it by an error first lets every posted
        request end, so no I/O is left using memory or files the caller is about to reuse.
        POSIX only: GDS splits requests (use :meth:`transfer`)."""
        if self.backend in GDS_BACKENDS:
            raise TransferError(f"{self.backend} requests are split and run one at a time: use transfer()")
        group = RequestGroup(self, op, mem_type)
        try:
            yield group
        except BaseException:
            group.drain()
            raise
        group.wait()

    def transfer_overlapped(self, op: str, batches: Sequence[tuple[np.ndarray, np.ndarray]], mem_type: str,
                            work: Callable[[int], None], ahead: int = 1) -> None:
        """:meth:`transfer` each (mem_descs, file_descs) batch in order, with ``ahead`` more
        batches posted before ``work(i)`` runs (``work(i)`` only after batch i completed): the
        caller verifies one batch while the next are in flight, on its own thread. ``ahead=1``
        suits the page cache (the copies happen as requests are posted and polled); a device
        (O_DIRECT) wants every batch in flight at once. Any failure raises TransferError
        only after every posted request has finished or been released (no I/O into memory
        the caller is about to reuse). GDS backends (split requests) run them one at a time."""
        if self.backend in GDS_BACKENDS or len(batches) < 2:
            for i, (m, f) in enumerate(batches):
                self.transfer(op, m, f, mem_type)
                work(i)
            return
        pending: list[Any] = []
        ahead = max(1, ahead)
        try:
            for i in range(min(ahead, len(batches))):
                pending.append(self._post(op, *batches[i], mem_type))
            for i in range(len(batches)):
                if i + ahead < len(batches):
                    pending.append(self._post(op, *batches[i + ahead], mem_type))
                handle, pending[i] = pending[i], None
                self._finish(handle, op, len(batches[i][0]))
                work(i)
        finally:
            for h in pending:  # after an error: let in-flight requests end before memory is reused
                if h is not None:
                    try:
                        self._finish(h, op, 0)
                    except TransferError:
                        pass

    def _post(self, op: str, mem_descs: np.ndarray, file_descs: np.ndarray, mem_type: str) -> Any:
        with self._lock:
            if self._closed:
                raise TransferError("NIXL agent is closed")
            hook = self.fault_hook
            if hook is not None:
                hook(op, file_descs)
            try:
                local = self._agent.get_xfer_descs(np.ascontiguousarray(mem_descs, dtype=np.uint64), mem_type)
                remote = self._agent.get_xfer_descs(np.ascontiguousarray(file_descs, dtype=np.uint64), "FILE")
                handle = self._agent.initialize_xfer(op, local, remote, self._agent.name, backends=[self.backend])
            except Exception as exc:
                raise TransferError(f"NIXL {op} could not be prepared: {type(exc).__name__}: {exc}") from None
            try:
                state = self._agent.transfer(handle)
            except Exception as exc:
                self._agent.release_xfer_handle(handle)
                raise TransferError(f"NIXL {op} failed: {type(exc).__name__}: {exc}") from None
            if state not in ("PROC", "DONE"):
                self._agent.release_xfer_handle(handle)
                raise TransferError(f"NIXL {op} of {len(mem_descs)} descriptors ended in state {state}")
            return handle

    def _finish(self, handle: Any, op: str, ndesc: int, poll: Optional[Callable[[], None]] = None) -> None:
        """Poll a posted request to completion (same spin-then-back-off as transfer) and release it;
        ``poll()`` runs before each check (it must not raise)."""
        spins = 0
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                if poll is not None:
                    poll()
                with self._lock:
                    state = self._agent.check_xfer_state(handle)
                if state != "PROC":
                    break
                spins += 1
                if spins > _SPIN_POLLS:
                    time.sleep(min(_MAX_BACKOFF_S, 1e-6 * (spins - _SPIN_POLLS)))
                    if time.monotonic() > deadline:
                        raise TransferError(f"NIXL {op} of {ndesc} descriptors did not complete in {self.timeout_s:g} s")
                elif spins & 63 == 0:
                    os.sched_yield()
            if state != "DONE":
                raise TransferError(f"NIXL {op} of {ndesc} descriptors ended in state {state}")
        except TransferError:
            raise
        except Exception as exc:
            raise TransferError(f"NIXL {op} failed: {type(exc).__name__}: {exc}") from None
        finally:
            with self._lock:
                try:
                    self._agent.release_xfer_handle(handle)
                except Exception:  # a failed request may already be gone
                    pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            for entry in self._regs.values():
                try:
                    self._agent.deregister_memory(entry.reg, backends=[self.backend])
                except Exception:
                    pass
            self._regs.clear()
            self._closed = True

    def info(self) -> dict[str, Any]:
        return {
            "nixl_version": nixl_version(),
            "agent": self.name,
            "backend": self.backend,
            "gds_mode": gds_mode() if self.backend in GDS_BACKENDS else None,
            "engine": self.report.engine,
            "params": self.report.params,
            "mem_types": self.mem_types,
            "rejected": [{"backend": b, "reason": r} for b, r in self.report.rejected],
            "plugins": self.report.plugins,
        }


class StagingPool:
    """Registered host memory for bounce copies: allocated and registered once, carved per call.

    A bounce is needed when the agent cannot touch the caller's memory directly: a GPU tensor
    with a backend that has no VRAM support (POSIX on a GPU host without GDS), or a buffer that
    is not page aligned under O_DIRECT. Registering such memory per request would put a
    registration (costly for pinned memory and for GDS) on every load; the pool is registered
    once, grows on demand, and is pinned when CUDA is present so device copies are async-capable.
    """

    def __init__(self, agent: "NixlAgent", initial_bytes: int):
        self.agent = agent
        self.initial = initial_bytes
        self.lock = threading.Lock()
        self.buf: Optional[torch.Tensor] = None
        self._token: Optional[tuple[int, int, str]] = None
        self.size = 0

    @contextmanager
    def carve(self, specs: Sequence[tuple[Sequence[int], torch.dtype]]) -> Iterator[list[torch.Tensor]]:
        """Page-aligned views of the pool, one per (shape, dtype), valid inside the block only."""
        if not specs:
            yield []
            return
        sizes = [-(-int(np.prod(shape)) * dtype.itemsize // 4096) * 4096 for shape, dtype in specs]
        with self.lock:
            if sum(sizes) > self.size:
                self._grow(max(sum(sizes), self.initial))
            assert self.buf is not None
            views, off = [], 0
            for (shape, dtype), n in zip(specs, sizes):
                count = int(np.prod(shape)) * dtype.itemsize
                views.append(self.buf[off : off + count].view(dtype).reshape(tuple(shape)))
                off += n
            yield views

    def _grow(self, nbytes: int) -> None:
        self.release()
        if torch.cuda.is_available():
            self.buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        else:
            self.buf = _aligned_empty(nbytes)
        self._token = self.agent.register_tensor(self.buf, cache=False)
        self.size = nbytes
        log.debug("staging pool grown to %d MiB", nbytes >> 20)

    def release(self) -> None:
        if self._token is not None:
            self.agent.release(self._token)
        self.buf, self._token, self.size = None, None, 0


def _aligned_empty(nbytes: int) -> torch.Tensor:
    """Page-aligned host buffer (O_DIRECT needs it); torch's allocator only guarantees 64 bytes."""
    buf = mmap.mmap(-1, max(nbytes, 1))
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes)


def aligned_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A page-aligned, zero-filled host tensor of ``shape`` and ``dtype``."""
    n = int(np.prod(shape)) * dtype.itemsize
    return _aligned_empty(n).view(dtype).reshape(tuple(shape))


def plan_requests(file_descs: np.ndarray, max_ios: int, split_bytes: int) -> list[tuple[int, int]]:
    """Split descriptor rows into consecutive spans of at most ``max_ios`` I/Os each, counting a
    row of length L as ceil(L / split_bytes) I/Os (how NIXL's GDS plugin splits descriptors).
    A single row larger than ``max_ios * split_bytes`` gets a span of its own."""
    if max_ios < 1 or split_bytes < 1:
        raise ValueError("max_ios and split_bytes must be positive")
    lengths = np.asarray(file_descs, dtype=np.uint64).reshape(-1, 3)[:, 1] if len(file_descs) else np.zeros(0, np.uint64)
    ios = np.maximum(1, -(-lengths.astype(np.int64) // split_bytes))
    spans: list[tuple[int, int]] = []
    lo, used = 0, 0
    for i, n in enumerate(ios.tolist()):
        if i > lo and used + n > max_ios:
            spans.append((lo, i))
            lo, used = i, 0
        used += n
    if len(ios):
        spans.append((lo, len(ios)))
    return spans


def cufile_hint(path: Path) -> str:
    """Why cuFile likely refused files under ``path``, where this host shows a known cause.

    cuFile learns a file system's type from udev's database entry for its block device; inside a
    VM or a container without ``/run/udev`` there is none, and ``cuFileHandleRegister`` then fails
    for every file (seen on an H200 VM: "unable to get volume attributes", err 5027)."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return ""
    entry = f"/run/udev/data/b{os.major(dev)}:{os.minor(dev)}"
    if os.major(dev) == 0 or os.path.exists(entry):  # 0: not a block device (NFS, tmpfs, overlay)
        return ""
    return f" (cuFile needs udev data for the file system's device and {entry} is missing: mount /run/udev from the host)"


def gds_mode() -> str:
    """How cuFile would move data on this host: "p2p" with the nvidia-fs driver, else "compat"
    (cuFile falls back to POSIX I/O through a bounce buffer: correct, but not GPU-direct)."""
    import glob

    if os.environ.get("CUFILE_FORCE_COMPAT_MODE", "").lower() in ("1", "true"):
        return "compat"
    return "p2p" if glob.glob("/dev/nvidia-fs*") else "compat"


class RequestGroup:
    """Requests posted one by one through an agent and waited for together
    (:meth:`NixlAgent.requests`)."""

    def __init__(self, agent: NixlAgent, op: str, mem_type: str):
        self._agent, self._op, self._mem_type = agent, op, mem_type
        self._pending: list[tuple[Any, int]] = []

    def post(self, mem_descs: np.ndarray, file_descs: np.ndarray) -> None:
        """Post one request now (rows as in :meth:`NixlAgent.transfer`); it runs while the
        caller prepares the next."""
        if len(mem_descs):
            self._pending.append((self._agent._post(self._op, mem_descs, file_descs, self._mem_type), len(mem_descs)))

    def wait(self) -> None:
        """Return when every posted request has moved all its bytes; raise TransferError for
        the first that failed, after all have ended."""
        error: Optional[TransferError] = None
        while self._pending:
            handle, n = self._pending.pop(0)
            try:
                self._agent._finish(handle, self._op, n)
            except TransferError as exc:
                error = error or exc
        if error is not None:
            raise error

    def drain(self) -> None:
        """Let every posted request end, ignoring how (the caller is already failing)."""
        try:
            self.wait()
        except TransferError:
            pass
