"""The recycle pool: evicted block files overwritten by later puts, without breaking a reader.

Everything runs through the real NIXL POSIX agent. Inodes show which file a block landed in;
every load is compared byte for byte with the KV written for that prefix.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import same_bytes
from prometheus_client import CollectorRegistry

from vua_nixl import KVLayout, KVStore, Namespace
from vua_nixl.audit import gc_temporaries, inventory
from vua_nixl.config import StoreConfig
from vua_nixl.errors import InvalidInputError, TransferError
from vua_nixl.lifecycle import Lifecycle, Pruner, StoreMetrics
from vua_nixl.lifecycle.pruner import INFLIGHT
from vua_nixl.recycle import POOL_SUFFIX, RecyclePool, _Listing, pool_dir, pool_files
from vua_nixl.store.reader import BlockReader

C = 16
LAYOUT = KVLayout(num_layers=2, kv_heads=2, head_dim=8)
NS = Namespace(model="recycle/model", dtype="float32", layout=LAYOUT)
#: Short deadlines so that a pooled file ages within a test.
FAST = {"transfer_timeout_s": 0.2, "recycle_after_s": 0.3}


def toks(seed: int, chunks: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 30_000, chunks * C, dtype=np.int64)


def kv_of(seed: int, chunks: int) -> torch.Tensor:
    return torch.randn(LAYOUT.shape(chunks * C), generator=torch.Generator().manual_seed(seed))


def open_store(root: Path, lc: Lifecycle | None = None, **kw) -> KVStore:
    kw.setdefault("presence_ttl_s", 0)
    observers = lc.observers() if lc else kw.pop("observers", ())
    return KVStore(root, NS, chunk_tokens=C, backend="POSIX", observers=observers, **{**FAST, **kw})


def inodes(store: KVStore, tokens: np.ndarray) -> list[int]:
    return [os.stat(store.block_path(k)).st_ino for k in store.keys_for(tokens)]


def evict_all(root: Path, pool_bytes: int) -> Pruner:
    """One pruning round that evicts every block by TTL, pooling up to ``pool_bytes``."""
    pruner = Pruner(root, max_age_s=1.0, recycle_pool_bytes=pool_bytes)
    pruner.run_once(now=time.time() + 1000)
    return pruner


def pooled_store(tmp_path: Path, chunks: int) -> KVStore:
    """A store whose root's pool holds the files of one evicted prompt of ``chunks`` chunks."""
    store = open_store(tmp_path / "root")
    store.put(toks(1, chunks), kv_of(1, chunks))
    evict_all(store.paths.root, 1 << 30)
    return store


def test_evicted_blocks_are_pooled_and_overwritten_only_once_old_enough(tmp_path: Path) -> None:
    root = tmp_path / "root"
    metrics = StoreMetrics(CollectorRegistry())
    store = open_store(root, observers=[metrics])
    a, b, c = toks(1, 6), toks(2, 6), toks(3, 6)
    store.put(a, kv_of(1, 6))
    old = inodes(store, a)
    pruner = evict_all(root, 1 << 30)
    assert pruner.totals.recycled_chunks == 6 and pruner.totals.evicted_chunks == 6
    assert store.lookup(a) == 0 and store.get(a).tokens == 0  # the name goes away at once
    pooled = sorted(st.st_ino for _, st in pool_files(store.paths))
    assert pooled == sorted(old)
    assert pruner.usage()[INFLIGHT] == sum(st.st_blocks * 512 for _, st in pool_files(store.paths))
    inv = inventory(root)  # what `vua-nixl ls` reports
    assert (inv.chunks, inv.pooled, inv.pooled_bytes) == (0, 6, 6 * store.file_bytes)

    store.put(b, kv_of(2, 6))  # the pool is younger than recycle_after_s: new files
    assert store.stats()["chunks_recycled"] == 0 and not set(inodes(store, b)) & set(old)

    time.sleep(FAST["recycle_after_s"] + 0.05)
    store.put(c, kv_of(3, 6))
    assert store.stats()["chunks_recycled"] == 6
    assert metrics.chunks_recycled.labels(store.fp_hex[:12])._value.get() == 6
    assert sorted(inodes(store, c)) == sorted(old)  # written into the evicted files
    assert list(pool_files(store.paths)) == [] and list(store.paths.tmp.iterdir()) == []
    assert inventory(root).pooled == 0
    for seed, t in ((2, b), (3, c)):
        r = store.get(t)
        assert r.tokens == len(t) and same_bytes(r.kv, kv_of(seed, 6))
    assert store.get(a).tokens == 0
    assert store.stats()["corrupt"] == 0
    store.close()


