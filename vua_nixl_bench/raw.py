"""nixlbench's storage benchmark, replayed through the NIXL Python API ("raw" rows).

This reproduces what nixlbench does for a storage backend so the numbers mean the same thing on
a host that has no nixlbench binary (nixlbench is not in the nixl wheel; it is built from source
on GPU hosts). Semantics copied from nixlbench (``main.cpp``, ``nixl_worker.cpp``):

* one initiator buffer per thread; thread ``t``'s descriptor ``j`` is at ``buffer_t + j*block``;
* remote (file) offsets advance one block per descriptor across all threads, round-robin over
  ``num_files`` files, and restart at 0 for every (block, batch) point, so every iteration
  touches the same ``threads * batch * block`` bytes of file;
* each thread creates its transfer request once (``Prep``), then posts it (``Post``) and polls it
  to completion (``Tx``, measured from the end of the post) ``num_iter / threads`` times after
  ``warmup_iter / threads`` warm-up posts, both divided by ``large_blk_iter_ftr`` above 1 MiB;
  ``pipeline_depth`` > 1 splits each thread's batch into that many requests in flight;
* B/W = bytes moved by the timed loop / its wall time, in 1e9 B/s; Avg Lat. = wall time /
  (iterations per thread * batch);
* ``check_consistency``: the file starts filled with 0xaa and the initiator with 0xbb; after a
  READ every descriptor in memory must read 0xaa, after a WRITE the file regions must read the
  written byte.

Where this differs (all logged): nixlbench's OpenMP threads become requests driven from one
Python thread (same number in flight, so the storage sees the same concurrency); only the
bytes a run touches are allocated and pre-filled rather than the whole ``total_buffer_size``
(which on a GPU host is VRAM and may be 32 GiB); the benchmark owns fresh files (so a stale
WRITE file cannot fail a READ check the way it does in nixlbench); and before every point the
initiator is re-filled (READ) or given a point-specific byte (WRITE), so the check proves that
point's transfers moved data rather than passing on what an earlier point left behind.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from vua_nixl.errors import BackendUnavailableError

from .flags import INITIATOR_BYTE, TARGET_BYTE
from .nbconfig import NixlbenchConfig, format_bytes
from .results import BenchRow, LatencyStats

log = logging.getLogger(__name__)

_FILL_CHUNK = 64 << 20
_PAGE = mmap.PAGESIZE


class BackendUnavailable(BackendUnavailableError):
    """The config's backend (or memory type) cannot run on this host."""


@dataclass
class RunOptions:
    """How a config is executed on this host (everything the TOML cannot say)."""

    directory: Path
    fallback: bool = False            # GDS/GDS_MT/VRAM -> POSIX/DRAM when they cannot start
    fallback_posix_api: str = "AIO"
    max_memory: int = 8 << 30         # refuse to allocate more than this for buffers
    keep_files: bool = False
    drop_cache: bool = False          # posix_fadvise(DONTNEED) the file after pre-filling it
    notes: list[str] = field(default_factory=list)


def backend_params(cfg: NixlbenchConfig, backend: str) -> dict[str, str]:
    """The NIXL backend init params nixlbench passes for this config (strings, as NIXL wants)."""
    if backend == "POSIX":
        api = str(cfg["posix_api_type"]).upper()
        return {
            "use_aio": "true" if api == "AIO" else "false",
            "use_uring": "true" if api == "URING" else "false",
            "use_posix_aio": "true" if api == "POSIXAIO" else "false",
            "ios_pool_size": str(cfg["posix_ios_pool_size"]),
            "kernel_queue_size": str(cfg["posix_kernel_queue_size"]),
        }
    if backend == "GDS":
        return {"batch_pool_size": str(cfg["gds_batch_pool_size"]), "batch_limit": str(cfg["gds_batch_limit"])}
    if backend == "GDS_MT":
        return {"thread_count": str(cfg["gds_mt_num_threads"])}
    return {}


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


