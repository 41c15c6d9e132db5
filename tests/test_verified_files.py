"""The verified-files cache (``verify_cache_s``): a hot prefix is not re-hashed on every load, and
nothing that changed since it was verified is ever trusted.

Real NIXL POSIX agent, real files; the digest function is wrapped only to count its calls.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from helpers import same_bytes

from vua_nixl import KVStore
from vua_nixl.store.reader import BlockReader
from vua_nixl.testing.chaos import CHUNK, expected_kv, namespace


@pytest.fixture(params=["staged", "in_place"], autouse=True)
def read_path(request, monkeypatch) -> str:
    """Both read paths: whole files staged in a lane's slab, or segments read straight into place."""
    if request.param == "in_place":
        monkeypatch.setenv("VUA_NIXL_STAGE_MAX_KIB", "0")
    return request.param


def _count_verdicts(monkeypatch) -> tuple[list[int], list[int]]:
    """Chunk indexes of every payload digest and every MAC a read computes from here on."""
    digests: list[int] = []
    macs: list[int] = []
    real = BlockReader._verdict

    def counted(self, plan, ci, raw_header, digest, mac_of):
        def d(alg):
            digests.append(ci)
            return digest(alg)

        def m(header):
            macs.append(ci)
            return mac_of(header)

        return real(self, plan, ci, raw_header, d, m)

    monkeypatch.setattr(BlockReader, "_verdict", counted)
    return digests, macs


@pytest.fixture
def digests(monkeypatch) -> list[int]:
    return _count_verdicts(monkeypatch)[0]


def stored(tmp_path, chunks: int = 4, **cfg) -> tuple[KVStore, np.ndarray, object]:
    s = KVStore(tmp_path / "store", namespace(), chunk_tokens=CHUNK, backend="POSIX", presence_ttl_s=0, **cfg)
    toks = np.arange(chunks * CHUNK, dtype=np.int64) + 7
    kv = expected_kv(s.keys_for(toks))
    assert s.put(toks, kv) == chunks * CHUNK
    return s, toks, kv


def test_a_hot_prefix_is_hashed_once_and_served_exactly(tmp_path, digests):
    s, toks, kv = stored(tmp_path, verify_cache_s=60)
    with s:
        digests.clear()
        for _ in range(3):
            res = s.get(toks)
            assert res.tokens == 4 * CHUNK and same_bytes(res.kv, kv)
        assert sorted(digests) == [0, 1, 2, 3]  # the first load only
        assert s.stats()["digests_skipped"] == 8


def test_off_by_default_every_load_is_hashed(tmp_path, digests):
    s, toks, kv = stored(tmp_path)
    with s:
        digests.clear()
        for _ in range(2):
            assert same_bytes(s.get(toks).kv, kv)
        assert len(digests) == 8 and s.stats()["digests_skipped"] == 0


def test_a_block_rewritten_in_place_after_verification_is_caught(tmp_path, digests):
    """A neighbour's write moves the file's ctime, so the cached verdict no longer applies."""
    s, toks, kv = stored(tmp_path, verify_cache_s=60)
    with s:
        assert same_bytes(s.get(toks).kv, kv)
        path = s.block_path(s.keys_for(toks)[2])
        time.sleep(0.02)  # past a coarse-timestamp tick, as any real later write is
        with open(path, "r+b") as f:  # same size, one payload bit
            f.seek(-1, os.SEEK_END)
            b = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([b[0] ^ 1]))
        digests.clear()
        res = s.get(toks)
        assert res.tokens == 2 * CHUNK and same_bytes(res.kv, kv[:, :, : 2 * CHUNK])
        assert digests == [2]  # chunks 0-1 trusted, chunk 2 hashed and refused
        assert s.stats()["corrupt"] == 1 and not os.path.exists(path)


def test_a_block_replaced_under_its_name_is_hashed_again(tmp_path, digests):
    """Deleted and put again (a new inode under the same name): nothing carries over."""
    s, toks, kv = stored(tmp_path, verify_cache_s=60)
    with s:
        assert same_bytes(s.get(toks).kv, kv)
        assert s.delete(toks) == 4 and s.put(toks, kv) == 4 * CHUNK
        digests.clear()
        assert same_bytes(s.get(toks).kv, kv)
        assert sorted(digests) == [0, 1, 2, 3]


def test_the_verdict_expires(tmp_path, digests):
    s, toks, kv = stored(tmp_path, chunks=2, verify_cache_s=0.05)
    with s:
        assert same_bytes(s.get(toks).kv, kv)
        time.sleep(0.1)
        digests.clear()
        assert same_bytes(s.get(toks).kv, kv)
        assert sorted(digests) == [0, 1]


def test_a_negative_lifetime_is_refused(tmp_path):
    with pytest.raises(Exception, match="verify_cache_s"):
        KVStore(tmp_path / "store", namespace(), chunk_tokens=CHUNK, backend="POSIX", verify_cache_s=-1)


def test_a_tenant_block_is_authenticated_on_every_load(tmp_path, monkeypatch):
    """The cache saves the integrity digest, never the MAC: authentication is not cached."""
    from dataclasses import replace

    digests, macs = _count_verdicts(monkeypatch)
    ns = replace(namespace(), tenant="acme")
    with KVStore(tmp_path / "store", ns, chunk_tokens=CHUNK, backend="POSIX", presence_ttl_s=0, verify_cache_s=60) as s:
        toks = np.arange(2 * CHUNK, dtype=np.int64)
        kv = expected_kv(s.keys_for(toks))
        s.put(toks, kv)
        digests.clear()
        macs.clear()
        for _ in range(3):
            assert same_bytes(s.get(toks).kv, kv)
        assert sorted(digests) == [0, 1] and sorted(macs) == [0, 0, 0, 1, 1, 1]