def test_the_pool_never_writes_through_a_link_or_into_a_wrong_file(tmp_path: Path) -> None:
    root = tmp_path / "root"
    store = open_store(root)
    keep, gone, new = toks(1, 2), toks(2, 2), toks(3, 4)
    store.put(keep, kv_of(1, 2))
    store.put(gone, kv_of(2, 2))
    for k in store.keys_for(gone):
        os.unlink(store.block_path(k))
    d = pool_dir(store.paths, store.file_bytes)
    os.makedirs(d)
    published = store.block_path(store.keys_for(keep)[0])
    digest_before = hashlib.sha256(Path(published).read_bytes()).hexdigest()
    os.link(published, f"{d}/hardlink{POOL_SUFFIX}")  # a neighbour's hard link to a live block
    os.symlink(published, f"{d}/symlink{POOL_SUFFIX}")
    Path(f"{d}/short{POOL_SUFFIX}").write_bytes(b"x" * (store.file_bytes - 1))
    os.mkfifo(f"{d}/fifo{POOL_SUFFIX}")
    good = f"{d}/good{POOL_SUFFIX}"
    Path(good).write_bytes(b"\0" * store.file_bytes)
    good_ino = os.stat(good).st_ino
    time.sleep(FAST["recycle_after_s"] + 0.05)

    store.put(new, kv_of(3, 4))
    assert store.stats()["chunks_recycled"] == 1  # only the plain file of the right size
    assert good_ino in inodes(store, new)
    assert hashlib.sha256(Path(published).read_bytes()).hexdigest() == digest_before
    assert os.stat(published).st_nlink == 1  # the planted link was dropped, the block kept
    for seed, t, n in ((1, keep, 2), (3, new, 4)):
        r = store.get(t)
        assert r.tokens == n * C and same_bytes(r.kv, kv_of(seed, n))
    left = {os.path.basename(p): st for p, st in pool_files(store.paths)}
    assert set(left) == {f"symlink{POOL_SUFFIX}", f"short{POOL_SUFFIX}", f"fifo{POOL_SUFFIX}"}
    # gc releases what is not a regular file at once, and the rest once past its age
    assert gc_temporaries(root, max_age_s=3600)[0] == 2
    assert gc_temporaries(root, max_age_s=0)[0] == 1 and list(pool_files(store.paths)) == []
    store.close()


