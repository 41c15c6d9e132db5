"""KVStore behaviour with the real NIXL POSIX agent: exact bytes, strict prefixes, no bad hits."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CHUNK, LAYOUT, make_kv, same_bytes

from vua_nixl import (
    BackendUnavailableError,
    InvalidInputError,
    KVLayout,
    KVStore,
    LayoutMismatchError,
    Namespace,
    StoreRootError,
)
from vua_nixl.dtypes import DTYPES
from vua_nixl.format import PREFIX_BYTES, payload_offset

TOKENS = torch.arange(1000, 1000 + 5 * CHUNK + 7)  # 5 full chunks and a tail


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_round_trip_every_dtype(root, dtype):
    ns = Namespace("m", dtype, LAYOUT)
    kv = make_kv(LAYOUT, DTYPES[dtype], len(TOKENS), seed=hash(dtype) % 1000)
    with KVStore(root, ns, chunk_tokens=CHUNK, backend="POSIX") as s:
        assert s.put(TOKENS, kv) == 5 * CHUNK
        assert s.lookup(TOKENS) == 5 * CHUNK
        res = s.get(TOKENS)
        assert res.tokens == 5 * CHUNK
        assert same_bytes(res.kv, kv[:, :, : 5 * CHUNK])


def test_round_trip_list_of_layers_forms(store):
    kv = make_kv(LAYOUT, torch.bfloat16, len(TOKENS), seed=3)
    hf = [[kv[i, 0].transpose(0, 1).unsqueeze(0), kv[i, 1].transpose(0, 1).unsqueeze(0)] for i in range(3)]
    tokens_first = [(kv[i, 0], kv[i, 1]) for i in range(3)]
    for form in (hf, tokens_first):
        store.delete(TOKENS)
        assert store.put(TOKENS, form) == 5 * CHUNK
        assert same_bytes(store.get(TOKENS).kv, kv[:, :, : 5 * CHUNK])


def test_round_trip_mla(root):
    layout = KVLayout(num_layers=4, kv_heads=1, head_dim=40, mla=True)
    ns = Namespace("deepseek-like", "fp8", layout)
    kv = make_kv(layout, torch.float8_e4m3fn, 3 * CHUNK, seed=9)
    with KVStore(root, ns, chunk_tokens=CHUNK, backend="POSIX") as s:
        s.put(torch.arange(3 * CHUNK), kv)
        assert same_bytes(s.get(torch.arange(3 * CHUNK)).kv, kv)
        as_list = [kv[i] for i in range(4)]
        s.delete(torch.arange(3 * CHUNK))
        s.put(torch.arange(3 * CHUNK), as_list)
        assert same_bytes(s.get(torch.arange(3 * CHUNK)).kv, kv)


@pytest.mark.parametrize("layout, dtype", [(LAYOUT, "bfloat16"), (KVLayout(num_layers=4, kv_heads=1, head_dim=40, mla=True), "fp8"),
                                           (KVLayout(num_layers=2, kv_heads=4, head_dim=8), "float32")])
@pytest.mark.parametrize("lanes, pipeline_kib", [(1, 1), (2, 1), (1, None)])
def test_staged_and_in_place_reads_return_the_same_bytes(tmp_path, layout, dtype, lanes, pipeline_kib):
    """Whole files staged in a lane's slab then copied into place, or segments read straight
    into place: the same KV for get(), get(out=) and a get_many of several prefixes, every
    layout and element size (numpy copies bfloat16 and fp8 as integers of their width). One
    file per sub-batch, or every prefix in one sub-batch (runs of chunks copied at once, a run
    ending where its prefix does)."""
    ns = Namespace("staged/model", dtype, layout)
    dtype_of = {"bfloat16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "float32": torch.float32}
    seqs = [torch.arange(i * 10_000, i * 10_000 + (3 + i) * CHUNK) for i in range(3)]
    kvs = [make_kv(layout, dtype_of[dtype], len(t), seed=30 + i) for i, t in enumerate(seqs)]
    got: dict[int, list[torch.Tensor]] = {}
    for stage in (0, 1 << 20):
        with KVStore(tmp_path / f"s{stage}", ns, chunk_tokens=CHUNK, backend="POSIX", stage_max_kib=stage,
                     io_lanes=lanes, pipeline_kib=pipeline_kib) as s:
            s.put_many(list(zip(seqs, kvs)))
            outs = [torch.zeros(layout.shape(len(t) + CHUNK), dtype=dtype_of[dtype]) for t in seqs]
            res = s.get_many(seqs, outs=outs)
            assert [r.tokens for r in res] == [len(t) for t in seqs]
            got[stage] = [r.kv.clone() for r in res] + [s.get(seqs[1]).kv]
    for a, b, want in zip(got[0], got[1 << 20], [*kvs, kvs[1]]):
        assert same_bytes(a, want) and same_bytes(b, want)


@pytest.mark.parametrize("pipeline_kib", [1, None])
def test_staged_reads_into_strided_views_of_a_larger_buffer(tmp_path, pipeline_kib):
    """get(out=) into a slice of a bigger cache (tokens at an offset, every other layer): staged
    chunks land at exactly the view's places, and not one byte around them changes."""
    ns = Namespace("staged/views", "bfloat16", LAYOUT)
    kv = make_kv(LAYOUT, torch.bfloat16, len(TOKENS), seed=47)
    with KVStore(tmp_path / "s", ns, chunk_tokens=CHUNK, backend="POSIX", pipeline_kib=pipeline_kib) as s:
        assert s.config.stage_max_kib << 10 >= s.file_bytes and s.put(TOKENS, kv) == 5 * CHUNK
        big = torch.full((2 * LAYOUT.num_layers, 2, 7 * CHUNK + 3, LAYOUT.kv_heads, LAYOUT.head_dim), 5.0,
                         dtype=torch.bfloat16)
        sentinel = big.clone()
        out = big[::2, :, 3 : 3 + 5 * CHUNK + 2]  # strided layers, offset tokens, not a chunk multiple
        assert not out.is_contiguous()
        assert s.get(TOKENS, out=out).tokens == 5 * CHUNK
        assert same_bytes(out[:, :, : 5 * CHUNK], kv[:, :, : 5 * CHUNK])
        mask = torch.ones(big.shape, dtype=torch.bool)
        mask[::2, :, 3 : 3 + 5 * CHUNK] = False
        assert torch.equal(big.view(torch.int16)[mask], sentinel.view(torch.int16)[mask])


