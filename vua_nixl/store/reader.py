"""The read-and-verify pipeline: open the prefix, one NIXL read, verify, cut at the first bad chunk.

Reads are pipelined in sub-batches of about ``PIPELINE_BYTES``: while NIXL moves sub-batch k+1,
a worker thread verifies sub-batch k (XXH3 and NIXL both release the GIL), so verification costs
little beyond the I/O. Decisions (quarantine, cutting a prefix) are applied afterwards, in order,
on the caller's thread. A transfer error trusts nothing of its batch: the batch is retried chunk
by chunk (:func:`retry_each`, shared with ``vua-nixl verify``) to keep the longest good
prefix.
"""

from __future__ import annotations

import ctypes
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

import numpy as np

from vua_nixl.errors import CorruptBlockError, TransferError
from vua_nixl.format import decode_header
from vua_nixl.paths import StorePaths
from vua_nixl.store import planning
from vua_nixl.store.core import StoreCore
from vua_nixl.store.planning import Arena, Plan, read_rows, transfer_rows

log = logging.getLogger(__name__)

_O_DIRECT = getattr(os, "O_DIRECT", 0)

Job = tuple[Plan, int]


def quarantine(paths: StorePaths, path: str, fd: Optional[int] = None) -> bool:
    """Move a bad block aside, only if ``path`` still names the inode that was judged (``fd``).

    Returns whether it moved. A writer may have republished a good block under the same name
    since the bad one was opened; that block is not ours to move.
    """
    key_hex = os.path.basename(path).split(".")[0]
    try:
        if fd is not None:
            st_fd, st_path = os.fstat(fd), os.stat(path)
            if (st_fd.st_ino, st_fd.st_dev) != (st_path.st_ino, st_path.st_dev):
                return False
        os.replace(path, paths.quarantine_file(key_hex))
        return True
    except OSError:
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

    def close(self) -> None:
        if self._verifier is not None:
            self._verifier.shutdown(wait=True)
            self._verifier = None

    def open_prefix(self, plan: Plan) -> None:
        """Open the contiguous run of chunk files from the start; stop at the first gap."""
        core = self.core
        flags = os.O_RDONLY | (_O_DIRECT if core.direct else 0)
        for key in plan.keys:
            path = core.block_path(key)
            try:
                fd = os.open(path, flags)
            except FileNotFoundError:
                core.presence.forget([key])
                break
            except OSError as exc:
                log.warning("cannot open %s: %s", path, exc.strerror)
                core.bump(io_errors=1)
                break
            size = os.fstat(fd).st_size
            if size != core.geo.file_bytes:
                self.quarantine(path, f"size {size} != expected {core.geo.file_bytes}", fd)
                os.close(fd)
                break
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
        with arena.lock:
            arena.ensure(len(jobs) * geo.payload_off)
            regs: list[Any] = []
            try:
                mems = [p.mem for p in plans]
                assert all(m is not None for m in mems)  # only plans with chunks to read get here
                regs = core.agent.register_batch([(m, p.user_out and m is p.out_view) for m, p in zip(mems, plans)])  # type: ignore[misc]
                mem_type = core.agent.mem_type_of(mems[0])  # type: ignore[arg-type]
                hdr_m, hdr_f, pay_m, pay_f, seg_addrs = read_rows(geo, jobs, arena)
                per = max(1, planning.PIPELINE_BYTES // geo.file_bytes)
                groups = [(i, min(i + per, len(jobs))) for i in range(0, len(jobs), per)]
                checks: list[Any] = []
                try:
                    with core.agent.files([fd for p in plans for fd in p.fds]):
                        for lo, hi in groups:
                            seg = slice(lo * geo.nseg, hi * geo.nseg)
                            transfer_rows(core.agent, "READ", hdr_m[lo:hi], hdr_f[lo:hi], pay_m[seg], pay_f[seg], mem_type)
                            checks.append(self._submit_check(jobs, lo, hi, arena, seg_addrs, len(groups) > 1))
                    reasons = [r for c in checks for r in (c.result() if hasattr(c, "result") else c)]
                except TransferError as exc:
                    for c in checks:  # let in-flight verification finish before memory is reused
                        if hasattr(c, "result"):
                            c.result()
                    log.warning("batched read failed (%s); retrying chunk by chunk", exc)
                    core.bump(io_errors=1)
                    self._retry(jobs, hdr_m, hdr_f, pay_m, pay_f, mem_type)
                    reasons = self._check_range(jobs, 0, len(jobs), arena, seg_addrs)
                self._apply_checks(jobs, reasons)
            finally:
                for reg in regs:
                    core.agent.release(reg)

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
        core, geo = self.core, self.core.geo
        c = geo.chunk_tokens
        reasons: list[Optional[str]] = []
        for j in range(lo, hi):
            plan, ci = jobs[j]
            if ci >= plan.n:
                reasons.append(None)
                continue
            toks = plan.tokens[ci * c : (ci + 1) * c]
            try:
                header = decode_header(ctypes.string_at(arena.addr + j * geo.payload_off, geo.payload_off))
                geo.expected(core.fingerprint, plan.keys[ci], core.parent_of(plan.keys, ci), toks).check(header)
                if core.config.verify_checksums:
                    assert plan.mem is not None
                    if geo.chunk_checksum(plan.mem, ci, seg_addrs[j]) != header.checksum:
                        raise CorruptBlockError("payload checksum mismatch")
                reasons.append(None)
            except CorruptBlockError as exc:
                reasons.append(str(exc))
        return reasons

    def _apply_checks(self, jobs: list[Job], reasons: list[Optional[str]]) -> None:
        """Cut each plan at its first invalid chunk and quarantine that file."""
        for (plan, ci), reason in zip(jobs, reasons):
            if reason is not None and ci < plan.n:
                self.quarantine(plan.paths[ci], reason, fd=plan.fds[ci])
                plan.n = ci
        for plan in {id(p): p for p, _ in jobs}.values():
            plan.keys = plan.keys[: plan.n]

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
