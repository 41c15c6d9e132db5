"""Security properties of a shared root: no path escape, file modes, tenant isolation, and block
headers that lie about their size or shape."""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import same_bytes

from vua_nixl import KVLayout, KVStore, Namespace
from vua_nixl.audit import verify
from vua_nixl.errors import CorruptBlockError
from vua_nixl.format import _PREFIX, FORMAT_VERSION, MAGIC, read_header_file
from vua_nixl.lifecycle import Lifecycle

C = 16
LAYOUT = KVLayout(num_layers=2, kv_heads=2, head_dim=8)


def kv(tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(LAYOUT.shape(tokens), generator=torch.Generator().manual_seed(seed))


def all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_request_content_cannot_choose_a_path(tmp_path):
    root = tmp_path / "store"
    ns = Namespace(model="../../../../etc/passwd", dtype="float32", layout=LAYOUT, revision="/abs/../x")
    # token ids whose int64 bytes spell "../../x", plus the extremes of the id range
    evil = np.frombuffer(b"../../x\0" * C, dtype="<i8")[:C].copy()
    tokens = np.concatenate([evil, np.full(C, np.iinfo(np.int64).max), np.zeros(C, dtype=np.int64)])
    with KVStore(root, ns, chunk_tokens=C, backend="POSIX") as s:
        expected = kv(3 * C)
        assert s.put(tokens, expected) == 3 * C
        assert same_bytes(s.get(tokens).kv, expected)
        pattern = re.compile(rf"^{re.escape(str(root.resolve()))}/ns/[0-9a-f]{{32}}/[0-9a-f]{{2}}/[0-9a-f]{{2}}/[0-9a-f]{{32}}\.kvb$")
        for key in s.keys_for(tokens):
            p = os.path.realpath(s.block_path(key))
            assert pattern.match(p), p
    names = {p.relative_to(root).parts[0] for p in all_files(root)}
    assert names <= {"MANIFEST.json", "ns", "tmp", "quarantine", "access"}
    assert not any("passwd" in str(p) or ".." in p.parts for p in all_files(root))


@pytest.mark.parametrize("mode", [0o600, 0o640])
def test_block_and_access_log_files_get_the_configured_mode(tmp_path, mode):
    old = os.umask(0o022)
    try:
        root = tmp_path / f"store{mode:o}"
        ns = Namespace(model="m", dtype="float32", layout=LAYOUT)
        lc = Lifecycle(root, metrics=False)
        with KVStore(root, ns, chunk_tokens=C, backend="POSIX", file_mode=mode, observers=lc.observers()) as s:
            t = np.arange(2 * C)
            s.put(t, kv(2 * C))
            s.get(t)
            lc.recorder.flush()
            for key in s.keys_for(t):
                assert stat.S_IMODE(os.stat(s.block_path(key)).st_mode) == mode
            logs = list((root / "access").glob("*.log"))
            assert logs and all(stat.S_IMODE(p.stat().st_mode) == mode for p in logs)
    finally:
        os.umask(old)


def test_tenant_salt_makes_prefixes_unfindable_and_unloadable(tmp_path):
    root = tmp_path / "store"
    secret = "tenant-A-secret-salt-7f3a"
    a_ns = Namespace(model="shared/model", dtype="float32", layout=LAYOUT, tenant=secret)
    b_ns = Namespace(model="shared/model", dtype="float32", layout=LAYOUT, tenant="tenant-B")
    t = np.arange(100, 100 + 3 * C)
    with KVStore(root, a_ns, chunk_tokens=C, backend="POSIX") as a, KVStore(root, b_ns, chunk_tokens=C, backend="POSIX") as b:
        expected = kv(3 * C, seed=5)
        a.put(t, expected)
        assert a.fp_hex != b.fp_hex and set(a.keys_for(t)).isdisjoint(b.keys_for(t))
        assert b.lookup(t) == 0 and b.get(t) == (0, None)
        # B learns A's file names and copies A's blocks to where B would look for the same tokens
        for ka, kb in zip(a.keys_for(t), b.keys_for(t)):
            os.makedirs(os.path.dirname(b.block_path(kb)), exist_ok=True)
            shutil.copy(a.block_path(ka), b.block_path(kb))
        assert b.lookup(t) == 3 * C  # the files exist with the right size...
        assert b.get(t) == (0, None)  # ...but never load: their headers name A's namespace and keys
        assert b.stats()["corrupt"] == 1
        assert same_bytes(a.get(t).kv, expected)  # A is unaffected
    # the salt is never written in clear anywhere under the root
    for p in all_files(root):
        assert secret.encode() not in p.read_bytes(), p
        assert secret not in str(p)


def _lying_block(store: KVStore, tokens: np.ndarray, index: int, lies: dict) -> str:
    """Write a block for chunk ``index`` with a self-consistent header that lies in ``lies``."""
    keys = store.keys_for(tokens)
    exp = store.expected_block(index, tokens)
    header = exp.make_header(checksum=0)
    fields = header.to_fields()
    fields.update(lies)
    import msgpack
    import xxhash

    body = msgpack.packb(fields, use_bin_type=True)
    raw = (_PREFIX.pack(MAGIC, FORMAT_VERSION, len(body), xxhash.xxh3_64_intdigest(body), 0) + body).ljust(
        store.file_bytes, b"\0")
    path = store.block_path(keys[index])
    with open(path, "wb") as f:
        f.write(raw)
    return path


@pytest.mark.parametrize("lie", [
    {"shape": [1 << 40, 2, 1 << 20, 2, 8]},  # ~2^66 elements if anyone believed it
    {"len": 1 << 50},
    {"off": 1 << 45},
    {"dtype": "float64", "shape": [2, 2, 1 << 30, 2, 8]},
    {"tokens": b"\0" * 8 * (C + 1)},  # more tokens than the chunk holds
])
def test_header_that_lies_about_size_or_shape_is_rejected_without_allocating(tmp_path, lie):
    root = tmp_path / "store"
    ns = Namespace(model="m", dtype="float32", layout=LAYOUT)
    t = np.arange(3 * C)
    with KVStore(root, ns, chunk_tokens=C, backend="POSIX") as s:
        expected = kv(3 * C, seed=9)
        s.put(t, expected)
        path = _lying_block(s, t, 1, lie)
        assert os.path.getsize(path) == s.file_bytes  # passes the size check at open
        res = s.get(t)  # an allocation of the lied size would raise (it is terabytes): none happens
        assert res.tokens == C and same_bytes(res.kv, expected[:, :, :C])
        assert s.stats()["corrupt"] == 1 and not os.path.exists(path)
    checked, bad = verify(root)
    assert (checked, bad) == (2, [])


def test_header_length_field_larger_than_the_file_is_refused_before_reading(tmp_path):
    p = tmp_path / "liar.kvb"
    p.write_bytes(_PREFIX.pack(MAGIC, FORMAT_VERSION, 0xFFFFFFFF, 0, 0) + b"\0" * 64)
    with pytest.raises(CorruptBlockError, match="header length 4294967295 exceeds the maximum"):
        read_header_file(str(p))
    p.write_bytes(_PREFIX.pack(MAGIC, FORMAT_VERSION, 500_000, 0, 0) + b"\0" * 64)
    with pytest.raises(CorruptBlockError, match="header length 500000 exceeds the header area of 64 bytes"):
        read_header_file(str(p))