def test_a_pool_linked_outside_the_root_is_never_used_and_stops_nothing(tmp_path: Path) -> None:
    """A neighbour replaces ``pool/`` with a symlink to a directory outside the root: pruning
    still evicts (by unlink), guarded puts still work, and nothing lands outside or is read
    from there."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (outside / "1").mkdir(parents=True)
    lc = Lifecycle(root, config=StoreConfig(root=root, max_bytes=64 << 20, **FAST))
    lc.pruner.recycle_pool_bytes = 16 << 20
    store = open_store(root, lc)
    store.put(toks(1, 2), kv_of(1, 2))
    bait = outside / str(store.file_bytes) / f"bait{POOL_SUFFIX}"
    bait.parent.mkdir()
    bait.write_bytes(b"\0" * store.file_bytes)
    os.symlink(outside, store.paths.pool)
    time.sleep(FAST["recycle_after_s"] + 0.05)
    rep = lc.pruner.run_once(need_bytes=0, now=time.time())  # counts the root, as every guard does
    assert rep.inflight_bytes == 0
    evict_all(root, 1 << 30)
    assert store.lookup(toks(1, 2)) == 0 and sorted(p.name for p in outside.rglob("*")) == ["1", bait.parent.name, bait.name]
    store.put(toks(2, 2), kv_of(2, 2))  # guarded put: the capacity check runs over the planted link
    assert store.stats()["chunks_recycled"] == 0 and bait.read_bytes() == b"\0" * store.file_bytes
    r = store.get(toks(2, 2))
    assert r.tokens == 2 * C and same_bytes(r.kv, kv_of(2, 2))
    store.close()


def test_one_pool_file_goes_to_one_claimer(tmp_path: Path) -> None:
    store = pooled_store(tmp_path, 1)
    later = time.time() + 1000
    flags = os.O_RDWR
    a, b = RecyclePool(store.paths, 0.3), RecyclePool(store.paths, 0.3)
    names = [str(store.paths.tmp / f"claim{i}.tmp") for i in range(2)]
    # both list the one file, then race for it: the rename lets exactly one win
    for pool in (a, b):
        pool._list(store.file_bytes, pool._lists.setdefault(store.file_bytes, _Listing()), later)
        assert len(pool._lists[store.file_bytes].ready) == 1
    fa = a.claim_one(store.file_bytes, names[0], flags, now=later)
    fb = b.claim_one(store.file_bytes, names[1], flags, now=later)
    assert fa is not None and fb is None
    assert os.fstat(fa).st_size == store.file_bytes and os.path.exists(names[0]) and not os.path.exists(names[1])
    os.close(fa)
    store.close()


@pytest.mark.parametrize("first,second", [(0o644, 0o600), (0o600, 0o640)])
def test_a_recycled_file_gets_the_claiming_stores_mode(tmp_path: Path, first: int, second: int) -> None:
    """A pool file keeps whatever bits its creator gave it; the store that claims it publishes
    its block with its own ``file_mode`` (less the umask), as a new file would have."""
    import stat

    old = os.umask(0o022)
    try:
        root = tmp_path / "root"
        loose = open_store(root, file_mode=first)
        loose.put(toks(1, 3), kv_of(1, 3))
        loose.close()
        evict_all(root, 1 << 30)
        # a planted pool file with set-id bits is given plain bits too
        d = pool_dir(loose.paths, loose.file_bytes)
        planted = f"{d}/planted{POOL_SUFFIX}"
        Path(planted).write_bytes(b"\0" * loose.file_bytes)
        os.chmod(planted, 0o6777)
        time.sleep(FAST["recycle_after_s"] + 0.05)
        strict = open_store(root, file_mode=second)
        new = toks(2, 4)
        strict.put(new, kv_of(2, 4))
        assert strict.stats()["chunks_recycled"] == 4
        assert [stat.S_IMODE(os.stat(strict.block_path(k)).st_mode) for k in strict.keys_for(new)] == [second & ~0o022] * 4
        r = strict.get(new)
        assert r.tokens == 4 * C and same_bytes(r.kv, kv_of(2, 4))
        strict.close()
    finally:
        os.umask(old)


def test_a_pool_file_whose_mode_cannot_be_set_is_never_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Another user's pool file (fchmod: EPERM) is dropped, not published with foreign bits."""
    import errno

    def refuse(fd: int, mode: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    old = os.umask(0o022)  # the store reads it at start-up
    try:
        store = pooled_store(tmp_path, 2)
    finally:
        os.umask(old)
    for path, _ in pool_files(store.paths):
        os.chmod(path, 0o666)
    time.sleep(FAST["recycle_after_s"] + 0.05)
    monkeypatch.setattr(os, "fchmod", refuse)
    new = toks(2, 2)
    with caplog.at_level("WARNING", logger="vua_nixl.recycle"):
        store.put(new, kv_of(2, 2))
    assert store.stats()["chunks_recycled"] == 0
    assert "has mode 666 and cannot be given 644 (Operation not permitted): not recycled" in caplog.text
    assert list(pool_files(store.paths)) == [] and list(store.paths.tmp.iterdir()) == []
    r = store.get(new)
    assert r.tokens == 2 * C and same_bytes(r.kv, kv_of(2, 2))
    store.close()


def test_process_umask_reads_without_changing_it() -> None:
    from vua_nixl.safeio import process_umask

    old = os.umask(0o027)
    try:
        assert process_umask() == 0o027
        assert os.umask(0o027) == 0o027  # unchanged by the read
    finally:
        os.umask(old)


@pytest.mark.parametrize("plain", [True, False])
def test_a_claimed_file_is_open_without_o_nonblock(tmp_path: Path, plain: bool) -> None:
    """io_uring fails a write that must wait on an O_NONBLOCK descriptor with EAGAIN: the
    claimed descriptor carries ``flags`` alone, reopened (cuFile) or with the flag cleared."""
    import fcntl

    store = pooled_store(tmp_path, 1)
    pool = RecyclePool(store.paths, 0.3)
    name = str(store.paths.tmp / "claim.tmp")
    fd = pool.claim_one(store.file_bytes, name, os.O_RDWR, now=time.time() + 1000, plain=plain)
    assert fd is not None
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK == 0
        assert os.pwrite(fd, b"\xab" * 4096, 0) == 4096
        assert Path(name).read_bytes()[:4096] == b"\xab" * 4096
    finally:
        os.close(fd)
    store.close()


def test_a_failed_write_into_a_recycled_file_publishes_nothing(tmp_path: Path) -> None:
    store = pooled_store(tmp_path, 3)
    time.sleep(FAST["recycle_after_s"] + 0.05)
    new = toks(2, 3)

    def boom(op, descs):
        if op == "WRITE":
            raise TransferError("injected EIO")

    store.agent.fault_hook = boom
    with pytest.raises(TransferError, match="injected EIO"):
        store.put(new, kv_of(2, 3))
    store.agent.fault_hook = None
    assert store.stats()["chunks_recycled"] == 0 and store.stats()["write_failures"] == 1  # nothing was written
    assert store.lookup(new) == 0 and store.get(new).tokens == 0
    assert list(store.paths.tmp.iterdir()) == [] and list(pool_files(store.paths)) == []  # claimed files are gone with it
    store.put(new, kv_of(2, 3))
    r = store.get(new)
    assert r.tokens == 3 * C and same_bytes(r.kv, kv_of(2, 3))
    store.close()


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("rewritten", [True, False])
def test_a_reader_of_an_evicted_file_counts_a_miss_never_a_corrupt_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                         verify: bool, rewritten: bool) -> None:
    """A reader that opened blocks which are then pooled (and, past ``recycle_after_s``,
    rewritten with another prompt's blocks) before its transfer reads them: a rewritten file,
    or any moved file when nothing is hashed, ends the load at a clean miss; nothing is blamed
    or quarantined, and the new owner's blocks stay good."""
    root = tmp_path / "root"
    reader = open_store(root, verify_checksums=verify)
    writer = open_store(root, transfer_timeout_s=0.01, recycle_after_s=0.02)
    a, b = toks(1, 4), toks(2, 4)
    reader.put(a, kv_of(1, 4))
    original = BlockReader.read
    done = []

    def stalled(self: BlockReader, plans):  # the files are open; now the reader stalls
        if not done:
            done.append(True)
            evict_all(root, 1 << 30)
            if rewritten:
                time.sleep(0.05)  # the reader stalls past the writer's recycle_after_s
                writer.put(b, kv_of(2, 4))
                assert writer.stats()["chunks_recycled"] == 4
        return original(self, plans)

    monkeypatch.setattr(BlockReader, "read", stalled)
    r = reader.get(a)
    monkeypatch.undo()
    if verify and not rewritten:  # the bytes read are this prefix's, and verified: served, as after an unlink
        assert r.tokens == 4 * C and same_bytes(r.kv, kv_of(1, 4))
    else:  # rewritten, or nothing could tell: the name no longer names the inode read, so a miss
        assert r.tokens == 0
    assert reader.stats()["corrupt"] == 0 and list(reader.paths.quarantine.iterdir()) == []
    if rewritten:
        got = writer.get(b)
        assert got.tokens == 4 * C and same_bytes(got.kv, kv_of(2, 4))
    reader.close()
    writer.close()


