"""Whole-root walks for operators: inventory, checksum verification, temp-file collection.

These never run on the request path. Verification reads block files through the same NIXL
agent as the store (batched), and checks each file on its own terms: header self-checksum,
namespace directory, the key recomputed from parent key + tokens, exact size, payload checksum.
"""

from __future__ import annotations

import ctypes
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import xxhash

from vua_nixl.agent import NixlAgent, aligned_empty
from vua_nixl.digest import PROJ64, proj64
from vua_nixl.errors import CorruptBlockError, NewerFormatError, TransferError
from vua_nixl.format import FORMAT_VERSION, checksum, decode_header
from vua_nixl.paths import StorePaths, note_odd_name, parse_tmp_name, writer_gone
from vua_nixl.recycle import pool_files, release_old
from vua_nixl.safeio import open_regular
from vua_nixl.store.reader import quarantine, retry_each

log = logging.getLogger(__name__)
#: No chunk of any real model comes near this; a larger file under a block name is not read.
MAX_BLOCK_BYTES = 1 << 30
_VERIFY_BATCH_BYTES = 256 << 20


@dataclass
class NamespaceUsage:
    fingerprint: str
    description: dict[str, Any]
    chunks: int = 0
    bytes: int = 0
    oldest: Optional[float] = None
    newest: Optional[float] = None


@dataclass
class Inventory:
    root: str
    namespaces: list[NamespaceUsage] = field(default_factory=list)
    temporaries: int = 0
    temporary_bytes: int = 0
    quarantined: int = 0
    pooled: int = 0  # evicted block files in the recycle pool
    pooled_bytes: int = 0

    @property
    def chunks(self) -> int:
        return sum(n.chunks for n in self.namespaces)

    @property
    def bytes(self) -> int:
        return sum(n.bytes for n in self.namespaces)


def inventory(root: str | os.PathLike[str], progress: Optional[Callable[[int], None]] = None) -> Inventory:
    paths = StorePaths(root)
    inv = Inventory(root=str(paths.root))
    for fp, desc in paths.namespaces():
        usage = NamespaceUsage(fp, desc)
        for entry in paths.blocks(fp):
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            usage.chunks += 1
            usage.bytes += st.st_size
            usage.oldest = st.st_mtime if usage.oldest is None else min(usage.oldest, st.st_mtime)
            usage.newest = st.st_mtime if usage.newest is None else max(usage.newest, st.st_mtime)
            if progress:
                progress(1)
        inv.namespaces.append(usage)
    for entry in paths.temporaries():
        try:
            inv.temporary_bytes += entry.stat().st_size
            inv.temporaries += 1
        except FileNotFoundError:
            pass
    if paths.quarantine.is_dir():
        inv.quarantined = sum(1 for _ in os.scandir(paths.quarantine))
    for _, st in pool_files(paths):
        inv.pooled += 1
        inv.pooled_bytes += st.st_size
    return inv


#: Prefix of a BadBlock reason for a block of a newer format (reported, never removed).
NEWER = "newer format: "


@dataclass
class BadBlock:
    path: str
    reason: str
    inode: Optional[tuple[int, int]] = None  # (st_dev, st_ino) of the file that was judged

    @property
    def newer(self) -> bool:
        return self.reason.startswith(NEWER)


def iter_block_paths(paths: StorePaths, include_odd: bool = False) -> Iterator[tuple[str, str]]:
    for fp, _ in paths.namespaces():
        for entry in paths.blocks(fp, include_odd=include_odd):
            yield fp, entry.path


def verify(
    root: str | os.PathLike[str],
    *,
    agent: Optional[NixlAgent] = None,
    remove: bool = False,
    progress: Optional[Callable[[int], None]] = None,
) -> tuple[int, list[BadBlock]]:
    """Re-check every block; return (blocks checked, bad blocks). ``remove`` quarantines bad ones."""
    paths = StorePaths(root)
    own = agent is None
    agent = agent or NixlAgent(probe_dir=paths.tmp)
    checked, bad = 0, []
    batch: list[tuple[str, str, int]] = []
    size = 0
    try:
        for fp, path in iter_block_paths(paths, include_odd=True):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            n = st.st_size
            if not stat.S_ISREG(st.st_mode) or n > MAX_BLOCK_BYTES:
                why = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"{n} bytes: larger than any block"
                bad.append(BadBlock(path, why, (st.st_dev, st.st_ino)))
                checked += 1
                continue
            if size + n > _VERIFY_BATCH_BYTES and batch:
                bad.extend(_verify_batch(agent, batch))
                checked += len(batch)
                if progress:
                    progress(len(batch))
                batch, size = [], 0
            batch.append((fp, path, n))
            size += n
        if batch:
            bad.extend(_verify_batch(agent, batch))
            checked += len(batch)
            if progress:
                progress(len(batch))
    finally:
        if own:
            agent.close()
    if remove:
        for b in bad:
            if not b.newer:  # data of a newer build is not ours to judge: never moved
                quarantine(paths, b.path, expect=b.inode)  # the reader's inode-checked move
    return checked, bad


