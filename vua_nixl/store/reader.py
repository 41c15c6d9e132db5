"""The read-and-verify pipeline: open the prefix, read through NIXL, verify, cut at the first bad chunk.

Reads are pipelined in sub-batches of about ``PIPELINE_BYTES``. Page cache, a CPU or more free:
the sub-batches are dealt over I/O lanes (agents of their own, one thread each), each lane
reading a sub-batch and then verifying it. One lane: while NIXL moves sub-batch k+1, sub-batch k
is verified, on a helper thread when a CPU is free (XXH3 and NIXL both release the GIL), else
between polls (``StoreConfig.hash_overlap``). O_DIRECT: every sub-batch is in flight before the
first is verified. Decisions (quarantine, cutting a prefix) are applied afterwards, in order, on
the caller's thread. A transfer error trusts nothing of its batch: the batch is retried chunk by
chunk (:func:`retry_each`, shared with ``vua-nixl verify``) to keep the longest good prefix.

Small block files (``StoreConfig.stage_max_kib``) read from the page cache are *staged*
instead: a chunk of a small-head model is dozens of small segments, and moving each as its own
descriptor and hashing each with its own call costs more than one more copy. Each lane reads
whole files into its own registered slab, verifies them there and copies only good chunks
into place, so a bad file never touches the caller's memory.
"""

from __future__ import annotations

import ctypes
import hmac
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from vua_nixl.agent import NixlAgent
from vua_nixl.digest import XXH3
from vua_nixl.errors import CorruptBlockError, NewerFormatError, TransferError, VuaNixlError
from vua_nixl.format import BlockHeader, HeaderMatcher, decode_header
from vua_nixl.kvlayout import token_dim
from vua_nixl.paths import StorePaths
from vua_nixl.safeio import NotRegularFileError, checked_dir, open_checked
from vua_nixl.store import planning
from vua_nixl.store.core import StoreCore, on_device
from vua_nixl.store.planning import Arena, Plan, dram_rows, read_rows, transfer_rows
from vua_nixl.store.verified import FileIdentity, identity, identity_of

log = logging.getLogger(__name__)

_O_DIRECT = getattr(os, "O_DIRECT", 0)

Job = tuple[Plan, int]
_NEWER = "newer: "
_CALLER = "caller: "
_UNREADABLE = "unreadable: "  # the transfer failed: the prefix ends, nothing is blamed
_PAYLOAD_MISMATCH = "mismatch"  # payload checksum or MAC: the bytes read, not the header
_MOVED = "moved: "  # the name no longer names the inode read (evicted, recycled): a miss


def _still_named(path: str, fd: int) -> bool:
    """Whether ``path`` still names the inode open as ``fd``."""
    try:
        return _inode(os.fstat(fd)) == _inode(os.lstat(path))
    except OSError:
        return False