@pytest.mark.parametrize("tenant", [None, "acme"])
@pytest.mark.parametrize("writer_stage, reader_stage", [(1 << 20, 0), (0, 1 << 20)])
def test_staged_and_in_place_writes_make_the_same_files(tmp_path, tenant, writer_stage, reader_stage):
    """A file written staged (gathered into a slab, one descriptor) is the file an in-place
    write makes: same payload bytes, same digest, a tenant MAC the other path accepts."""
    from dataclasses import replace

    from vua_nixl.format import checksum, read_header_file

    ns = replace(Namespace("staged/model", "bfloat16", LAYOUT), tenant=tenant)
    kv = make_kv(LAYOUT, torch.bfloat16, len(TOKENS), seed=41)
    payloads = {}
    for stage in (0, 1 << 20):
        with KVStore(tmp_path / f"w{stage}", ns, chunk_tokens=CHUNK, backend="POSIX", stage_max_kib=stage, io_lanes=2,
                     pipeline_kib=1) as s:
            assert s.put(TOKENS, kv) == 5 * CHUNK
            poff = payload_offset(CHUNK)
            for key in s.keys_for(TOKENS):
                data = Path(s.block_path(key)).read_bytes()
                assert read_header_file(s.block_path(key)).checksum == checksum([data[poff:]])
                payloads.setdefault(key, set()).add(data[poff:])
    assert len(payloads) == 5 and all(len(v) == 1 for v in payloads.values())  # byte-identical payloads
    root = tmp_path / "shared"
    with KVStore(root, ns, chunk_tokens=CHUNK, backend="POSIX", stage_max_kib=writer_stage) as w:
        w.put(TOKENS, kv)
    with KVStore(root, ns, chunk_tokens=CHUNK, backend="POSIX", stage_max_kib=reader_stage) as r:
        res = r.get(TOKENS)
        assert res.tokens == 5 * CHUNK and same_bytes(res.kv, kv[:, :, : 5 * CHUNK])
        assert r.stats()["corrupt"] == 0


def test_staged_transfers_never_register_the_callers_memory(store):
    """Staged puts and gets move bytes through the lanes' own slabs: the KV and the output
    buffer are only copied, never handed to NIXL (in place, both are registered)."""
    kv = make_kv(LAYOUT, torch.bfloat16, len(TOKENS), seed=44)
    out = torch.zeros(LAYOUT.shape(5 * CHUNK), dtype=torch.bfloat16)
    seen: list[int] = []
    real = store.agent.register_batch

    def spy(items):
        seen.extend(t.data_ptr() for t, _ in items)
        return real(items)

    store.agent.register_batch = spy
    assert store.put(TOKENS, kv) == 5 * CHUNK and store.get(TOKENS, out=out).tokens == 5 * CHUNK
    assert same_bytes(out, kv[:, :, : 5 * CHUNK])
    assert kv.data_ptr() not in seen and out.data_ptr() not in seen
    assert not {k[0] for k in store.agent.registered()} & {kv.data_ptr(), out.data_ptr()}


@pytest.mark.parametrize("lanes", [1, 2])
def test_a_failed_staged_write_publishes_nothing(root, ns, lanes):
    import threading

    from vua_nixl.errors import TransferError

    kv = make_kv(LAYOUT, torch.bfloat16, len(TOKENS), seed=42)
    with KVStore(root, ns, chunk_tokens=CHUNK, backend="POSIX", io_lanes=lanes, pipeline_kib=1) as s:
        assert s.config.stage_max_kib << 10 >= s.file_bytes
        writers: set[str] = set()

        def boom(op, descs):
            writers.add(threading.current_thread().name)
            if op == "WRITE" and len(writers) == lanes:  # the last lane to start fails
                raise TransferError("injected EIO")

        s.agent.fault_hook = boom
        with pytest.raises(TransferError, match="injected EIO"):
            s.put(TOKENS, kv)
        s.agent.fault_hook = None
        assert s.lookup(TOKENS) == 0 and list(s.paths.tmp.iterdir()) == []
        assert s.stats()["write_failures"] == 1 and s.get(TOKENS).tokens == 0


def test_get_into_caller_buffer(store):
    kv = make_kv(LAYOUT, torch.bfloat16, len(TOKENS), seed=4)
    store.put(TOKENS, kv)
    out = torch.zeros(LAYOUT.shape(8 * CHUNK), dtype=torch.bfloat16)
    res = store.get(TOKENS, out=out)
    assert res.tokens == 5 * CHUNK and res.kv.data_ptr() == out.data_ptr()
    assert same_bytes(out[:, :, : 5 * CHUNK], kv[:, :, : 5 * CHUNK])
    small = torch.zeros(LAYOUT.shape(2 * CHUNK + 3), dtype=torch.bfloat16)
    res = store.get(TOKENS, out=small)  # loads what fits, and says so
    assert res.tokens == 2 * CHUNK and same_bytes(small[:, :, : 2 * CHUNK], kv[:, :, : 2 * CHUNK])
    with pytest.raises(LayoutMismatchError, match="out dtype"):
        store.get(TOKENS, out=torch.zeros(LAYOUT.shape(CHUNK), dtype=torch.float16))