def _verify_batch(agent: NixlAgent, batch: list[tuple[str, str, int]]) -> list[BadBlock]:
    total = sum(-(-n // 4096) * 4096 for _, _, n in batch)
    buf = aligned_empty((max(total, 4096),), torch.uint8)
    token = agent.register_tensor(buf, cache=False)
    bad: list[BadBlock] = []
    fds: list[int] = []
    try:
        offs, off = [], 0
        inodes = []
        # GDS: cuFile takes only plain, O_DIRECT descriptors of the checked file.
        gds = agent.plain_fds_only
        flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if gds else 0)
        for _, path, n in batch:
            fd = open_regular(path, flags, plain=gds)  # swapped for a FIFO or link since the walk: refused, not read
            fds.append(fd)
            st = os.fstat(fd)
            inodes.append((st.st_dev, st.st_ino))
            offs.append(off)
            off += -(-n // 4096) * 4096
        base = buf.data_ptr()
        mem = np.array([(base + o, n, 0) for o, (_, _, n) in zip(offs, batch)], dtype=np.uint64)
        fil = np.array([(0, n, fd) for fd, (_, _, n) in zip(fds, batch)], dtype=np.uint64)
        with agent.files(fds):
            try:
                agent.transfer("READ", mem, fil, "DRAM")
                errors: list[Optional[str]] = [None] * len(batch)
            except TransferError:  # as the reader does: trust nothing of the batch, retry each file
                errors = retry_each([partial(agent.transfer, "READ", mem[i : i + 1], fil[i : i + 1], "DRAM")
                                     for i in range(len(batch))])
            for (fp, path, n), o, err, ino in zip(batch, offs, errors, inodes):
                reason = err or check_block_bytes(fp, path, ctypes.string_at(base + o, n))
                if reason:
                    bad.append(BadBlock(path, reason, ino))
    finally:
        for fd in fds:
            os.close(fd)
        agent.release(token)
    return bad


def check_block_bytes(fp_hex: str, path: str, data: bytes) -> Optional[str]:
    """Why these bytes are not a valid block at ``path``, or None if they are."""
    try:
        h = decode_header(data)
    except CorruptBlockError as exc:
        return str(exc)
    except NewerFormatError as exc:
        return NEWER + str(exc)
    if h.namespace.hex() != fp_hex:
        return "namespace in header does not match its directory"
    if os.path.basename(path) != h.key.hex() + ".kvb":
        return "key in header does not match the file name"
    # A sealed (tenant) block's key chain and MAC need the tenant's secret: without it only its
    # structure and payload checksum are checked here; its reader checks the rest on every load.
    if h.version == FORMAT_VERSION and xxhash.xxh3_128_digest(h.parent + h.tokens) != h.key:
        return "key is not the hash of parent key and tokens"
    if len(data) != h.payload_offset + h.payload_len:
        return f"size {len(data)} != header offset + length {h.payload_offset + h.payload_len}"
    payload = data[h.payload_offset :]
    if h.alg == PROJ64:
        digest = proj64(torch.frombuffer(bytearray(payload), dtype=torch.uint8)) if payload else proj64(torch.zeros(0, dtype=torch.uint8))
    else:
        digest = checksum([payload])
    if digest != h.checksum:
        return "payload checksum mismatch"
    return None


def gc_temporaries(root: str | os.PathLike[str], max_age_s: float = 3600.0, now: Optional[float] = None) -> tuple[int, int]:
    """Remove temp files left by dead or long-gone writers; return (files, bytes) removed.

    A temp file is removable when it is older than ``max_age_s`` or when its writer is provably
    dead: same host, same boot and PID namespace (:func:`~vua_nixl.paths.namespace_id` in the
    name) and its pid gone. Writers on other hosts or in other containers are left alone until
    the age limit, so gc is safe on a shared mount and between containers sharing a host name.
    Names that are not ours are never judged by pid (skipped and counted), only by age.
    Recycle-pool files pooled more than ``max_age_s`` ago are released too.
    """
    paths = StorePaths(root)
    now = time.time() if now is None else now
    removed = nbytes = 0
    for entry in paths.temporaries():
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        owner = parse_tmp_name(entry.name)
        if owner is None:
            note_odd_name("temporary", entry.name)
        dead = writer_gone(owner)
        if dead or now - st.st_mtime > max_age_s:
            try:
                os.unlink(entry.path)
                removed += 1
                nbytes += st.st_size
            except FileNotFoundError:
                pass
    pooled, pooled_bytes = release_old(paths, max_age_s, now)  # recycle-pool files past the same age
    return removed + pooled, nbytes + pooled_bytes
