"""O_DIRECT writes posted as their files open, and the order of a request's rows.

The real NIXL POSIX agent on real files opened with O_DIRECT (skipped where the file system
refuses it, e.g. tmpfs). What is posted is seen through ``NixlAgent.fault_hook``, called with
every request's file rows (offset, length, fd) before it goes out.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_kv, same_bytes

from vua_nixl import KVLayout, KVStore, Namespace, StoreRootError, TransferError
from vua_nixl.agent import aligned_empty
from vua_nixl.store import planning, writer

LAYOUT = KVLayout(num_layers=2, kv_heads=2, head_dim=64)  # 4 KiB segments at 16 tokens
CHUNK = 16
NS = Namespace(model="test/direct-writes", dtype="bfloat16", layout=LAYOUT)


def _direct_ok(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path / ".d", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600))
        os.unlink(path / ".d")
        return True
    except OSError:
        return False


@pytest.fixture
def root(tmp_path: Path) -> Path:
    if not _direct_ok(tmp_path):
        pytest.skip("O_DIRECT not supported on this file system")
    return tmp_path / "store"


def _leftovers(root: Path) -> list[str]:
    """Temporaries and published blocks under ``root`` (what a failed put must not leave)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix in (".tmp", ".kvb"))


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.parametrize("overlap", ["inline", "thread"])
def test_each_chunk_is_posted_as_soon_as_its_file_is_open(root, monkeypatch, overlap):
    """With one chunk per sub-batch, the device gets chunk 0 before chunk 1's file is even
    opened: opens and posts alternate. Inline, every request is one chunk's header and payload,
    the header first; on a helper thread, payload requests come first and one request carries
    every header at the end. The files read back byte for byte."""
    events: list[tuple[str, ...]] = []
    orig_open = writer.BlockWriter._open_temp

    def open_temp(self, plans, job, out):
        orig_open(self, plans, job, out)
        events.append(("open", out.temps[-1]))

    monkeypatch.setattr(writer.BlockWriter, "_open_temp", open_temp)
    kv = make_kv(LAYOUT, torch.bfloat16, 4 * CHUNK, seed=5)
    toks = np.arange(4 * CHUNK)
    with KVStore(root, NS, chunk_tokens=CHUNK, backend="POSIX", direct_io=True, pipeline_kib=1,
                 hash_overlap=overlap) as s:
        s.agent.fault_hook = lambda op, descs: events.append(
            (op, *(f"{_fd_path(int(fd))}@{int(off)}" for off, _, fd in descs)))
        assert s.put(toks, kv) == 4 * CHUNK
        s.agent.fault_hook = None
        geo = s._core.geo
        segs = [geo.payload_off + k * geo.seg_bytes for k in range(geo.nseg)]  # K, V of 2 layers
        kinds = [e[0] for e in events]
        if overlap == "inline":
            assert kinds == ["open", "WRITE"] * 4
            for (_, tmp), (_, *rows) in zip(events[0::2], events[1::2]):
                assert rows == [f"{tmp}@{off}" for off in [0, *segs]]  # the header first, then its payload
        else:
            assert kinds == ["open", "WRITE"] * 4 + ["WRITE"]
            for (_, tmp), (_, *rows) in zip(events[0:8:2], events[1:8:2]):
                assert rows == [f"{tmp}@{off}" for off in segs]
            assert list(events[-1][1:]) == [f"{tmp}@0" for _, tmp in events[0:8:2]]
        assert s._core.stats.chunks_written == 4 and s._core.stats.write_failures == 0
        out = aligned_empty(LAYOUT.shape(4 * CHUNK), torch.bfloat16)
        assert s.get(toks, out=out).tokens == 4 * CHUNK
        assert same_bytes(out, kv)
    assert len(_leftovers(root)) == 4 and all(p.endswith(".kvb") for p in _leftovers(root))  # what the check sees