def test_batched_forms_share_prefixes(store):
    base = torch.arange(4 * CHUNK)
    other = torch.cat([base[: 2 * CHUNK], torch.arange(5000, 5000 + 2 * CHUNK)])
    kv_a = make_kv(LAYOUT, torch.bfloat16, 4 * CHUNK, seed=1)
    kv_b = kv_a.clone()
    kv_b[:, :, 2 * CHUNK :] = make_kv(LAYOUT, torch.bfloat16, 2 * CHUNK, seed=2)
    assert store.put_many([(base, kv_a), (other, kv_b)]) == [4 * CHUNK, 4 * CHUNK]
    assert store.stats()["chunks_written"] == 6  # the 2 shared chunks written once
    assert store.lookup_many([base, other, torch.arange(9000, 9000 + CHUNK)]) == [4 * CHUNK, 4 * CHUNK, 0]
    a, b, miss = store.get_many([base, other, torch.arange(9000, 9000 + CHUNK)])
    assert same_bytes(a.kv, kv_a) and same_bytes(b.kv, kv_b) and miss == (0, None)
    assert store.put(base, kv_a) == 4 * CHUNK and store.stats()["chunks_skipped"] >= 4


def test_partial_chunks_are_not_stored(store):
    kv = make_kv(LAYOUT, torch.bfloat16, CHUNK - 1)
    assert store.put(torch.arange(CHUNK - 1), kv) == 0
    assert store.get(torch.arange(CHUNK - 1)) == (0, None)


def test_hole_in_the_middle_returns_only_the_contiguous_prefix(store):
    kv = make_kv(LAYOUT, torch.bfloat16, len(TOKENS), seed=5)
    store.put(TOKENS, kv)
    keys = store.keys_for(TOKENS)
    os.unlink(store.block_path(keys[2]))
    fresh = KVStore(store.paths.root, store.namespace, chunk_tokens=CHUNK, agent=store.agent)
    assert fresh.lookup(TOKENS) == 2 * CHUNK
    res = fresh.get(TOKENS)
    assert res.tokens == 2 * CHUNK and same_bytes(res.kv, kv[:, :, : 2 * CHUNK])
    # refilling the hole restores the whole prefix
    store.put(TOKENS, kv)
    assert same_bytes(fresh.get(TOKENS).kv, kv[:, :, : 5 * CHUNK])


def _corrupt(path: str, how: str, other: str | None = None) -> None:
    if how == "truncate":
        os.truncate(path, os.path.getsize(path) - 100)
    elif how == "flip_payload":
        with open(path, "r+b") as f:
            f.seek(payload_offset(CHUNK) + 123)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x01]))
    elif how == "flip_header":
        with open(path, "r+b") as f:
            f.seek(PREFIX_BYTES + 20)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x80]))
    elif how == "swap":  # a valid block of another chunk planted under this name
        os.replace(other, path)
    elif how == "zero":
        with open(path, "r+b") as f:
            f.write(b"\0" * 64)


@pytest.mark.parametrize("how", ["truncate", "flip_payload", "flip_header", "swap", "zero"])
def test_corrupt_block_is_a_miss_never_wrong_data(store, how):
    kv = make_kv(LAYOUT, torch.bfloat16, len(TOKENS), seed=6)
    store.put(TOKENS, kv)
    keys = store.keys_for(TOKENS)
    _corrupt(store.block_path(keys[3]), how, other=store.block_path(keys[4]))
    fresh = KVStore(store.paths.root, store.namespace, chunk_tokens=CHUNK, agent=store.agent)
    res = fresh.get(TOKENS)
    assert res.tokens == 3 * CHUNK
    assert same_bytes(res.kv, kv[:, :, : 3 * CHUNK])
    assert fresh.stats()["corrupt"] == 1
    assert not os.path.exists(store.block_path(keys[3]))  # quarantined, so the next put can heal it
    assert len(os.listdir(store.paths.quarantine)) == 1
    store.put(TOKENS, kv)
    assert same_bytes(fresh.get(TOKENS).kv, kv[:, :, : 5 * CHUNK])


def test_wrong_namespace_file_planted_is_rejected(root):
    ns_a = Namespace("m", "bf16", LAYOUT)
    ns_b = Namespace("m", "bf16", LAYOUT, tenant="b")
    kv_a = make_kv(LAYOUT, torch.bfloat16, 2 * CHUNK, seed=7)
    toks = torch.arange(2 * CHUNK)
    with KVStore(root, ns_a, chunk_tokens=CHUNK, backend="POSIX") as a, KVStore(root, ns_b, chunk_tokens=CHUNK, agent=a.agent) as b:
        a.put(toks, kv_a)
        for ka, kb in zip(a.keys_for(toks), b.keys_for(toks)):
            os.makedirs(os.path.dirname(b.block_path(kb)), exist_ok=True)
            os.link(a.block_path(ka), b.block_path(kb))
        assert b.lookup(toks) == 2 * CHUNK  # files exist with the right size ...
        assert b.get(toks) == (0, None)  # ... but their headers name another namespace
        assert b.stats()["corrupt"] == 1


def test_namespaces_never_see_each_other(root):
    toks = torch.arange(3 * CHUNK)
    variants = [
        Namespace("m", "bf16", LAYOUT),
        Namespace("m", "fp16", LAYOUT),
        Namespace("m", "bf16", KVLayout(4, 2, 16)),
        Namespace("m", "bf16", LAYOUT, tp_size=2, tp_rank=1),
        Namespace("m", "bf16", LAYOUT, tenant="acme"),
        Namespace("other", "bf16", LAYOUT),
    ]
    stores = []
    first = KVStore(root, variants[0], chunk_tokens=CHUNK, backend="POSIX")
    first.put(toks, make_kv(LAYOUT, torch.bfloat16, 3 * CHUNK))
    for ns in variants[1:]:
        s = KVStore(root, ns, chunk_tokens=CHUNK, agent=first.agent)
        stores.append(s)
        assert s.lookup(toks) == 0 and s.get(toks) == (0, None)
    assert KVStore(root, variants[0], chunk_tokens=2 * CHUNK, agent=first.agent).lookup(toks) == 0
    first.close()


