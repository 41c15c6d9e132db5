"""The write/publish path: unique temporary, preallocate, one NIXL write, fsync, rename.

The temporary is an evicted block file claimed from the recycle pool where one is old enough
(vua_nixl.recycle: overwriting allocated blocks is faster than allocating new ones), else a
new, preallocated file.

Small block files (``StoreConfig.stage_max_kib``) are staged: each lane gathers its chunks into
a registered slab as whole files and writes each with one descriptor. Larger ones are written
segment by segment straight from the KV. With O_DIRECT, each sub-batch is posted as soon as its
files are open, while the next ones are opened (the device, not the CPU, is the limit there).

Payload checksums (and tenant MACs) are computed on a helper thread while NIXL writes the
payloads when a CPU is idle (``StoreConfig.hash_overlap``); the headers that carry them are
written after, still before any rename.

A chunk exists iff its final file exists. Every byte lands in a temporary named for this writer
(``<key>.<host>.<pid>.<random>.tmp``) that no reader ever opens; only after the whole batch
transferred (and, with ``fsync``, reached stable storage) is each temporary renamed into place.
Any failure unlinks the temporaries, so a failed put never becomes a hit.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from vua_nixl.agent import NixlAgent
from vua_nixl.errors import StoreRootError, VuaNixlError
from vua_nixl.format import ExpectedBlock, encode_header
from vua_nixl.kvlayout import token_dim
from vua_nixl.recycle import RecyclePool
from vua_nixl.safeio import checked_dir, process_umask
from vua_nixl.store import planning
from vua_nixl.store.core import StoreCore, describe_oserror, on_device
from vua_nixl.store.observers import StoredChunk
from vua_nixl.store.planning import Plan, digest_for, transfer_rows

_O_DIRECT = getattr(os, "O_DIRECT", 0)

#: (key, (plan index, chunk index)) of one chunk to write.
Job = tuple[bytes, tuple[int, int]]


class BlockWriter:
    def __init__(self, core: StoreCore):
        self.core = core
        self._checked: set[str] = set()  # fan-out directories verified to be inside the root
        self._hasher: Optional[ThreadPoolExecutor] = None
        self._slabs = planning.LaneSlabs()  # staged writes
        # Evicted files to overwrite, given the bits a new file gets (the umask as at start-up).
        self._pool = RecyclePool(core.paths, core.config.recycle_after_s, core.config.file_mode & ~process_umask())

    def _digests(self) -> ThreadPoolExecutor:
        """The helper thread payload digests run on while NIXL moves the bytes (made on first use)."""
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vua-nixl-digest")
        return self._hasher

    def close(self) -> None:
        if self._hasher is not None:
            self._hasher.shutdown(wait=True)
            self._hasher = None
        self._slabs.release()

    def write(self, plans: list[Plan], jobs: list[Job]) -> list[StoredChunk]:
        """Publish ``jobs`` (batched by file count). Raises with nothing of a failed batch visible."""
        stored: list[StoredChunk] = []
        checked_dir(self.core.paths.root, self.core.paths.tmp)  # temporaries never land outside the root
        with self._sources(plans, sorted({pi for _, (pi, _) in jobs})) as sources:
            step = planning.MAX_FILES_PER_TRANSFER
            for start in range(0, len(jobs), step):
                stored.extend(self._write_batch(plans, jobs[start : start + step], sources))
        return stored

    @contextmanager
    def _sources(self, plans: list[Plan], used: list[int]) -> Iterator[dict[int, torch.Tensor]]:
        """Memory the agent writes from, per plan: the KV itself, or a staging-pool copy of its
        whole chunks when the agent cannot use it directly (made once per put, not per batch)."""
        core = self.core
        mems = {pi: plans[pi].mem for pi in used}
        assert all(m is not None for m in mems.values())
        bounce = [pi for pi in used if core.needs_bounce(mems[pi])]  # type: ignore[arg-type]
        tdim = token_dim(core.geo.layout)
        c = core.geo.chunk_tokens
        full = {pi: len(plans[pi].keys) * c for pi in bounce}
        with core.staging.carve([(core.geo.layout.shape(full[pi]), core.geo.dtype) for pi in bounce]) as bufs:
            sources: dict[int, torch.Tensor] = dict(mems)  # type: ignore[arg-type]
            for pi, buf in zip(bounce, bufs):
                buf.copy_(sources[pi].narrow(tdim, 0, full[pi]))
                sources[pi] = buf
            yield sources

    def _write_batch(self, plans: list[Plan], jobs: list[Job], host_mem: dict[int, torch.Tensor]) -> list[StoredChunk]:
        core = self.core
        arena = core.arenas["WRITE"]
        out = _Batch()
        try:
            with arena.lock:
                mem_type = core.agent.mem_type_of(next(iter(host_mem.values())))
                staged = mem_type == "DRAM" and core.stages_files()
                if not staged:  # a staged write copies the KV into a lane slab: nothing of the caller's registered
                    out.regs = core.agent.register_batch([(src, False) for src in host_mem.values()])
                if mem_type == "DRAM" and core.streams_writes():
                    self._write_streamed(plans, jobs, host_mem, out)
                else:
                    for job in jobs:
                        self._open_temp(plans, job, out)
                    if staged:
                        self._write_staged(out.chunks, jobs, host_mem, out.fds)
                    else:
                        self._write_in_place(out.chunks, jobs, host_mem, out.fds, mem_type)
            if core.config.fsync:
                for fd in out.fds:
                    os.fsync(fd)
            for fd in out.fds:
                os.close(fd)
            out.fds = []
            dirs = self._publish(out.temps, out.chunks)
            out.temps = []
            recycled = sum(c.recycled for c in out.chunks)
            if recycled:
                core.bump(chunks_recycled=recycled)
            if core.config.fsync:
                for d in dirs:
                    _fsync_dir(d)
            return out.chunks
        except VuaNixlError:
            core.bump(write_failures=1)
            raise
        except OSError as exc:
            core.bump(write_failures=1)
            raise StoreRootError(f"put failed, nothing published: {describe_oserror(exc, core.paths.root)}") from None
        finally:
            for fd in out.fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            for tmp in out.temps:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            for reg in out.regs:
                core.agent.release(reg)

    def _open_temp(self, plans: list[Plan], job: Job, out: _Batch) -> None:
        """Open the temporary chunk ``job`` is written into, and note it (and its record) in
        ``out`` at once, so a failure from here on unlinks it: an evicted block file claimed
        from the recycle pool while it has one old enough, else a new, preallocated file."""
        core, geo = self.core, self.core.geo
        key, (pi, ci) = job
        tmp = core.paths.tmp_file(key.hex())
        # Read-write, not write-only: cuFile may read-modify-write a partial 4 KiB block.
        flags = os.O_RDWR | (_O_DIRECT if core.direct else 0)
        fd = None
        if not out.pool_dry:
            fd = self._pool.claim_one(geo.file_bytes, tmp, flags, plain=core.agent.plain_fds_only)
            out.pool_dry = fd is None
        recycled = fd is not None
        if fd is None:
            fd = os.open(tmp, flags | os.O_CREAT | os.O_EXCL, core.config.file_mode)
        out.temps.append(tmp)
        out.fds.append(fd)
        if not recycled:
            _preallocate(fd, geo.file_bytes)
        plan, c = plans[pi], geo.chunk_tokens
        out.chunks.append(StoredChunk(ci, key, core.parent_of(plan.keys, ci), plan.tokens[ci * c : (ci + 1) * c],
                                      geo.file_bytes, core.block_path(key), recycled=recycled))

    def _write_in_place(self, chunks: list[StoredChunk], jobs: list[Job], host_mem: dict[int, torch.Tensor],
                        fds: list[int], mem_type: str) -> None:
        """Every segment written straight from the source (one descriptor each), headers from
        the arena: over I/O lanes, with digests on a helper thread, or serially."""
        core, geo = self.core, self.core.geo
        arena = core.arenas["WRITE"]
        poff = geo.payload_off
        arena.ensure(len(jobs) * poff)
        hm, hf, pm, pf, sealers = self._rows(jobs, chunks, host_mem, fds, 0)

        def place_headers(headers: list[bytes]) -> None:
            for j, hdr in enumerate(headers):
                _place(arena, j * poff, hdr)

        groups = planning.pipeline_groups(len(jobs), geo.file_bytes, core.pipeline_bytes)
        lanes = core.lanes(mem_type) if len(groups) > 1 else [core.agent]
        with on_device(host_mem.values()), core.agent.files(fds):
            if len(lanes) > 1:
                self._write_on_lanes(lanes, groups, sealers, list(host_mem.values()), fds, (hm, hf, pm, pf))
            elif mem_type == "DRAM" and len(jobs) > 1 and core.hash_in_thread():
                # Digests on a helper thread while this one drives the payload write; the
                # headers that carry them go in a second request, posted as soon as they are
                # placed, while the payload may still be in flight (one device round trip less),
                # and both end before any rename.
                def seal_headers() -> tuple[np.ndarray, np.ndarray]:
                    place_headers([seal() for seal in sealers])
                    return planning.dram_rows(hm, hf, pm[:0], pf[:0])

                core.agent.transfer_pair("WRITE", planning.dram_rows(hm[:0], hf[:0], pm, pf), mem_type,
                                         self._digests().submit(seal_headers))
            else:
                place_headers([seal() for seal in sealers])
                transfer_rows(core.agent, "WRITE", hm, hf, pm, pf, mem_type)

    def _rows(self, jobs: list[Job], chunks: list[StoredChunk], host_mem: dict[int, torch.Tensor], fds: list[int],
              slot: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[Callable[[], bytes]]]:
        """Descriptor rows of ``jobs`` (their records and open temporaries alongside): headers
        from write-arena slots ``slot``, ``slot + 1``, ..., payload segments straight from the
        KV; and each chunk's sealer (its header, digest included, computed when called)."""
        core, geo = self.core, self.core.geo
        arena = core.arenas["WRITE"]
        poff, nseg, seg_bytes = geo.payload_off, geo.nseg, geo.seg_bytes
        n = len(jobs)
        hm = np.zeros((n, 3), dtype=np.uint64)
        hf = np.zeros((n, 3), dtype=np.uint64)
        pm: np.ndarray = np.zeros((n, nseg, 3), dtype=np.uint64)
        pf: np.ndarray = np.zeros((n, nseg, 3), dtype=np.uint64)
        seg_offsets = poff + np.arange(nseg, dtype=np.uint64) * seg_bytes
        sealers: list[Callable[[], bytes]] = []
        for j, ((key, (pi, ci)), chunk, fd) in enumerate(zip(jobs, chunks, fds)):
            src = host_mem[pi]
            addrs = geo.segment_addrs(src, ci)
            sealers.append(self._sealer(src, ci, addrs, geo.expected(core.chain, key, chunk.parent, chunk.tokens)))
            hm[j] = (arena.addr + (slot + j) * poff, poff, 0)
            hf[j] = (0, poff, fd)
            pm[j, :, 0], pm[j, :, 1], pm[j, :, 2] = addrs, seg_bytes, src.device.index or 0
            pf[j, :, 0], pf[j, :, 1], pf[j, :, 2] = seg_offsets, seg_bytes, fd
        return hm, hf, pm.reshape(-1, 3), pf.reshape(-1, 3), sealers

    def _write_streamed(self, plans: list[Plan], jobs: list[Job], host_mem: dict[int, torch.Tensor], out: _Batch) -> None:
        """O_DIRECT writes from host memory, posted as they become ready: each sub-batch of
        about ``pipeline_kib`` (one chunk of 2 MiB or more by default) goes to the device as
        soon as its files are open, while the next files are claimed or created and the
        digests computed. Opening a file costs ~0.3 ms of Python per chunk; done first for the
        whole batch, that was time the device had no work (and the device is the limit here:
        four 4 MiB writes posted 0.25 ms apart end when four posted at once do).

        With a free CPU, digests run on a helper thread and all headers go in one request once
        computed, while the payloads are in flight; without one, each sub-batch is sealed here
        and posted whole (headers with it), overlapping the previous one's I/O. Nothing is
        renamed here; leaving by an error waits for every posted request."""
        core, geo = self.core, self.core.geo
        arena = core.arenas["WRITE"]
        poff = geo.payload_off
        arena.ensure(len(jobs) * poff)
        groups = planning.pipeline_groups(len(jobs), geo.file_bytes, core.pipeline_bytes)
        aside = len(jobs) > 1 and core.hash_in_thread()
        sealing: list[Future[bytes]] = []
        hdr_rows: list[tuple[np.ndarray, np.ndarray]] = []
        try:
            with ExitStack() as files, core.agent.requests("WRITE") as requests:
                for lo, hi in groups:
                    for j in range(lo, hi):
                        self._open_temp(plans, jobs[j], out)
                    files.enter_context(core.agent.files(out.fds[lo:hi]))
                    hm, hf, pm, pf, sealers = self._rows(jobs[lo:hi], out.chunks[lo:hi], host_mem, out.fds[lo:hi], lo)
                    if aside:
                        requests.post(*planning.dram_rows(hm[:0], hf[:0], pm, pf))
                        sealing.extend(self._digests().submit(seal) for seal in sealers)
                        hdr_rows.append((hm, hf))
                    else:
                        for j, seal in enumerate(sealers, lo):
                            _place(arena, j * poff, seal())
                        requests.post(*planning.dram_rows(hm, hf, pm, pf, by_file=True))
                if aside:
                    for j, sealed in enumerate(sealing):
                        _place(arena, j * poff, sealed.result())
                    hm = np.concatenate([m for m, _ in hdr_rows])
                    hf = np.concatenate([f for _, f in hdr_rows])
                    requests.post(*planning.dram_rows(hm, hf, hm[:0], hf[:0]))
        finally:
            wait_futures(sealing)  # no helper left reading the KV once the put returns

    def _write_staged(self, chunks: list[StoredChunk], jobs: list[Job], host_mem: dict[int, torch.Tensor], fds: list[int]) -> None:
        """Staged writes: each lane gathers a sub-batch of chunks into its slab as whole files
        (header, then contiguous payload), digests each payload there while it is in cache, and
        writes each file as one descriptor. The mirror of staged reads: dozens of small segments
        per chunk cost more as descriptors and hash calls than one gathering copy."""
        core, geo = self.core, self.core.geo
        fb, poff, c = geo.file_bytes, geo.payload_off, geo.chunk_tokens
        tdim = token_dim(geo.layout)
        groups = planning.stage_groups(len(jobs), fb, core.pipeline_bytes)
        lanes = core.lanes("DRAM") if len(groups) > 1 else [core.agent]
        width = max(hi - lo for lo, hi in groups)
        as_int, np_int = planning.INT_OF_SIZE[geo.dtype.itemsize]
        srcs = {pi: t.view(as_int).numpy() for pi, t in host_mem.items()}
        alg = {pi: digest_for(t) for pi, t in host_mem.items()}

        def step(agent: NixlAgent, k: int) -> None:
            lo, hi = groups[k]
            slab = self._slabs.get(agent, width * fb)
            assert slab.buf is not None
            raw = slab.buf.numpy()
            for i, ((key, (pi, ci)), chunk) in enumerate(zip(jobs[lo:hi], chunks[lo:hi])):
                start = i * fb
                payload = raw[start + poff : start + fb]
                np.copyto(payload.view(np_int).reshape(geo.chunk_shape), srcs[pi][(slice(None),) * tdim + (slice(ci * c, ci * c + c),)])
                expected = geo.expected(core.chain, key, chunk.parent, chunk.tokens)
                header = expected.make_header(planning.contiguous_checksum(payload, alg[pi]), alg=alg[pi])
                if core.chain.sealed:
                    header = replace(header, mac=planning.contiguous_mac(core.chain, header, payload))
                raw[start : start + poff] = np.frombuffer(encode_header(header), dtype=np.uint8)
            agent.transfer("WRITE", *planning.whole_file_rows(slab, fb, fds[lo:hi]), "DRAM")

        with core.agent.files(fds):
            core.run_on_lanes(lanes, len(groups), step, [], lambda k: fds[slice(*groups[k])])

    def _write_on_lanes(self, lanes: list[NixlAgent], groups: list[tuple[int, int]], sealers: list[Callable[[], bytes]],
                        sources: list[torch.Tensor], fds: list[int], rows: tuple[np.ndarray, ...]) -> None:
        """Sub-batches dealt over I/O lanes: each lane computes its chunks' digests and headers,
        then writes them (headers and payloads in one request), so checksums and copies run on
        every lane's CPU at once. Raises after every lane stopped; nothing is renamed here."""
        core, geo = self.core, self.core.geo
        arena = core.arenas["WRITE"]
        hm, hf, pm, pf = rows
        nseg, poff = geo.nseg, geo.payload_off

        def step(agent: NixlAgent, k: int) -> None:
            lo, hi = groups[k]
            for j in range(lo, hi):
                hdr = sealers[j]()
                _place(arena, j * poff, hdr)
            seg = slice(lo * nseg, hi * nseg)
            transfer_rows(agent, "WRITE", hm[lo:hi], hf[lo:hi], pm[seg], pf[seg], "DRAM")

        assert arena.buf is not None
        core.run_on_lanes(lanes, len(groups), step, [(src, False) for src in sources] + [(arena.buf, False)],
                          lambda k: fds[slice(*groups[k])])

    def _sealer(self, src: torch.Tensor, ci: int, addrs: np.ndarray, expected: ExpectedBlock) -> Callable[[], bytes]:
        """The encoded header of chunk ``ci`` of ``src``, to be computed when asked: its payload
        digest and, for a tenant, its MAC (the expensive part, maybe on another thread)."""
        core, geo = self.core, self.core.geo

        def seal() -> bytes:
            alg = digest_for(src)
            header = expected.make_header(geo.chunk_checksum(src, ci, addrs, alg), alg=alg)
            if core.chain.sealed:
                header = replace(header, mac=geo.chunk_mac(core.chain, header, src, ci, addrs))
            return encode_header(header)
        return seal

    def _publish(self, temps: list[str], chunks: list[StoredChunk]) -> set[str]:
        """Rename every temporary into place; return the directories touched. A fan-out directory
        is checked once per process to be a real directory inside the root (a symlink planted
        there must not make a put publish outside it)."""
        dirs: set[str] = set()
        for tmp, chunk in zip(temps, chunks):
            d = os.path.dirname(chunk.path)
            if d not in dirs and d not in self._checked:
                self._make_dir(d)
            dirs.add(d)
            try:
                os.replace(tmp, chunk.path)
            except FileNotFoundError:  # a directory known to this process was removed (gc of empty dirs)
                if not os.path.exists(tmp):
                    raise
                self._checked.discard(d)
                self._make_dir(d)
                os.replace(tmp, chunk.path)
        return dirs

    def _make_dir(self, d: str) -> None:
        """Create fan-out directory ``d`` if needed and check it once per process (a symlink
        planted there must not make a put publish outside the root).

        The namespace directory is checked against the root by real path; below it, each level
        only needs to be a real directory (``lstat``, not a link) inside a checked one, so by
        induction it lies inside the root too. That costs one ``lstat`` per new directory instead
        of resolving two long paths, which a put into a young root (new fan-out directories for
        most chunks) paid per chunk."""
        parent = os.path.dirname(d)
        ns_dir = os.fspath(self.core.paths.ns_dir(self.core.fp_hex))
        if parent not in self._checked:
            if parent == ns_dir:
                os.makedirs(parent, exist_ok=True)
                checked_dir(self.core.paths.root, parent)
                self._checked.add(parent)
            else:
                self._make_dir(parent)
        try:
            os.mkdir(d)
        except FileExistsError:
            pass
        except FileNotFoundError:  # the parent was removed meanwhile (gc of empty directories)
            self._checked.discard(parent)
            self._make_dir(parent)
            try:
                os.mkdir(d)
            except FileExistsError:
                pass
        st = os.lstat(d)
        if stat.S_ISLNK(st.st_mode):
            raise StoreRootError(f"{d} is a symlink; the store never writes through links under its root")
        if not stat.S_ISDIR(st.st_mode):
            raise StoreRootError(f"{d} is not a directory")
        self._checked.add(d)


@dataclass
class _Batch:
    """What one batch of a put holds until it is published or given up: open temporaries (each
    with its record, in job order) and memory registrations."""

    temps: list[str] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    chunks: list[StoredChunk] = field(default_factory=list)
    regs: list[Optional[tuple[int, int, str]]] = field(default_factory=list)
    #: The recycle pool had no file old enough: the rest of the batch gets new files.
    pool_dry: bool = False


def _place(arena: planning.Arena, offset: int, header: bytes) -> None:
    """Put an encoded header at ``offset`` in the write arena."""
    ctypes.memmove(arena.addr + offset, header, len(header))


def _preallocate(fd: int, size: int) -> None:
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