@pytest.mark.parametrize("overlap", ["inline", "thread"])
@pytest.mark.parametrize("fault", ["transfer", "disk full"])
def test_a_failure_mid_stream_publishes_nothing_and_leaves_nothing(root, monkeypatch, overlap, fault):
    """Chunk 2's request fails (or its file cannot be preallocated) after chunks 0 and 1 are
    already on their way: the put raises, names the cause, waits for what it posted, and
    leaves neither a block nor a temporary; the same put then succeeds."""
    kv = make_kv(LAYOUT, torch.bfloat16, 4 * CHUNK, seed=6)
    toks = np.arange(100, 100 + 4 * CHUNK)
    with KVStore(root, NS, chunk_tokens=CHUNK, backend="POSIX", direct_io=True, pipeline_kib=1,
                 hash_overlap=overlap) as s:
        posted: list[int] = []
        if fault == "transfer":
            def hook(op, descs):
                posted.append(len(descs))
                if len(posted) == 3:
                    raise TransferError("NIXL WRITE failed: injected EIO")
            s.agent.fault_hook = hook
            with pytest.raises(TransferError, match="injected EIO"):
                s.put(toks, kv)
        else:
            calls: list[int] = []
            orig = writer._preallocate

            def prealloc(fd, size):
                calls.append(fd)
                if len(calls) == 3:
                    raise OSError(errno.ENOSPC, "No space left on device")
                orig(fd, size)
            monkeypatch.setattr(writer, "_preallocate", prealloc)
            s.agent.fault_hook = lambda op, descs: posted.append(len(descs))
            with pytest.raises(StoreRootError, match="put failed, nothing published: no space left"):
                s.put(toks, kv)
            monkeypatch.setattr(writer, "_preallocate", orig)
        assert len(posted) >= 2  # chunks 0 and 1 were in flight when it failed
        s.agent.fault_hook = None
        assert _leftovers(root) == []
        assert s.lookup(toks) == 0 and s._core.stats.write_failures == 1
        assert s.put(toks, kv) == 4 * CHUNK
        assert same_bytes(s.get(toks).kv, kv)


def test_dram_rows_put_each_header_before_its_own_payload():
    """Headers of files 5, 9, 3 and their payload rows (two per file, file 3's merged by
    coalescing) come out file by file, each header first, payload rows in their order (what
    O_DIRECT writes want); by default every header comes first (what reads keep)."""
    hm = np.array([[0, 4096, 0], [4096, 4096, 0], [8192, 4096, 0]], dtype=np.uint64)
    hf = np.array([[0, 4096, 5], [0, 4096, 9], [0, 4096, 3]], dtype=np.uint64)
    pm = np.array([[1 << 20, 8192, 0], [3 << 20, 8192, 0], [5 << 20, 8192, 0],
                   [7 << 20, 8192, 0], [9 << 20, 8192, 0], [(9 << 20) + 8192, 8192, 0]], dtype=np.uint64)
    pf = np.array([[4096, 8192, 5], [12288, 8192, 5], [4096, 8192, 9],
                   [12288, 8192, 9], [4096, 8192, 3], [12288, 8192, 3]], dtype=np.uint64)
    m, f = planning.dram_rows(hm, hf, pm, pf, by_file=True)
    assert [(int(o), int(n), int(fd)) for o, n, fd in f] == [
        (0, 4096, 5), (4096, 8192, 5), (12288, 8192, 5),
        (0, 4096, 9), (4096, 8192, 9), (12288, 8192, 9),
        (0, 4096, 3), (4096, 16384, 3)]
    assert [int(a) for a in m[:, 0]] == [0, 1 << 20, 3 << 20, 4096, 5 << 20, 7 << 20, 8192, 9 << 20]
    only_payload = planning.dram_rows(hm[:0], hf[:0], pm, pf, by_file=True)
    assert only_payload[1][:, 2].tolist() == [5, 5, 9, 9, 3]
    _, headers_first = planning.dram_rows(hm, hf, pm, pf)  # reads: every header, then the payloads
    assert headers_first[:, 2].tolist() == [5, 9, 3, 5, 5, 9, 9, 3]