def test_restart_sees_everything(root, ns):
    kv = make_kv(LAYOUT, torch.bfloat16, 4 * CHUNK, seed=8)
    with KVStore(root, ns, chunk_tokens=CHUNK, backend="POSIX") as s:
        s.put(torch.arange(4 * CHUNK), kv)
    with KVStore(root, ns, chunk_tokens=CHUNK, backend="POSIX") as s2:
        assert same_bytes(s2.get(torch.arange(4 * CHUNK)).kv, kv)


def test_delete(store):
    kv = make_kv(LAYOUT, torch.bfloat16, len(TOKENS))
    store.put(TOKENS, kv)
    assert store.delete(TOKENS[: 2 * CHUNK]) == 2
    assert store.lookup(TOKENS) == 0
    assert store.delete(TOKENS) == 3


def test_block_file_layout(store):
    kv = make_kv(LAYOUT, torch.bfloat16, CHUNK)
    store.put(torch.arange(CHUNK), kv)
    (key,) = store.keys_for(torch.arange(CHUNK))
    path = Path(store.block_path(key))
    assert path.parent.name == key.hex()[2:4] and path.parent.parent.name == key.hex()[:2]
    assert path.stat().st_size == payload_offset(CHUNK) + kv.numel() * 2
    assert payload_offset(CHUNK) % 4096 == 0
    assert (store.paths.root / "MANIFEST.json").exists()
    assert list(store.paths.tmp.iterdir()) == []


# ---- bad input: a clear error and nothing written ---------------------------------------

def _nothing_written(store: KVStore) -> bool:
    return not any(store.paths.blocks(store.fp_hex)) and list(store.paths.tmp.iterdir()) == []


@pytest.mark.parametrize(
    "tokens, kv, err, msg",
    [
        (torch.arange(32), torch.zeros(3, 2, 32, 2), InvalidInputError, "must have 5 dims"),
        (torch.arange(31), torch.zeros(3, 2, 32, 2, 16, dtype=torch.bfloat16), InvalidInputError, "token count 31 does not match KV length 32"),
        (torch.arange(32), [[torch.zeros(32, 2, 16, dtype=torch.bfloat16)] * 2, [torch.zeros(32, 2, 8, dtype=torch.bfloat16)] * 2, [torch.zeros(32, 2, 16, dtype=torch.bfloat16)] * 2], InvalidInputError, "different shapes"),
        (torch.arange(32), torch.zeros(3, 2, 32, 2, 16, dtype=torch.float64), InvalidInputError, "unsupported dtype"),
        (torch.arange(32).float(), torch.zeros(3, 2, 32, 2, 16, dtype=torch.bfloat16), InvalidInputError, "tokens must be integers"),
        (torch.tensor([-1] * 32), torch.zeros(3, 2, 32, 2, 16, dtype=torch.bfloat16), InvalidInputError, "non-negative"),
        (torch.arange(32), torch.zeros(4, 2, 32, 2, 16, dtype=torch.bfloat16), LayoutMismatchError, "does not match the namespace layout"),
        (torch.arange(32), torch.zeros(3, 2, 32, 2, 16, dtype=torch.float16), LayoutMismatchError, "dtype float16 does not match"),
        (torch.arange(32), "kv", InvalidInputError, "must be a tensor or a list"),
        (torch.arange(32), [[torch.zeros(2, 2, 32, 16, dtype=torch.bfloat16)] * 2] * 3, InvalidInputError, "batch size 2"),
    ],
)
def test_bad_input_is_rejected_and_nothing_written(store, tokens, kv, err, msg):
    with pytest.raises(err, match=msg):
        store.put(tokens, kv)
    assert _nothing_written(store)


def test_root_that_is_a_file(tmp_path, ns):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreRootError, match="not a directory"):
        KVStore(f, ns, backend="POSIX")


def test_read_only_root(tmp_path, ns):
    import subprocess

    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        with pytest.raises(StoreRootError, match="cannot create store root .*Read-only file system"):
            KVStore(mnt / "store", ns, backend="POSIX")
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_incompatible_manifest(root, ns):
    KVStore(root, ns, backend="POSIX").close()
    (root / "MANIFEST.json").write_text('{"format": "vua-nixl", "format_version": 99}')
    with pytest.raises(StoreRootError, match="format version 99"):
        KVStore(root, ns, backend="POSIX")


def test_disk_full_mid_put_publishes_nothing(tiny_tmpfs, ns):
    with KVStore(tiny_tmpfs / "store", ns, chunk_tokens=CHUNK, backend="POSIX") as s:
        small = make_kv(LAYOUT, torch.bfloat16, CHUNK)
        s.put(torch.arange(CHUNK), small)
        big_tokens = torch.arange(10_000, 10_000 + 200 * CHUNK)  # ~2.4 MiB of blocks into 1 MiB
        with pytest.raises(StoreRootError, match="no space left"):
            s.put(big_tokens, make_kv(LAYOUT, torch.bfloat16, len(big_tokens)))
        assert s.lookup(big_tokens) == 0
        assert list(s.paths.tmp.iterdir()) == []
        assert same_bytes(s.get(torch.arange(CHUNK)).kv, small)  # what was there survives


def test_failed_transfer_never_becomes_a_hit(store):
    from vua_nixl.errors import TransferError

    kv = make_kv(LAYOUT, torch.bfloat16, 2 * CHUNK)

    def boom(op, descs):
        raise TransferError("injected EIO")

    store.agent.fault_hook = boom
    with pytest.raises(TransferError, match="injected EIO"):
        store.put(torch.arange(2 * CHUNK), kv)
    store.agent.fault_hook = None
    assert store.lookup(torch.arange(2 * CHUNK)) == 0 and list(store.paths.tmp.iterdir()) == []
    store.put(torch.arange(2 * CHUNK), kv)
    store.agent.fault_hook = boom
    assert store.get(torch.arange(2 * CHUNK)) == (0, None)  # read failure -> miss, not data
    store.agent.fault_hook = None