class HostBuffer:
    """Page-aligned initiator memory (DRAM via mmap, or VRAM via torch when CUDA is present).

    Page alignment is required for O_DIRECT; numpy's and torch's allocators only promise 64 B.
    """

    def __init__(self, nbytes: int, vram: bool):
        self.nbytes = nbytes
        self.vram = vram
        if vram:
            import torch

            self._t = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            self.addr = int(self._t.data_ptr())
            self.mem_type = "VRAM"
            self.dev = int(self._t.device.index or 0)
        else:
            self._mm = mmap.mmap(-1, max(nbytes, _PAGE))
            self.view = np.frombuffer(self._mm, dtype=np.uint8, count=nbytes)
            self.addr = int(self.view.ctypes.data)
            self.mem_type = "DRAM"
            self.dev = 0

    def fill(self, offset: int, length: int, value: int) -> None:
        if self.vram:
            self._t[offset:offset + length].fill_(value)
        else:
            self.view[offset:offset + length] = value

    def all_equal(self, offset: int, length: int, value: int) -> bool:
        if self.vram:
            return bool((self._t[offset:offset + length] == value).all().item())
        return bool(np.all(self.view[offset:offset + length] == value))

    def close(self) -> None:
        if self.vram:
            self._t = None  # type: ignore[assignment]
        else:
            del self.view
            try:
                self._mm.close()
            except BufferError:  # a numpy view still alive somewhere; the GC will unmap
                pass


@dataclass
class _Slot:
    thread: int
    local: np.ndarray        # rows (addr, len, dev)
    remote: np.ndarray       # rows (offset, len, fd)
    handle: Any = None
    in_flight: bool = False
    post_end: float = 0.0