def _inode(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def quarantine(paths: StorePaths, path: str, fd: Optional[int] = None, expect: Optional[tuple[int, int]] = None) -> bool:
    """Move a bad block aside, only if ``path`` still names the inode that was judged (``fd``, or
    ``expect`` = (st_dev, st_ino)).

    Returns whether it moved. A writer may have republished a good block under the same name
    since the bad one was opened; that block is not ours to move.
    """
    key_hex = os.path.basename(path).split(".")[0]
    try:
        checked_dir(paths.root, paths.quarantine)  # never move anything out of the root
        if fd is not None:
            expect = _inode(os.fstat(fd))
        if expect is not None and _inode(os.lstat(path)) != expect:
            return False
        os.replace(path, paths.quarantine_file(key_hex))
        return True
    except (OSError, VuaNixlError) as exc:
        log.warning("cannot quarantine %s: %s", path, exc)
        return False


def retry_each(transfers: Sequence[Callable[[], None]]) -> list[Optional[str]]:
    """Run each transfer alone (after a failed batch); return each one's error (None: it read)."""
    errors: list[Optional[str]] = []
    for move in transfers:
        try:
            move()
            errors.append(None)
        except TransferError as exc:
            errors.append(f"read failed: {exc}")
    return errors


class BlockReader:
    def __init__(self, core: StoreCore):
        self.core = core
        self._verifier: Optional[ThreadPoolExecutor] = None
        self._slabs = planning.LaneSlabs()  # staged reads
        geo = core.geo
        #: Plain headers are checked in one pass; sealed ones (MAC over every field) decode fully.
        self._matcher = None if core.chain.sealed else HeaderMatcher(
            core.chain.fingerprint, geo.dtype_name, geo.chunk_shape, geo.layout_desc, geo.payload_off, geo.chunk_bytes)

    def close(self) -> None:
        if self._verifier is not None:
            self._verifier.shutdown(wait=True)
            self._verifier = None
        self._slabs.release()

    def open_prefix(self, plan: Plan) -> None:
        """Open the contiguous run of chunk files from the start; stop at the first gap."""
        core = self.core
        flags = os.O_RDONLY | (_O_DIRECT if core.direct else 0)
        for key in plan.keys:
            path = core.block_path(key)
            try:
                fd, st = open_checked(path, flags, plain=core.agent.plain_fds_only)  # cuFile refuses guarded fds
            except FileNotFoundError:
                core.presence.forget([key])
                break
            except NotRegularFileError as exc:  # a symlink or FIFO planted under a block name
                self.quarantine(path, str(exc))
                break
            except OSError as exc:
                log.warning("cannot open %s: %s", path, exc.strerror)
                core.bump(io_errors=1)
                break
            size = st.st_size
            if size != core.geo.file_bytes:
                self.quarantine(path, f"size {size} != expected {core.geo.file_bytes}", fd)
                os.close(fd)
                break
            if core.verified.enabled:
                plan.idents.append(identity_of(st))
            plan.fds.append(fd)
            plan.paths.append(path)
        plan.n = len(plan.fds)
        plan.keys = plan.keys[: plan.n]

    def read(self, plans: list[Plan]) -> None:
        """One NIXL READ for every chunk of every plan (batched by file count), then validation."""
        jobs = [(p, i) for p in plans for i in range(p.n)]
        step = planning.MAX_FILES_PER_TRANSFER
        for start in range(0, len(jobs), step):
            self._read_jobs(jobs[start : start + step])

    def _read_jobs(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        core, geo = self.core, self.core.geo
        arena = core.arenas["READ"]
        plans = list({id(p): p for p, _ in jobs}.values())
        reasons: list[Optional[str]] = []
        if self._stages(plans):
            with arena.lock:  # one read at a time uses the lanes' slabs, as the header arena
                reasons = self._read_staged(jobs, plans)
            self._apply_checks(jobs, reasons, private=True)
            return
        with arena.lock:
            arena.ensure(len(jobs) * geo.payload_off)
            regs: list[Any] = []
            try:
                mems = [p.mem for p in plans]
                assert all(m is not None for m in mems)  # only plans with chunks to read get here
                regs = core.agent.register_batch([(m, p.user_out and m is p.out_view) for m, p in zip(mems, plans)])  # type: ignore[misc]
                mem_type = core.agent.mem_type_of(mems[0])  # type: ignore[arg-type]
                hdr_m, hdr_f, pay_m, pay_f, seg_addrs = read_rows(geo, jobs, arena)
                groups = planning.pipeline_groups(len(jobs), geo.file_bytes, core.pipeline_bytes)
                checks: list[Any] = []
                hashing = core.config.verify_checksums or core.chain.sealed
                lanes = core.lanes(mem_type) if len(groups) > 1 else [core.agent]
                try:
                    with on_device(mems), core.agent.files([fd for p in plans for fd in p.fds]):
                        if len(lanes) > 1:
                            checks = self._read_on_lanes(lanes, jobs, groups, plans, arena,
                                                         (hdr_m, hdr_f, pay_m, pay_f), seg_addrs)
                        elif mem_type == "DRAM":
                            # Sub-batch k is verified while k+1 (O_DIRECT: every later one, so the
                            # device's queue stays full) is in flight; on a helper thread when a CPU
                            # is free, because the engine moves a request's bytes only while this
                            # thread polls it.
                            aside = hashing and len(groups) > 1 and core.hash_in_thread()
                            batches = [dram_rows(hdr_m[lo:hi], hdr_f[lo:hi], pay_m[lo * geo.nseg : hi * geo.nseg],
                                                 pay_f[lo * geo.nseg : hi * geo.nseg]) for lo, hi in groups]
                            core.agent.transfer_overlapped(
                                "READ", batches, mem_type,
                                lambda k: checks.append(self._submit_check(jobs, *groups[k], arena, seg_addrs, aside)),
                                ahead=len(batches) if core.direct else 1)
                        else:  # VRAM (GDS): one sub-batch at a time, verified in line on the GPU
                            for lo, hi in groups:
                                seg = slice(lo * geo.nseg, hi * geo.nseg)
                                transfer_rows(core.agent, "READ", hdr_m[lo:hi], hdr_f[lo:hi], pay_m[seg], pay_f[seg], mem_type)
                                checks.append(self._check_range(jobs, lo, hi, arena, seg_addrs))
                    reasons = [r for c in checks for r in (c.result() if hasattr(c, "result") else c)]
                except TransferError as exc:
                    for c in checks:  # let in-flight verification finish before memory is reused
                        if hasattr(c, "result"):
                            c.result()
                    log.warning("batched read failed (%s); retrying chunk by chunk", exc)
                    core.bump(io_errors=1)
                    self._retry(jobs, hdr_m, hdr_f, pay_m, pay_f, mem_type)
                    reasons = self._check_range(jobs, 0, len(jobs), arena, seg_addrs)
            finally:
                for reg in regs:
                    core.agent.release(reg)
        self._apply_checks(jobs, reasons)

    def _stages(self, plans: list[Plan]) -> bool:
        """Whether this batch reads whole files into lane slabs (see ``StoreConfig.stage_max_kib``):
        page-cache reads into host memory, through POSIX, with something to hash."""
        core = self.core
        return (core.stages_files() and (core.config.verify_checksums or core.chain.sealed)
                and all(p.mem is not None and p.mem.device.type == "cpu" for p in plans))

    def _read_staged(self, jobs: list[Job], plans: list[Plan]) -> list[Optional[str]]:
        """Staged reads: each lane reads a sub-batch of whole block files (header and payload, one
        descriptor per file) into its slab, verifies each chunk there with one pass over
        contiguous bytes while they are in the CPU's cache, and copies only good chunks into
        place (numpy, GIL released). A chunk of a small-head model is dozens of small segments:
        moved one descriptor each, and hashed one call each, they cost more than this one extra
        copy (docs/BENCHMARKS.md). The destination is never registered, and a bad file never
        touches it. Returns each job's reason, in order."""
        core, geo = self.core, self.core.geo
        fb = geo.file_bytes
        groups = planning.stage_groups(len(jobs), fb, core.pipeline_bytes)
        lanes = core.lanes("DRAM") if len(groups) > 1 else [core.agent]
        width = max(hi - lo for lo, hi in groups)
        results: list[list[Optional[str]]] = [[] for _ in groups]
        fds = [plan.fds[ci] for plan, ci in jobs]

        tdim, poff = token_dim(geo.layout), geo.payload_off
        as_int, np_int = planning.INT_OF_SIZE[geo.dtype.itemsize]
        # [ci] of each is chunk ci's place in the caller's tensor / chunk i's payload in a slab
        dests = {id(p): planning.chunk_places(p.mem.view(as_int).numpy(), tdim, geo.chunk_tokens)  # type: ignore[union-attr]
                 for p in plans}

        def step(agent: NixlAgent, k: int) -> None:
            # Lean on purpose: per chunk this is Python under the GIL that other lanes wait for.
            lo, hi = groups[k]
            slab = self._slabs.get(agent, width * fb)
            assert slab.buf is not None
            raw = slab.buf.numpy()
            view = memoryview(raw)  # type: ignore[arg-type]  # numpy arrays are buffers
            payloads = planning.slab_payloads(raw, hi - lo, fb, poff, geo.chunk_shape, np_int)
            rows, frows = planning.whole_file_rows(slab, fb, fds[lo:hi])
            failed: list[Optional[str]] = [None] * (hi - lo)
            try:
                agent.transfer("READ", rows, frows, "DRAM")
            except TransferError as exc:
                log.warning("batched read failed (%s); retrying chunk by chunk", exc)
                core.bump(io_errors=1)
                failed = retry_each([partial(agent.transfer, "READ", rows[i : i + 1], frows[i : i + 1], "DRAM")
                                     for i in range(hi - lo)])
            out: list[Optional[str]] = []
            run: list[Any] = []  # [plan, first ci, first i, count]: good chunks in a row, copied at once
            for i, j in enumerate(range(lo, hi)):
                plan, ci = jobs[j]
                if failed[i] is not None:  # the prefix ends here; the file is not blamed
                    out.append(_UNREADABLE + str(failed[i]))
                    continue
                start = i * fb
                payload = raw[start + poff : start + fb]
                reason = self._verdict(plan, ci, view[start : start + poff],
                                       lambda alg, p=payload: planning.contiguous_checksum(p, alg),  # type: ignore[misc]
                                       lambda header, p=payload: planning.contiguous_mac(core.chain, header, p))  # type: ignore[misc]
                if reason is None:
                    if run and run[0] is plan and run[1] + run[3] == ci and run[2] + run[3] == i:
                        run[3] += 1
                    else:
                        place(run, payloads)
                        run = [plan, ci, i, 1]
                out.append(reason)
            place(run, payloads)
            results[k] = out

        def place(run: list[Any], payloads: np.ndarray) -> None:
            # One copy per run of good chunks: numpy releases the GIL for it, and every hand-off
            # of the GIL between lanes costs a wait (docs/BENCHMARKS.md, "Staged small files").
            if run:
                plan, ci, i, n = run
                np.copyto(dests[id(plan)][ci : ci + n], payloads[i : i + n])

        try:
            with core.agent.files(fds):
                core.run_on_lanes(lanes, len(groups), step, [], lambda k: fds[slice(*groups[k])])
        except TransferError as exc:  # a lane could not register its files: nothing it read is trusted
            log.warning("staged read failed: %s", exc)
            core.bump(io_errors=1)
            return [_UNREADABLE + str(exc)] * len(jobs)
        return [r for rs in results for r in rs]

    def _read_on_lanes(self, lanes: list[NixlAgent], jobs: list[Job], groups: list[tuple[int, int]], plans: list[Plan],
                       arena: Arena, rows: tuple[np.ndarray, ...], seg_addrs: list[np.ndarray]) -> list[list[Optional[str]]]:
        """Sub-batches dealt over I/O lanes: each lane reads a sub-batch, verifies it, reads its
        next one, so copies and checksums run on every lane's CPU at once. Returns each
        sub-batch's reasons, in order; a transfer error is raised after every lane stopped."""
        core, nseg = self.core, self.core.geo.nseg
        hdr_m, hdr_f, pay_m, pay_f = rows
        results: list[list[Optional[str]]] = [[] for _ in groups]

        def step(agent: NixlAgent, k: int) -> None:
            lo, hi = groups[k]
            seg = slice(lo * nseg, hi * nseg)
            transfer_rows(agent, "READ", hdr_m[lo:hi], hdr_f[lo:hi], pay_m[seg], pay_f[seg], "DRAM")
            results[k] = self._check_range(jobs, lo, hi, arena, seg_addrs)

        assert arena.buf is not None
        mems = [(p.mem, p.user_out and p.mem is p.out_view) for p in plans] + [(arena.buf, False)]
        core.run_on_lanes(lanes, len(groups), step, mems,  # type: ignore[arg-type]
                          lambda k: [jobs[j][0].fds[jobs[j][1]] for j in range(*groups[k])])
        return results

    def _retry(self, jobs: list[Job], hdr_m: np.ndarray, hdr_f: np.ndarray, pay_m: np.ndarray,
               pay_f: np.ndarray, mem_type: str) -> None:
        """Chunk by chunk after a failed batch: a plan's prefix ends at its first unreadable chunk."""
        core, nseg = self.core, self.core.geo.nseg
        for j, (plan, ci) in enumerate(jobs):
            if ci >= plan.n:
                continue
            seg = slice(j * nseg, (j + 1) * nseg)

            def move(j: int = j, fd: int = plan.fds[ci], seg: slice = seg) -> None:
                with core.agent.files([fd]):
                    transfer_rows(core.agent, "READ", hdr_m[j : j + 1], hdr_f[j : j + 1], pay_m[seg], pay_f[seg], mem_type)

            (err,) = retry_each([move])
            if err is not None:
                log.warning("read of %s failed: %s; prefix ends at chunk %d", plan.paths[ci], err, ci)
                plan.n = ci

    def _submit_check(self, jobs: list[Job], lo: int, hi: int, arena: Arena, seg_addrs: list[np.ndarray], pipelined: bool) -> Any:
        if not pipelined:
            return self._check_range(jobs, lo, hi, arena, seg_addrs)
        if self._verifier is None:
            self._verifier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vua-nixl-verify")
        return self._verifier.submit(self._check_range, jobs, lo, hi, arena, seg_addrs)

    def _check_range(self, jobs: list[Job], lo: int, hi: int, arena: Arena, seg_addrs: list[np.ndarray]) -> list[Optional[str]]:
        """Why each loaded chunk in jobs[lo:hi] is invalid (None: valid). No side effects."""
        geo = self.core.geo
        reasons: list[Optional[str]] = []
        for j in range(lo, hi):
            plan, ci = jobs[j]
            if ci >= plan.n:
                reasons.append(None)
                continue
            mem, addrs = plan.mem, seg_addrs[j]
            assert mem is not None
            reasons.append(self._verdict(
                plan, ci, ctypes.string_at(arena.addr + j * geo.payload_off, geo.payload_off),
                lambda alg, mem=mem, ci=ci, addrs=addrs: geo.chunk_checksum(mem, ci, addrs, alg),  # type: ignore[misc]
                lambda header, mem=mem, ci=ci, addrs=addrs: geo.chunk_mac(self.core.chain, header, mem, ci, addrs)))  # type: ignore[misc]
        return reasons

    def _verdict(self, plan: Plan, ci: int, raw_header: bytes | memoryview, digest: Callable[[str], int],
                 mac_of: Callable[[BlockHeader], bytes]) -> Optional[str]:
        """Why chunk ``ci`` of ``plan`` is invalid (None: valid), given its header bytes and how
        to digest (by algorithm) and MAC its payload where it was read to."""
        core, geo = self.core, self.core.geo
        c = geo.chunk_tokens
        toks = plan.tokens[ci * c : (ci + 1) * c]
        parent = core.parent_of(plan.keys, ci)
        quick = None if self._matcher is None else self._matcher.match(raw_header, plan.keys[ci], parent,
                                                                       core.chain.token_field(toks))
        header: Optional[BlockHeader] = None
        try:
            if quick is None:  # sealed, or something is off: decode fully, for the precise reason
                header = decode_header(raw_header)
                geo.expected(core.chain, plan.keys[ci], parent, toks).check(header)
                checksum, alg = header.checksum, header.alg
            else:
                checksum, alg = quick
            if core.config.verify_checksums:
                ident = self._unchanged_since_open(plan, ci)
                if ident is not None and core.verified.fresh(ident):
                    core.bump(digests_skipped=1)
                elif digest(alg) != checksum:
                    raise CorruptBlockError("payload checksum mismatch")
                elif ident is not None:
                    core.verified.add(ident)
            if core.chain.sealed:  # always, whatever verify_checksums says: this is authentication
                assert header is not None  # sealed headers always decode fully
                if not hmac.compare_digest(mac_of(header), header.mac):
                    raise CorruptBlockError("MAC mismatch: not written with this tenant's key")
            return None
        except CorruptBlockError as exc:
            return str(exc)
        except NewerFormatError as exc:  # not ours to judge: the prefix ends, the file stays
            return _NEWER + str(exc)

    def _unchanged_since_open(self, plan: Plan, ci: int) -> Optional[FileIdentity]:
        """Chunk ``ci``'s file identity if the verified-files cache applies to it and nothing
        wrote the file between its open and now (the read is complete by then): a write by
        anyone moves the ctime. None: hash the payload."""
        core = self.core
        if not core.verified.enabled or core.agent.plain_fds_only or ci >= len(plan.idents):
            return None
        opened = plan.idents[ci]
        try:
            return opened if identity(plan.fds[ci]) == opened else None
        except OSError:
            return None

    def _apply_checks(self, jobs: list[Job], reasons: list[Optional[str]], private: bool = False) -> None:
        """Cut each plan at its first invalid chunk and quarantine that file (``private``: the
        chunks were verified in the store's own memory, so a mismatch is the file's).

        A file whose name no longer names the inode that was read was evicted (or replaced)
        meanwhile: a miss, never blamed. With nothing hashed (``verify_checksums`` off, no
        tenant MAC) that is checked for every chunk, since a recycled file could have been
        rewritten under a reader stalled past ``recycle_after_s``."""
        core = self.core
        unhashed = not core.config.verify_checksums and not core.chain.sealed
        for (plan, ci), reason in zip(jobs, reasons):
            if ci < plan.n and (reason is not None or unhashed) and not _still_named(plan.paths[ci], plan.fds[ci]):
                reason = _MOVED
            if reason is not None and ci < plan.n and plan.user_out and not private and _PAYLOAD_MISMATCH in reason:
                # The caller's buffer may be what is wrong (written to concurrently, aliased): read
                # the chunk again into memory of our own before blaming a shared file.
                reason = self._recheck_private(plan, ci)
            if reason is not None and ci < plan.n:
                if reason.startswith(_NEWER):
                    log.info("block %s: %s; treated as a miss", plan.paths[ci], reason[len(_NEWER):])
                elif reason.startswith(_UNREADABLE):
                    log.warning("read of %s failed: %s; prefix ends at chunk %d", plan.paths[ci], reason[len(_UNREADABLE):], ci)
                elif reason.startswith(_CALLER):
                    pass  # the file is good; only this load stops here
                elif reason == _MOVED:
                    log.info("block %s was evicted or replaced while it was read; prefix ends at chunk %d", plan.paths[ci], ci)
                else:
                    self.quarantine(plan.paths[ci], reason, fd=plan.fds[ci])
                plan.n = ci
        for plan in {id(p): p for p, _ in jobs}.values():
            plan.keys = plan.keys[: plan.n]

    def _recheck_private(self, plan: Plan, ci: int) -> Optional[str]:
        """Re-read chunk ``ci`` of ``plan`` into a private buffer; if the file is good, place it in
        the caller's buffer and check it there once more. Returns why the chunk is still bad."""
        geo = self.core.geo
        c = geo.chunk_tokens
        private = Plan(plan.keys[: ci + 1], plan.tokens[: (ci + 1) * c],
                       torch.empty(geo.layout.shape((ci + 1) * c), dtype=geo.dtype, device=plan.mem.device))  # type: ignore[union-attr]
        private.out_view = private.mem
        private.fds, private.paths, private.n = plan.fds[: ci + 1], plan.paths[: ci + 1], ci + 1
        private.idents = plan.idents[: ci + 1]
        reasons: list[Optional[str]] = []
        arena = self.core.arenas["READ"]
        with arena.lock:
            arena.ensure(geo.payload_off)
            regs = self.core.agent.register_batch([(private.mem, False)])  # type: ignore[list-item]
            try:
                hm, hf, pm, pf, addrs = read_rows(geo, [(private, ci)], arena)
                with self.core.agent.files([plan.fds[ci]]):
                    transfer_rows(self.core.agent, "READ", hm, hf, pm, pf, self.core.agent.mem_type_of(private.mem))  # type: ignore[arg-type]
                reasons = self._check_range([(private, ci)], 0, 1, arena, addrs)
            except TransferError as exc:
                reasons = [f"read failed: {exc}"]
            finally:
                for reg in regs:
                    self.core.agent.release(reg)
        if reasons[0] is not None:
            return reasons[0]  # the file itself is bad
        tdim = token_dim(geo.layout)
        assert plan.mem is not None and private.mem is not None
        plan.mem.narrow(tdim, ci * c, c).copy_(private.mem.narrow(tdim, ci * c, c))
        if geo.chunk_checksum(plan.mem, ci, geo.segment_addrs(plan.mem, ci), XXH3) != geo.chunk_checksum(private.mem, ci, addrs[0], XXH3):
            log.warning("output buffer changed while chunk %d was loaded into it; the prefix ends there", ci)
            return _CALLER + "output buffer changed during the load"
        log.warning("chunk %d failed its check in the caller's buffer but not in a private one: kept", ci)
        return None

    def quarantine(self, path: str, reason: str, fd: Optional[int] = None) -> None:
        """Count, move aside (inode-checked), forget, and tell observers."""
        core = self.core
        log.warning("corrupt block %s: %s (quarantined)", path, reason)
        core.bump(corrupt=1)
        quarantine(core.paths, path, fd)
        try:
            core.presence.forget([bytes.fromhex(os.path.basename(path).split(".")[0])])
        except ValueError:
            pass
        core.notify("on_corrupt", path, reason)