def test_explicit_backend_that_cannot_start_is_an_error(root, ns):
    if torch.cuda.is_available():
        pytest.skip("a GPU host may run GDS")
    with pytest.raises(BackendUnavailableError, match="NIXL backend GDS cannot start on this host .*no CUDA device"):
        KVStore(root, ns, backend="GDS")


def test_auto_backend_reports_why(root, ns):
    with KVStore(root, ns, backend="auto") as s:
        info = s.agent.info()
    assert info["backend"] == "POSIX"
    if not torch.cuda.is_available():
        assert {r["backend"] for r in info["rejected"]} >= {"GDS", "GDS_MT"}


def test_file_mode(root, ns):
    with KVStore(root, ns, chunk_tokens=CHUNK, backend="POSIX", file_mode=0o600) as s:
        s.put(torch.arange(CHUNK), make_kv(LAYOUT, torch.bfloat16, CHUNK))
        mode = os.stat(s.block_path(s.keys_for(torch.arange(CHUNK))[0])).st_mode & 0o777
        assert mode == 0o600


def _direct_ok(path: Path) -> bool:
    try:
        fd = os.open(path / ".d", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
        os.close(fd)
        os.unlink(path / ".d")
        return True
    except OSError:
        return False


def test_direct_io_round_trip_with_unaligned_buffers(root, ns):
    root.mkdir(parents=True)
    if not _direct_ok(root):
        pytest.skip("O_DIRECT not supported on this file system")
    chunk = 64  # 64 tokens x 2 heads x 16 dims x 2 bytes = 4 KiB segments
    toks = torch.arange(5 * chunk + 9)
    with KVStore(root, ns, chunk_tokens=chunk, backend="POSIX", direct_io=True) as s:
        kv = make_kv(LAYOUT, torch.bfloat16, len(toks) + 1, seed=11)[:, :, 1:]  # unaligned strides
        s.put(toks, kv)
        assert same_bytes(s.get(toks).kv, kv[:, :, : 5 * chunk])
        out = torch.zeros(LAYOUT.shape(6 * chunk + 1), dtype=torch.bfloat16)[:, :, 1:]  # unaligned out
        assert s.get(toks, out=out).tokens == 5 * chunk
        assert same_bytes(out[:, :, : 5 * chunk], kv[:, :, : 5 * chunk])
    with pytest.raises(InvalidInputError, match="direct_io needs chunk segments that are multiples of 4096 bytes"):
        KVStore(root, ns, chunk_tokens=CHUNK, backend="POSIX", direct_io=True)


def test_get_many_with_many_caller_buffers(store):
    """Registration caching must never drop buffers of the batch in flight (regression)."""
    seqs = [torch.arange(i * 1000, i * 1000 + CHUNK) for i in range(20)]
    kvs = [make_kv(LAYOUT, torch.bfloat16, CHUNK, seed=i) for i in range(20)]
    store.put_many(list(zip(seqs, kvs)))
    outs = [torch.empty(LAYOUT.shape(CHUNK), dtype=torch.bfloat16) for _ in seqs]
    for _ in range(2):
        res = store.get_many(seqs, outs=outs)
        assert [r.tokens for r in res] == [CHUNK] * 20
        assert all(same_bytes(o, kv) for o, kv in zip(outs, kvs))
    res = store.get_many(seqs)  # store-allocated outputs are not kept registered
    assert all(same_bytes(r.kv, kv) for r, kv in zip(res, kvs))
    res_ptrs = {r.kv.untyped_storage().data_ptr() for r in res}
    assert not res_ptrs & {k[0] for k in store.agent.registered()}


@pytest.mark.parametrize("path, fault, expect, errors", [
    ("in_place", "bitflip", 3, 0), ("in_place", "eio_once", 5, 1), ("in_place", "eio_persistent", 0, 1),
    # staged: each sub-batch reads, verifies and keeps its chunks before the next one fails
    ("staged", "bitflip", 3, 0), ("staged", "eio_once", 5, 1), ("staged", "eio_persistent", 2, 3),
])
def test_pipelined_reads_keep_strict_prefixes(root, ns, monkeypatch, path, fault, expect, errors):
    import vua_nixl.store.planning as store_mod
    from vua_nixl.errors import TransferError

    monkeypatch.setattr(store_mod, "PIPELINE_BYTES", 1)  # one chunk per sub-batch: fully pipelined
    monkeypatch.setattr(store_mod, "STAGE_BYTES", 1)
    staged = 1 << 20 if path == "staged" else 0
    with KVStore(root, ns, chunk_tokens=CHUNK, backend="POSIX", io_lanes=1, stage_max_kib=staged) as store:
        kv = make_kv(LAYOUT, torch.bfloat16, len(TOKENS), seed=12)
        store.put(TOKENS, kv)
        assert same_bytes(store.get(TOKENS).kv, kv[:, :, : 5 * CHUNK])
        reads = []

        def eio(op, descs):
            reads.append(op)
            if op == "READ" and (len(reads) == 3 or (fault == "eio_persistent" and len(reads) > 3)):
                raise TransferError("injected EIO")

        if fault == "bitflip":
            _corrupt(store.block_path(store.keys_for(TOKENS)[3]), "flip_payload")
        else:
            store.agent.fault_hook = eio  # the 3rd sub-batch fails; it is retried chunk by chunk
        res = store.get(TOKENS)
        store.agent.fault_hook = None
        assert res.tokens == expect * CHUNK
        if expect:
            assert same_bytes(res.kv, kv[:, :, : res.tokens])
        assert store.stats()["io_errors"] == errors
        assert store.stats()["corrupt"] == (1 if fault == "bitflip" else 0)  # a failed read blames no file


def test_put_from_a_strided_view_without_copying(store):
    """A paged cache's consecutive blocks are a view strided across layers and K/V."""
    cache = make_kv(LAYOUT, torch.bfloat16, 8 * CHUNK, seed=13)  # [L, 2, 8 chunks, H, D]
    view = cache[:, :, 2 * CHUNK : 5 * CHUNK]  # not contiguous, but contiguous from tokens inward
    assert not view.is_contiguous()
    from vua_nixl.kvlayout import to_canonical

    assert to_canonical(view, LAYOUT, "bfloat16", 3 * CHUNK).data_ptr() == view.data_ptr()  # no copy
    toks = torch.arange(3 * CHUNK)
    store.put(toks, view)
    assert same_bytes(store.get(toks).kv, view)


def test_inner_contiguity_is_torchs_own_rule():
    """The check that decides copy-or-not compares strides with torch's contiguous strides
    exactly (size-1 and empty dimensions included), over random views."""
    import random

    from vua_nixl.kvlayout import inner_contiguous

    def reference(t: torch.Tensor, tdim: int) -> bool:
        dense = torch.empty(t.shape[tdim:], device="meta").stride()
        return list(t.stride()[tdim:]) == list(dense) and all(s > 0 for s in t.stride()[:tdim])

    rng = random.Random(7)
    seen = {True: 0, False: 0}
    for _ in range(3000):
        shape = [rng.choice([0, 1, 2, 3]) for _ in range(rng.randint(1, 5))]
        base = torch.empty([2 * x + 1 for x in shape])
        view = base[tuple(slice(0, x * rng.choice([1, 2]), rng.choice([1, 1, 2])) for x in shape)]
        if view.ndim > 1 and rng.random() < 0.3:
            view = view.transpose(0, view.ndim - 1)
        tdim = rng.randrange(view.ndim)
        want = reference(view, tdim)
        assert inner_contiguous(view, tdim) is want, (tuple(view.shape), view.stride(), tdim)
        seen[want] += 1
    assert min(seen.values()) > 300  # both answers were exercised


def test_puts_and_gets_spanning_several_transfer_batches(store, monkeypatch):
    import vua_nixl.store.planning as store_mod

    monkeypatch.setattr(store_mod, "MAX_FILES_PER_TRANSFER", 2)  # 5 chunks -> 3 write and 3 read batches
    kv = make_kv(LAYOUT, torch.bfloat16, len(TOKENS), seed=14)
    assert store.put(TOKENS, kv) == 5 * CHUNK
    assert store.stats()["chunks_written"] == 5
    assert same_bytes(store.get(TOKENS).kv, kv[:, :, : 5 * CHUNK])


@pytest.mark.parametrize("mode", ["thread", "inline", "lanes2", "lanes3"])
def test_hash_overlap_and_io_lanes_write_verify_and_reject_alike(root, ns, monkeypatch, mode):
    """Checksums on a helper thread, in line, or spread with the I/O over 2-3 NIXL agents on
    their own threads: the same header digests, the same bytes back, the same corrupt-block
    cut, nothing published on a failed write, the same fault hook seen by every lane."""
    import threading

    import vua_nixl.store.planning as store_mod
    from vua_nixl.errors import TransferError
    from vua_nixl.format import checksum, read_header_file

    monkeypatch.setattr(store_mod, "PIPELINE_BYTES", 1)  # one chunk per sub-batch
    monkeypatch.setenv("VUA_NIXL_STAGE_MAX_KIB", "0")  # reads in place (the helper thread is theirs)
    lanes = int(mode[-1]) if mode.startswith("lanes") else 1
    opts = {"io_lanes": lanes} if lanes > 1 else {"io_lanes": 1, "hash_overlap": mode}
    kv = make_kv(LAYOUT, torch.bfloat16, len(TOKENS), seed=21)
    seen: list[tuple[str, str]] = []
    with KVStore(root, ns, chunk_tokens=CHUNK, backend="POSIX", **opts) as s:
        s.agent.fault_hook = lambda op, descs: seen.append((op, threading.current_thread().name))
        assert s.put(TOKENS, kv) == 5 * CHUNK
        keys = s.keys_for(TOKENS)
        poff = payload_offset(CHUNK)
        for key in keys:
            path = s.block_path(key)
            payload = Path(path).read_bytes()[poff:]
            assert read_header_file(path).checksum == checksum([payload])
        assert same_bytes(s.get(TOKENS).kv, kv[:, :, : 5 * CHUNK])
        helpers = (s._writer._hasher, s._reader._verifier)  # the helper threads exist only if used
        assert all((h is not None) == (mode == "thread") for h in helpers)
        lane_ops = {op for op, thread in seen if thread.startswith("vua-nixl-lane")}
        assert lane_ops == ({"READ", "WRITE"} if lanes > 1 else set())  # the other lanes moved bytes too
        assert len(s._core._lanes) == lanes - 1
        _corrupt(s.block_path(keys[2]), "flip_payload")
        res = s.get(TOKENS)
        assert res.tokens == 2 * CHUNK and same_bytes(res.kv, kv[:, :, : 2 * CHUNK])
        assert s.stats()["corrupt"] == 1

        def boom(op, descs):
            if op == "WRITE" and threading.current_thread().name.startswith("vua-nixl-lane" if lanes > 1 else ""):
                raise TransferError("injected EIO")

        s.agent.fault_hook = boom
        other = torch.arange(50_000, 50_000 + 3 * CHUNK)
        with pytest.raises(TransferError, match="injected EIO"):
            s.put(other, kv[:, :, : 3 * CHUNK])
        s.agent.fault_hook = None
        assert s.lookup(other) == 0 and list(s.paths.tmp.iterdir()) == []
        lane_agents = list(s._core._lanes)
    assert all(a._closed for a in lane_agents)  # the store closes the agents it made


def test_auto_lanes_and_hash_thread_follow_the_free_cpus(root, ns):
    from vua_nixl.store import core as core_mod

    class Gauge:
        value = 0.3

        def free(self) -> float:
            return self.value

    gauge = Gauge()
    with KVStore(root, ns, chunk_tokens=CHUNK, backend="POSIX") as s:
        s._core.cpus = gauge  # type: ignore[assignment]
        assert s.config.hash_overlap == "auto" and s.config.io_lanes == 0
        assert not s._core.hash_in_thread() and s._core.lanes("DRAM") == [s.agent]  # a busy host
        gauge.value = 1.4
        assert not s._core.hash_in_thread() and s._core.lanes("DRAM") == [s.agent]  # one CPU free: ours
        gauge.value = 2.0
        lanes = s._core.lanes("DRAM")
        assert s._core.hash_in_thread() and len(lanes) == 2 and lanes[0] is s.agent
        gauge.value = 16.0
        lanes = s._core.lanes("DRAM")
        assert len(lanes) == core_mod.MAX_AUTO_LANES and len({id(a) for a in lanes}) == core_mod.MAX_AUTO_LANES
        assert s._core.lanes("VRAM") == [s.agent]  # GPU memory: one agent (GDS_MT has its own threads)
        assert s._core.lanes("DRAM")[:2] == lanes[:2]  # lanes are made once and kept


def test_free_cpus_counts_other_processes_not_this_one(tmp_path, monkeypatch):
    from vua_nixl.store import cpus

    stat = tmp_path / "stat"

    def write(busy0: int, busy1: int, busy7: int) -> None:  # ticks: user nice system idle iowait irq softirq steal
        stat.write_text(f"cpu  1 1 1 1 1 1 1 1 0 0\ncpu0 {busy0} 0 0 900 50 0 0 0 0 0\n"
                        f"cpu1 0 0 {busy1} 900 0 0 0 0 0 0\ncpu7 {busy7} 0 0 0 0 0 0 0 0 0\nintr 5\n")

    assert cpus.busy_seconds({0, 1}, str(stat)) is None  # no file yet
    write(100, 100, 10_000)
    assert cpus.busy_seconds({0, 1}, str(stat)) == 200 / cpus._TICK  # cpu7 is not ours; idle and iowait are free
    clock = {"mono": 1000.0, "ours": 5.0}
    monkeypatch.setattr(cpus.time, "monotonic", lambda: clock["mono"])
    monkeypatch.setattr(cpus.time, "process_time", lambda: clock["ours"])
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {0, 1})
    gauge = cpus.FreeCpus(period_s=0.5, stat_path=str(stat))
    assert gauge.free() == 2.0  # no interval measured yet: optimistic
    # 1 s later: the two CPUs were busy 1.5 CPU-seconds, 0.5 of them this process's own threads
    clock["mono"] += 1.0
    clock["ours"] += 0.5
    write(100 + int(0.75 * cpus._TICK), 100 + int(0.75 * cpus._TICK), 10_000)
    assert gauge.free() == pytest.approx(1.0)
    write(10**6, 10**6, 0)  # within the period the last measurement stands
    clock["mono"] += 0.1
    assert gauge.free() == pytest.approx(1.0)
    assert 0.0 <= cpus.FreeCpus().free() <= cpus.usable_cpus()  # the real /proc/stat