class RawNixlBench:
    """Runs a storage nixlbench config through one NIXL agent; one instance per config run."""

    def __init__(self, cfg: NixlbenchConfig, opts: RunOptions):
        errs = cfg.validate()
        if errs:
            raise ValueError("nixlbench would reject this config: " + "; ".join(errs))
        if not cfg.is_storage() or cfg.backend not in ("GDS", "GDS_MT", "POSIX"):
            raise BackendUnavailable(
                f"backend {cfg.backend} is not a file storage backend this runner supports (GDS, GDS_MT, POSIX)"
            )
        self.cfg = cfg
        self.opts = opts
        self.op = cfg.op
        self.threads = cfg.num_threads
        self.depth = int(cfg["pipeline_depth"])
        self.direct = cfg.direct
        self.notes: list[str] = opts.notes
        self.backend, self.vram = self._choose_backend()
        self.region = int(cfg["max_batch_size"]) * int(cfg["max_block_size"]) * self.depth
        self.region = -(-self.region // _PAGE) * _PAGE
        need = self.region * self.threads
        if need > opts.max_memory:
            raise MemoryError(
                f"this config touches {format_bytes(need)} of initiator memory (threads x max batch x max block), "
                f"more than --max-memory {format_bytes(opts.max_memory)}; lower max_block_size / max_batch_size / "
                f"num_threads with --set, or raise --max-memory"
            )
        per_thread_cfg = int(cfg["total_buffer_size"]) // self.threads
        if self.region < per_thread_cfg:
            self.notes.append(
                f"allocated {format_bytes(need)} of initiator memory (the span the matrix touches) instead of "
                f"total_buffer_size={format_bytes(int(cfg['total_buffer_size']))}"
            )
        self.agent = self._make_agent()
        self.buf = HostBuffer(need, self.vram)
        self.mem_reg = self.agent.register_memory([(self.buf.addr, need, self.buf.dev, "")], self.buf.mem_type)
        self.files: list[Path] = []
        self.fds: list[int] = []
        self.check_fds: list[int] = []
        self._open_files()

    # -- setup --------------------------------------------------------------------------------
    def _choose_backend(self) -> tuple[str, bool]:
        backend = self.cfg.backend
        vram = str(self.cfg["initiator_seg_type"]).upper() == "VRAM"
        problems = []
        if vram and not cuda_available():
            problems.append("initiator_seg_type=VRAM but no CUDA device is visible")
        if backend in ("GDS", "GDS_MT"):
            why = self._probe_backend(backend)
            if why:
                problems.append(f"{backend} backend cannot start: {why}")
        if not problems:
            return backend, vram
        msg = "; ".join(problems)
        if not self.opts.fallback:
            raise BackendUnavailable(
                msg + ". This host cannot run the config as written; pass --fallback to run it with "
                "POSIX and DRAM instead (rows are then labelled with the fallback), or run it on a GPU "
                "host with GDS (see nixlbench_configs/README.md)."
            )
        new_backend = backend
        if backend in ("GDS", "GDS_MT") and any(p.startswith(backend) for p in problems):
            new_backend = "POSIX"
            self.cfg.update({"posix_api_type": self.opts.fallback_posix_api})
        # POSIX moves bytes between files and host memory only, so a fallback is always to DRAM.
        use_vram = vram and cuda_available() and new_backend in ("GDS", "GDS_MT")
        note = f"FALLBACK: {msg}; running {new_backend}" + (
            f"/{self.opts.fallback_posix_api}" if new_backend == "POSIX" and backend != "POSIX" else ""
        ) + (" with DRAM" if vram and not use_vram else "")
        log.warning(note)
        self.notes.append(note)
        return new_backend, use_vram

    def _probe_backend(self, backend: str) -> Optional[str]:
        """Why ``backend`` cannot be created here, or None if it can."""
        from nixl._api import nixl_agent, nixl_agent_config  # type: ignore[import-untyped]

        try:
            a = nixl_agent(f"vua-bench-probe-{uuid.uuid4().hex[:6]}", nixl_agent_config(backends=[]))
            if backend not in a.get_plugin_list():
                return "plugin not in this NIXL build"
            a.create_backend(backend, backend_params(self.cfg, backend))
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}".strip()
        return None

    def _make_agent(self) -> Any:
        from nixl._api import nixl_agent, nixl_agent_config  # type: ignore[import-untyped]

        agent = nixl_agent(f"vua-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}", nixl_agent_config(backends=[]))
        agent.create_backend(self.backend, backend_params(self.cfg, self.backend))
        return agent

    def _open_files(self) -> None:
        d = self.opts.directory
        d.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC
        if self.direct:
            flags |= os.O_DIRECT
        tag = uuid.uuid4().hex[:6]
        nfiles = int(self.cfg["num_files"])
        if (self.threads * self.depth) % nfiles and nfiles > 1:
            raise ValueError(f"num_files={nfiles} must divide the number of thread buffers ({self.threads})")
        for i in range(nfiles):
            p = d / f"vua_bench_{self.backend.lower()}_{os.getpid()}_{tag}_{i}"
            try:
                fd = os.open(p, flags, 0o644)
            except OSError as exc:
                if self.direct and exc.errno == 22:
                    raise BackendUnavailable(
                        f"{d} does not support O_DIRECT (tmpfs/overlayfs?): {exc}; use a block-backed "
                        "file system or storage_enable_direct=false"
                    ) from None
                raise
            self.files.append(p)
            self.fds.append(fd)
            self.check_fds.append(os.open(p, os.O_RDWR))
        self.file_reg = self.agent.register_memory([(0, 0, fd, "") for fd in self.fds], "FILE")
        # Pre-fill the span the matrix touches with nixlbench's target byte (both ops, as nixlbench).
        span_blocks = -(-self.threads * self.depth * int(self.cfg["max_batch_size"]) // nfiles)
        span = span_blocks * int(self.cfg["max_block_size"])
        chunk = np.full(min(span, _FILL_CHUNK), TARGET_BYTE, dtype=np.uint8)
        for fd in self.check_fds:
            off = 0
            while off < span:
                n = min(len(chunk), span - off)
                os.pwrite(fd, memoryview(chunk)[:n], off)  # type: ignore[arg-type]
                off += n
            os.fsync(fd)
            if self.opts.drop_cache:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self.span = span

    # -- descriptors --------------------------------------------------------------------------
    def _descriptors(self, block: int, batch: int) -> list[list[_Slot]]:
        """Per thread, ``pipeline_depth`` slots of ``batch`` descriptors each (nixlbench layout)."""
        eff = batch * self.depth
        nfiles = len(self.fds)
        fd_idx, file_off = 0, 0
        per_thread: list[list[_Slot]] = []
        for t in range(self.threads):
            base = self.buf.addr + t * self.region
            local = np.empty((eff, 3), dtype=np.uint64)
            remote = np.empty((eff, 3), dtype=np.uint64)
            for j in range(eff):
                local[j] = (base + j * block, block, self.buf.dev)
                remote[j] = (file_off, block, self.fds[fd_idx])
                fd_idx += 1
                if fd_idx >= nfiles:
                    fd_idx = 0
                    file_off += block
            per_thread.append([
                _Slot(t, local[s * batch:(s + 1) * batch], remote[s * batch:(s + 1) * batch])
                for s in range(self.depth)
            ])
        return per_thread

    def _prepare(self, slot: _Slot, prep: list[float]) -> None:
        t0 = time.perf_counter()
        ld = self.agent.get_xfer_descs(slot.local, self.buf.mem_type)
        rd = self.agent.get_xfer_descs(slot.remote, "FILE")
        slot.handle = self.agent.initialize_xfer(self.op, ld, rd, self.agent.name)
        prep.append((time.perf_counter() - t0) * 1e6)

    def _post(self, slot: _Slot, post: list[float]) -> None:
        t0 = time.perf_counter()
        state = self.agent.transfer(slot.handle)
        t1 = time.perf_counter()
        if state == "ERR":
            raise RuntimeError(f"NIXL {self.op} post failed")
        post.append((t1 - t0) * 1e6)
        slot.post_end = t1
        slot.in_flight = True

    def _loop(self, threads: list[list[_Slot]], iters: int, prep: list[float], post: list[float],
              tx: list[float]) -> None:
        """``iters`` transfers per thread, at most ``pipeline_depth`` in flight per thread.

        Polls without sleeping: a fixed sleep would put a floor under every latency measured.
        """
        recreate = bool(self.cfg["recreate_xfer"])
        issued = [0] * len(threads)
        done = [0] * len(threads)
        active: list[_Slot] = []
        for t, slots in enumerate(threads):
            for s in slots[: min(self.depth, iters)]:
                if s.handle is None:
                    self._prepare(s, prep)
                self._post(s, post)
                issued[t] += 1
                active.append(s)
        check = self.agent.check_xfer_state
        while active:
            still: list[_Slot] = []
            for s in active:
                state = check(s.handle)
                if state == "PROC":
                    still.append(s)
                    continue
                now = time.perf_counter()
                if state != "DONE":
                    raise RuntimeError(f"NIXL {self.op} transfer ended in state {state}")
                tx.append((now - s.post_end) * 1e6)
                s.in_flight = False
                done[s.thread] += 1
                if issued[s.thread] < iters:
                    if recreate:
                        self.agent.release_xfer_handle(s.handle)
                        s.handle = None
                        self._prepare(s, prep)
                    self._post(s, post)
                    issued[s.thread] += 1
                    still.append(s)
            active = still

    # -- one point ----------------------------------------------------------------------------
    def run_point(self, block: int, batch: int, point_index: int = 0) -> BenchRow:
        """Measure one (block, batch) point; returns a verified row or raises on transfer errors."""
        per_thread_iters, warmup = self.cfg.iters_for_block(block)
        per_thread_iters = max(per_thread_iters, 1)
        threads = self._descriptors(block, batch)
        touched_local = batch * self.depth * block
        write_byte = INITIATOR_BYTE if point_index == 0 else _point_byte(point_index)
        for t in range(self.threads):
            self.buf.fill(t * self.region, touched_local, write_byte if self.op == "WRITE" else INITIATOR_BYTE)
        prep: list[float] = []
        post: list[float] = []
        tx: list[float] = []
        try:
            if warmup > 0:
                self._loop(threads, warmup, [], [], [])
                self._release(threads)  # nixlbench tears requests down after warm-up, so Prep is timed
            t0 = time.perf_counter()
            self._loop(threads, per_thread_iters, prep, post, tx)
            total_s = time.perf_counter() - t0
        finally:
            self._release(threads)
        # nixlbench counts iterations per thread; with pipeline_depth each "iteration" is one
        # request of `batch` descriptors, so depth requests move depth*batch blocks per round.
        total_bytes = block * batch * per_thread_iters * self.threads
        verified, detail = (None, "")
        if bool(self.cfg["check_consistency"]):
            verified, detail = self._verify(threads, block, write_byte)
        return BenchRow(
            path="raw", op=self.op, backend=self.backend, direct=self.direct, block_size=block,
            batch_size=batch, bw_gbps=total_bytes / 1e9 / total_s,
            avg_lat_us=total_s * 1e6 / (per_thread_iters * batch),
            prep=LatencyStats.of(prep), post=LatencyStats.of(post), tx=LatencyStats.of(tx),
            threads=self.threads, iterations=per_thread_iters, total_bytes=total_bytes, total_s=total_s,
            verified=verified, verify_detail=detail,
        )

    def run_point_new_files(self, block: int, batch: int, point_index: int = 0) -> BenchRow:
        """WRITE where every block goes to a file created for it (path ``raw-newfile``).

        nixlbench overwrites blocks of one pre-filled file; a KV store writes each chunk into a
        new file, and on many file systems allocating blocks for new files costs far more than
        overwriting (ext4 with O_DIRECT: about half the bandwidth). This path pays exactly that
        (create, register, one NIXL request per thread, close) and nothing of the store's own
        work, so store vs raw-newfile isolates the store's software overhead. Files are kept
        until the end of the point, as the store's are.
        """
        if self.op != "WRITE":
            raise ValueError("new-file baseline is for WRITE configs")
        per_thread_iters, warmup = self.cfg.iters_for_block(block)
        per_thread_iters = max(per_thread_iters, 1)
        write_byte = _point_byte(point_index + 1)
        touched_local = batch * block
        for t in range(self.threads):
            self.buf.fill(t * self.region, touched_local, write_byte)
        subdir = self.opts.directory / f"vua_bench_newfiles_{uuid.uuid4().hex[:8]}"
        subdir.mkdir(parents=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | (os.O_DIRECT if self.direct else 0)
        lat: list[float] = []
        prep: list[float] = []
        post: list[float] = []
        tx: list[float] = []
        total_s = 0.0
        n = 0
        last_files: list[tuple[str, int]] = []
        try:
            for it in range(warmup + per_thread_iters):
                t0 = time.perf_counter()
                fds: list[int] = []
                names: list[str] = []
                for _t in range(self.threads):
                    for _j in range(batch):
                        name = str(subdir / f"{n}")
                        n += 1
                        fds.append(os.open(name, flags, 0o644))
                        names.append(name)
                reg = self.agent.register_memory([(0, 0, fd, "") for fd in fds], "FILE")
                slots = []
                k = 0
                for t in range(self.threads):
                    local = np.array([(self.buf.addr + t * self.region + j * block, block, self.buf.dev)
                                      for j in range(batch)], dtype=np.uint64)
                    remote = np.array([(0, block, fds[k + j]) for j in range(batch)], dtype=np.uint64)
                    k += batch
                    slots.append([_Slot(t, local, remote)])
                timed = it >= warmup
                self._loop(slots, 1, prep if timed else [], post if timed else [], tx if timed else [])
                self._release(slots)
                self.agent.deregister_memory(reg)
                for fd in fds:
                    os.close(fd)
                dt = time.perf_counter() - t0
                if timed:
                    total_s += dt
                    lat.append(dt * 1e6)
                last_files = [(nm, 0) for nm in names]
            bad = 0
            if bool(self.cfg["check_consistency"]):
                for nm, _ in last_files:
                    with open(nm, "rb") as f:
                        data = f.read()
                    bad += 0 if len(data) == block and data.count(bytes([write_byte])) == block else 1
        finally:
            if not self.opts.keep_files:
                import shutil

                shutil.rmtree(subdir, ignore_errors=True)
        total_bytes = block * batch * per_thread_iters * self.threads
        checked = bool(self.cfg["check_consistency"])
        return BenchRow(
            path="raw-newfile", op=self.op, backend=self.backend, direct=self.direct, block_size=block,
            batch_size=batch, bw_gbps=total_bytes / 1e9 / total_s,
            avg_lat_us=total_s * 1e6 / (per_thread_iters * batch), prep=LatencyStats.of(prep),
            post=LatencyStats.of(post), tx=LatencyStats.of(lat), threads=self.threads,
            iterations=per_thread_iters, total_bytes=total_bytes, total_s=total_s,
            verified=(bad == 0) if checked else None,
            verify_detail=f"{bad}/{len(last_files)} new files wrong" if checked else "",
            note="each block to a new file: create + register + write + close timed; Tx = whole iteration",
        )

    def _release(self, threads: list[list[_Slot]]) -> None:
        for slots in threads:
            for s in slots:
                if s.handle is not None:
                    try:
                        self.agent.release_xfer_handle(s.handle)
                    except Exception:  # a failed request may already be gone
                        pass
                    s.handle = None

    def _verify(self, threads: list[list[_Slot]], block: int, write_byte: int) -> tuple[bool, str]:
        """check_consistency: every descriptor's bytes hold the value the op must have produced."""
        bad = 0
        checked = 0
        for slots in threads:
            for s in slots:
                for (addr, length, _), (off, _, fd) in zip(s.local.tolist(), s.remote.tolist()):
                    checked += 1
                    if self.op == "READ":
                        ok = self.buf.all_equal(int(addr) - self.buf.addr, int(length), TARGET_BYTE)
                    else:
                        data = os.pread(self.check_fds[self.fds.index(int(fd))], int(length), int(off))
                        ok = len(data) == length and data.count(bytes([write_byte])) == length
                    bad += 0 if ok else 1
        if bad:
            log.error("consistency check failed for %d of %d descriptors", bad, checked)
            return False, f"{bad}/{checked} descriptors wrong"
        return True, f"{checked} descriptors"

    def close(self) -> None:
        try:
            self.agent.deregister_memory(self.file_reg)
            self.agent.deregister_memory(self.mem_reg)
        except Exception:
            pass
        for fd in self.fds + self.check_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        if not self.opts.keep_files:
            for p in self.files:
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
        self.buf.close()

    def __enter__(self) -> "RawNixlBench":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _point_byte(i: int) -> int:
    """A per-point fill byte for WRITE checks that is never the file's initial 0xaa."""
    v = (INITIATOR_BYTE + i) & 0xFF
    return v if v != TARGET_BYTE else (v + 1) & 0xFF