def test_capacity_keeps_the_pools_room_below_the_limit(tmp_path: Path) -> None:
    """Guarded puts into a full root: eviction feeds the pool, later puts drain it, and blocks,
    temporaries and pool together never exceed ``max_bytes``."""
    root = tmp_path / "root"
    probe = open_store(root)
    fb = probe.file_bytes
    probe.close()
    limit = 40 * fb + 40 * 4096
    lc = Lifecycle(root, config=StoreConfig(root=root, max_bytes=limit, **FAST))
    lc.pruner.recycle_pool_bytes = limit // 4
    store = open_store(root, lc)
    worst = 0
    for i in range(30):
        store.put(toks(100 + i, 4), kv_of(100 + i, 4))
        used = sum(e.stat().st_blocks * 512 for fp in [store.fp_hex] for e in store.paths.blocks(fp))
        used += sum(st.st_blocks * 512 for _, st in pool_files(store.paths))
        used += sum(p.stat().st_blocks * 512 for p in store.paths.tmp.iterdir())
        worst = max(worst, used)
        if i == 15:
            time.sleep(FAST["recycle_after_s"] + 0.05)
    assert worst <= limit
    assert lc.pruner.totals.recycled_chunks > 0 and store.stats()["chunks_recycled"] > 0
    last = toks(129, 4)
    r = store.get(last)
    assert r.tokens == 4 * C and same_bytes(r.kv, kv_of(129, 4))
    store.close()


def test_settings_that_would_break_the_rules_are_refused_by_name() -> None:
    with pytest.raises(InvalidInputError, match=r"recycle_after_s \(60 s, env VUA_NIXL_RECYCLE_AFTER_S\) must exceed transfer_timeout_s"):
        StoreConfig(recycle_after_s=60)
    with pytest.raises(InvalidInputError, match=r"recycle pool of 600 bytes \(recycle_pool_mib\) must be between 0 and half of max_bytes \(1000\)"):
        Pruner("/nonexistent", max_bytes=1000, recycle_pool_bytes=600)