@pytest.mark.parametrize("direct, overlap", [(True, "inline"), (True, "thread"), (False, "inline")])
def test_read_pipeline_depth_o_direct_posts_every_batch_first(tmp_path, monkeypatch, direct, overlap):
    """O_DIRECT: every sub-batch is in flight before the first is verified (the device's queue
    stays full), verified in line or on a helper thread; page cache, one lane, checksums in
    line: one sub-batch ahead. Same bytes and the same strict prefix after a flipped byte."""
    import vua_nixl.store.planning as store_mod
    from vua_nixl.store.reader import BlockReader

    layout = KVLayout(num_layers=3, kv_heads=2, head_dim=64)  # 4 KiB segments at 16 tokens
    ns = Namespace(model="test/direct", dtype="bfloat16", layout=layout)
    monkeypatch.setattr(store_mod, "PIPELINE_BYTES", 1)
    monkeypatch.setenv("VUA_NIXL_STAGE_MAX_KIB", "0")  # the page-cache case: reads in place
    events: list[str] = []
    orig = BlockReader._check_range

    def check(self, jobs, lo, hi, *rest):
        events.append("verify")
        return orig(self, jobs, lo, hi, *rest)

    monkeypatch.setattr(BlockReader, "_check_range", check)
    kv = make_kv(layout, torch.bfloat16, len(TOKENS), seed=31)
    with KVStore(tmp_path / "s", ns, chunk_tokens=CHUNK, backend="POSIX", direct_io=direct, io_lanes=1,
                 hash_overlap=overlap) as s:
        s.put(TOKENS, kv)
        s.agent.fault_hook = lambda op, descs: events.append(op) if op == "READ" else None
        events.clear()
        assert same_bytes(s.get(TOKENS).kv, kv[:, :, : 5 * CHUNK])
        assert events[:6] == (["READ"] * 5 + ["verify"] if direct else ["READ", "READ", "verify", "READ", "verify", "READ"])
        assert events.count("READ") == 5 and events.count("verify") == 5
        # O_DIRECT with a free CPU: verification runs aside while this thread keeps polling
        assert (s._reader._verifier is not None) == (direct and overlap == "thread")
        with open(s.block_path(s.keys_for(TOKENS)[3]), "r+b") as f:
            f.seek(payload_offset(CHUNK) + 4000)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x10]))
        os.sync()  # O_DIRECT reads see the device: the flipped byte must be on it
        res = s.get(TOKENS)
        assert res.tokens == 3 * CHUNK and same_bytes(res.kv, kv[:, :, : 3 * CHUNK])


def test_usable_cpus_respect_the_cgroup_quota(tmp_path, monkeypatch):
    """A pod limited to 2 CPUs on a 64-CPU node must not start 4 lanes."""
    from vua_nixl.store import cpus

    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(64)))
    real = cpus.cgroup_cpu_limit
    v1 = tmp_path / "v1"
    v1.mkdir()
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda path=str(cpu_max): real(path, str(v1)))
    assert cpus.usable_cpus() == 64  # no file: no quota known
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus.usable_cpus() == 64  # cgroup v1, unlimited
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    assert cpus.usable_cpus() == 3  # cgroup v1, 3 CPUs
    cpu_max.write_text("max 100000\n")
    assert cpus.cgroup_cpu_limit(str(cpu_max)) is None and cpus.usable_cpus() == 64
    cpu_max.write_text("200000 100000\n")
    assert cpus.cgroup_cpu_limit(str(cpu_max)) == 2.0 and cpus.usable_cpus() == 2
    cpu_max.write_text("50000 100000\n")
    assert cpus.usable_cpus() == 1  # half a CPU: still one
    cpu_max.write_text("200000 100000\n")
    assert cpus.FreeCpus().free() == 2.0  # the optimistic first answer is capped too


def test_segments_sliced_from_a_cached_span_hash_like_fresh_views():
    """The cached whole-storage view gives the same bytes as per-call views, for strided,
    adjacent and mixed segment runs; a tensor at a new address gets a new view."""
    from vua_nixl.format import checksum
    from vua_nixl.store.planning import host_span, segments

    t = make_kv(LAYOUT, torch.bfloat16, 4 * CHUNK, seed=41)
    seg = CHUNK * LAYOUT.kv_heads * LAYOUT.head_dim * 2
    base = t.data_ptr()
    strided = np.array([base + i * 4 * seg for i in range(6)], dtype=np.uint64)
    adjacent = np.array([base + i * seg for i in range(6)], dtype=np.uint64)
    mixed = np.array([base, base + seg, base + 5 * seg, base + 9 * seg], dtype=np.uint64)
    for addrs in (strided, adjacent, mixed):
        fresh = b"".join(bytes(s) for s in segments(addrs, seg))
        cached = b"".join(bytes(s) for s in segments(addrs, seg, host_span(t)))
        assert fresh == cached and len(cached) == len(addrs) * seg
        assert checksum(segments(addrs, seg)) == checksum(segments(addrs, seg, host_span(t)))
    assert len(segments(adjacent, seg, host_span(t))) == 1  # one run: one buffer to hash
    other = t.clone()
    assert host_span(t)[1] is host_span(t)[1]  # cached
    assert host_span(other)[0] == other.data_ptr() and host_span(other)[1] is not host_span(t)[1]


def _agent_round_trip(agent, src: torch.Tensor, path: Path) -> torch.Tensor:
    """Write ``src`` to ``path`` and read it back through ``agent`` (both already registered)."""
    from vua_nixl.agent import aligned_empty

    dst = aligned_empty((src.numel(),), torch.uint8)
    tok = agent.register_tensor(dst, cache=False)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with agent.files([fd]):
            for op, t in (("WRITE", src), ("READ", dst)):
                agent.transfer(op, np.array([(t.data_ptr(), t.numel(), 0)], dtype=np.uint64),
                               np.array([(0, t.numel(), fd)], dtype=np.uint64))
    finally:
        os.close(fd)
        agent.release(tok)
    return dst


def test_registration_lives_until_its_last_holder_releases_it(store, tmp_path):
    """Two holders of one storage (two puts of one tensor at once): the first release must not
    deregister it under the second's transfer (regression: it used to)."""
    from vua_nixl.agent import aligned_empty

    agent = store.agent
    src = aligned_empty((1 << 16,), torch.uint8)
    src.copy_(torch.randint(0, 256, (1 << 16,), dtype=torch.uint8))
    key = (src.data_ptr(), src.numel(), "DRAM")
    first, second = agent.register_tensor(src, cache=False), agent.register_tensor(src, cache=False)
    agent.release(first)
    assert key in agent.registered()
    assert torch.equal(_agent_round_trip(agent, src, tmp_path / "f"), src)
    agent.release(second)
    assert key not in agent.registered()
    agent.release(second)  # a token given back twice changes nothing
    assert key not in agent.registered()


def test_cache_eviction_spares_registrations_in_use(store, tmp_path):
    """Cached registrations are evicted least recently used first, but never one a transfer in
    flight holds, however many other buffers are registered meanwhile."""
    from vua_nixl.agent import _REG_CACHE_ENTRIES, aligned_empty

    agent = store.agent
    held = aligned_empty((1 << 16,), torch.uint8)
    held.copy_(torch.randint(0, 256, (1 << 16,), dtype=torch.uint8))
    token = agent.register_tensor(held, cache=True)
    others = [aligned_empty((4096,), torch.uint8) for _ in range(3 * _REG_CACHE_ENTRIES)]
    for t in others:
        agent.release(agent.register_tensor(t, cache=True))
    live = agent.registered()
    assert token in live
    assert len([k for k in live if k != token]) <= _REG_CACHE_ENTRIES + 1  # + the store's own arenas
    assert (others[-1].data_ptr(), 4096, "DRAM") in live  # the most recent ones stay
    assert (others[0].data_ptr(), 4096, "DRAM") not in live
    assert torch.equal(_agent_round_trip(agent, held, tmp_path / "g"), held)
    agent.release(token)


def test_concurrent_puts_of_one_tensor(root):
    """Threads putting different prompts from one KV tensor at once all succeed, byte-exact."""
    import threading

    kv = make_kv(LAYOUT, torch.bfloat16, 4 * CHUNK, seed=21)
    errors: list[BaseException] = []
    with KVStore(root, Namespace("m", "bf16", LAYOUT), chunk_tokens=CHUNK, backend="POSIX", io_lanes=1) as s:
        def put(base: int) -> None:
            try:
                for r in range(15):
                    assert s.put(torch.arange(4 * CHUNK) + base + 10_000 * r, kv) == 4 * CHUNK
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=put, args=(1_000_000 * (i + 1),)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        for i in range(3):
            for r in (0, 14):
                assert same_bytes(s.get(torch.arange(4 * CHUNK) + 1_000_000 * (i + 1) + 10_000 * r).kv, kv)
