"""VuaNixlHiCacheStorage driven by SGLang's own HiCacheController over real CPU pools."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sglang_harness as h
import torch

from dynamo_components.sglang.pagekeys import PSEUDO_TOKEN_FLAG, page_tokens

HERE = Path(__file__).parent


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def _block_files(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "ns", "*", "*", "*", "*.kvb")))


def _page_path(rig: h.Rig, key: str) -> str:
    store = rig.backend.store
    return store.block_path(store.keys_for(page_tokens(key, h.PAGE))[0])


# ---- the whole path, across processes ---------------------------------------------------------

def test_backup_then_prefetch_in_fresh_process_is_bit_identical(store_root, rigs):
    """Pages backed up by one process's controller are prefetched by a fresh process, every host layout."""
    for mla, seed in ((False, 1), (True, 2)):
        rig = rigs(store_root, mla=mla)
        assert type(rig.backend).__name__ == "VuaNixlHiCacheStorage"
        assert rig.cc.page_set_func.__name__ == "_page_set_zero_copy"  # interface_v1 honoured
        assert h.backup(rig, h.token_ids(seed, 4 * h.PAGE), h.expected_kv(seed, 4 * h.PAGE, mla)) == 4 * h.PAGE
    assert len(_block_files(store_root)) == 8  # 4 MHA + 4 MLA pages, one block file each

    layouts = {False: ["layer_first", "page_first", "page_first_direct", "page_head"],
               True: ["layer_first", "page_first", "page_first_direct"]}
    reads = [{"mla": mla, "layout": lay, "seed": 1 + mla, "tokens": 4 * h.PAGE} for mla in (False, True) for lay in layouts[mla]]
    job = Path(store_root).parent / "job.json"
    job.write_text(json.dumps({"root": store_root, "reads": reads}))
    proc = subprocess.run([sys.executable, str(HERE / "sglang_harness.py"), "read", str(job)], capture_output=True, text=True, timeout=120)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    results = json.loads(line[0][len("RESULT "):])
    assert len(results) == len(reads)
    for res in results:
        read = res["read"]
        assert (res["hit_tokens"], res["completed_tokens"]) == (4 * h.PAGE, 4 * h.PAGE), read
        assert res["equal"] is True, read
        assert res["digest"] == h.digest(h.expected_kv(read["seed"], read["tokens"], read["mla"])), read


def test_prefetch_in_process_returns_exact_values(store_root, rigs):
    tokens, kv = h.token_ids(3, 3 * h.PAGE), h.expected_kv(3, 3 * h.PAGE, False)
    assert h.backup(rigs(store_root), tokens, kv) == 3 * h.PAGE
    res = h.prefetch(rigs(store_root), tokens)
    assert (res["hit_tokens"], res["completed_tokens"]) == (3 * h.PAGE, 3 * h.PAGE)
    assert torch.equal(_bits(res["kv"]), _bits(kv))
    # a longer request: the stored prefix hits, the rest does not
    longer = tokens + h.token_ids(4, 2 * h.PAGE)
    assert h.prefetch(rigs(store_root), longer)["hit_tokens"] == 3 * h.PAGE


# ---- strict prefixes, corruption --------------------------------------------------------------

def test_missing_middle_page_stops_the_prefix(store_root, rigs):
    tokens, kv = h.token_ids(5, 4 * h.PAGE), h.expected_kv(5, 4 * h.PAGE, False)
    writer = rigs(store_root)
    assert h.backup(writer, tokens, kv) == 4 * h.PAGE
    keys = h.page_hashes(tokens)
    os.unlink(_page_path(writer, keys[1]))

    reader = rigs(store_root)
    assert reader.backend.batch_exists(keys) == 1
    assert reader.backend.batch_exists(keys[2:]) == 2  # pages after the hole are still there...
    res = h.prefetch(reader, tokens)
    assert (res["hit_tokens"], res["completed_tokens"]) == (h.PAGE, h.PAGE)  # ...but never used
    assert torch.equal(_bits(res["kv"]), _bits(kv[:, :, : h.PAGE]))


def test_corrupt_page_is_a_miss_and_is_quarantined(store_root, rigs):
    tokens, kv = h.token_ids(6, 4 * h.PAGE), h.expected_kv(6, 4 * h.PAGE, False)
    writer = rigs(store_root)
    assert h.backup(writer, tokens, kv) == 4 * h.PAGE
    keys = h.page_hashes(tokens)
    path = _page_path(writer, keys[2])
    with open(path, "r+b") as f:  # flip one payload byte (the size stays right: lookups still say present)
        f.seek(os.path.getsize(path) - 7)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x40]))

    reader = rigs(store_root)
    backend = reader.backend
    assert backend.batch_exists(keys) == 4
    host_indices = reader.host.alloc(4 * h.PAGE)
    assert backend.batch_get_v1(keys, host_indices) == [True, True, False, False]
    reader.host.free(host_indices)
    assert not os.path.exists(path)  # moved aside by the store
    assert backend.batch_exists(keys) == 2
    res = h.prefetch(reader, tokens)
    assert (res["hit_tokens"], res["completed_tokens"]) == (2 * h.PAGE, 2 * h.PAGE)
    assert torch.equal(_bits(res["kv"]), _bits(kv[:, :, : 2 * h.PAGE]))


# ---- namespaces -------------------------------------------------------------------------------

def _backend(root: str, host, *, tp_rank=0, tp_size=1, mla=False, model="test/tiny-model", **extra):
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    cfg = HiCacheStorageConfig(tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                               is_mla_model=mla, enable_storage_metrics=False, is_page_first_layout=False,
                               model_name=model, extra_config=h.extra_config(root, **extra))
    backend = StorageBackendFactory.create_backend("dynamic", cfg, host)
    backend.register_mem_pool_host(host)
    return backend


def test_tp_ranks_and_models_do_not_share_mha_pages(store_root, rigs):
    rig = rigs(None, storage="file", extra={})  # pools only; the backends below are made by SGLang's factory
    tokens, kv = h.token_ids(7, 2 * h.PAGE), h.expected_kv(7, 2 * h.PAGE, False)
    keys = h.page_hashes(tokens)
    idx = rig.host.alloc(2 * h.PAGE)
    for p in range(2):  # put the pages in the host pool the way SGLang lays them out (layer_first)
        rig.host.set_from_flat_data_page(int(idx[p * h.PAGE]), kv[:, :, p * h.PAGE : (p + 1) * h.PAGE].permute(1, 0, 2, 3, 4).flatten())
    rank0 = _backend(store_root, rig.host, tp_rank=0, tp_size=2)
    assert rank0.batch_set_v1(keys, idx) == [True, True]
    rank1 = _backend(store_root, rig.host, tp_rank=1, tp_size=2)
    other_model = _backend(store_root, rig.host, tp_rank=0, tp_size=2, model="test/other-model")
    tenant = _backend(store_root, rig.host, tp_rank=0, tp_size=2, tenant="acme")
    assert rank0.batch_exists(keys) == 2
    assert rank1.batch_exists(keys) == 0
    assert other_model.batch_exists(keys) == 0
    assert tenant.batch_exists(keys) == 0
    assert rank1.batch_get_v1(keys, idx) == [False, False]
    for b in (rank0, rank1, other_model, tenant):
        b.close()
    rig.host.free(idx)


def test_mla_pages_are_shared_by_tp_ranks_and_written_once(store_root, rigs):
    tokens, kv = h.token_ids(8, 2 * h.PAGE), h.expected_kv(8, 2 * h.PAGE, True)
    keys = h.page_hashes(tokens)
    rig = rigs(None, mla=True, storage="file", extra={})
    idx = rig.host.alloc(2 * h.PAGE)
    for p in range(2):
        rig.host.set_from_flat_data_page(int(idx[p * h.PAGE]), kv[:, p * h.PAGE : (p + 1) * h.PAGE].flatten())
    rank1 = _backend(store_root, rig.host, tp_rank=1, tp_size=2, mla=True)
    assert rank1.batch_set_v1(keys, idx) == [True, True]  # backup_skip: rank 1 does not write
    assert _block_files(store_root) == []
    rank0 = _backend(store_root, rig.host, tp_rank=0, tp_size=2, mla=True)
    assert rank0.batch_set_v1(keys, idx) == [True, True]
    assert len(_block_files(store_root)) == 2
    assert rank1.batch_exists(keys) == 2
    out = rig.host.alloc(2 * h.PAGE)
    assert rank1.batch_get_v1(keys, out) == [True, True]
    got = torch.cat([h.host_page_canonical(rig, int(out[p * h.PAGE])) for p in range(2)], dim=1)
    assert torch.equal(_bits(got), _bits(kv))
    rank0.close()
    rank1.close()


def test_fp8_kv_is_named_fp8_and_round_trips_bit_exact(store_root, rigs):
    """SGLang keeps fp8 KV in uint8 tensors; the store namespace must still say float8_e4m3fn."""
    rig = rigs(None, storage="file", extra={}, dtype=torch.float8_e4m3fn)
    assert rig.host.kv_buffer.dtype == torch.uint8
    idx = rig.host.alloc(2 * h.PAGE)
    g = torch.Generator().manual_seed(12)
    rig.host.kv_buffer.copy_(torch.randint(0, 256, rig.host.kv_buffer.shape, generator=g, dtype=torch.uint8))
    want = [rig.host.get_data_page(int(idx[p * h.PAGE]), flat=True).clone() for p in range(2)]
    keys = h.page_hashes(h.token_ids(12, 2 * h.PAGE))
    writer = _backend(store_root, rig.host, kv_dtype="fp8_e4m3")
    assert writer.store.namespace.dtype == "float8_e4m3fn"
    assert writer.batch_set_v1(keys, idx) == [True, True]
    out = rig.host.alloc(2 * h.PAGE)
    assert writer.batch_get_v1(keys, out) == [True, True]
    for p in range(2):
        assert torch.equal(rig.host.get_data_page(int(out[p * h.PAGE]), flat=True), want[p])
    writer.close()


# ---- data path --------------------------------------------------------------------------------

def test_zero_copy_layout_moves_pages_without_staging(store_root, rigs):
    """layer_first: the host pool is registered once; no bounce, no staging, no per-call registration."""
    rig = rigs(store_root)
    backend = rig.backend
    agent = backend.store.agent
    host_storage = rig.host.kv_buffer.untyped_storage().data_ptr()
    assert any(k[0] == host_storage for k in getattr(agent, "_regs", {}))
    warm = h.token_ids(11, h.PAGE)
    h.backup(rig, warm, h.expected_kv(11, h.PAGE, False))
    h.prefetch(rig, warm)  # the store's read and write header arenas exist now
    regs = (set(getattr(agent, "_regs", {})), set(getattr(agent, "_transient", {})))
    tokens, kv = h.token_ids(9, 4 * h.PAGE), h.expected_kv(9, 4 * h.PAGE, False)
    assert h.backup(rig, tokens, kv) == 4 * h.PAGE
    res = h.prefetch(rig, tokens)
    assert torch.equal(_bits(res["kv"]), _bits(kv))
    assert backend.geo.zero_copy and backend._bounce == {}
    assert backend.store._core.staging.size == 0  # the store never bounced a page
    assert (set(getattr(agent, "_regs", {})), set(getattr(agent, "_transient", {}))) == regs  # nothing registered per call
    stats = backend.stats()
    assert stats["chunks_written"] == 5 and stats["chunks_read"] == 5 and stats["corrupt"] == 0


def test_legacy_interface_round_trip(store_root, rigs):
    """interface_v1=0: SGLang's generic (flat page copy) path reaches the same pages."""
    tokens, kv = h.token_ids(10, 2 * h.PAGE), h.expected_kv(10, 2 * h.PAGE, False)
    legacy = rigs(store_root, extra=h.extra_config(store_root, interface_v1=0))
    assert legacy.cc.page_set_func.__name__ == "_generic_page_set"
    assert h.backup(legacy, tokens, kv) == 2 * h.PAGE
    res = h.prefetch(rigs(store_root), tokens)  # read back through the v1 path
    assert res["completed_tokens"] == 2 * h.PAGE and torch.equal(_bits(res["kv"]), _bits(kv))
    res = h.prefetch(legacy, tokens)
    assert res["completed_tokens"] == 2 * h.PAGE and torch.equal(_bits(res["kv"]), _bits(kv))


# ---- configuration ----------------------------------------------------------------------------

def test_settings_errors_name_the_problem(store_root, rigs, tmp_path):
    rig = rigs(None, storage="file", extra={})
    with pytest.raises(ValueError, match="unknown extra-config keys"):
        _backend(store_root, rig.host, stor_root="typo")
    missing = str(tmp_path / "not-mounted")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _backend(missing, rig.host)
    b = _backend(missing, rig.host, create_root=True, fsync=True)
    assert os.path.isdir(missing) and b.store.config.fsync is True
    b.close()


def test_page_tokens_are_deterministic_and_never_real_token_ids():
    a = page_tokens("ab" * 32, 16)
    assert a.dtype == np.int64 and len(a) == 16
    assert np.array_equal(a, page_tokens("ab" * 32, 16))
    assert not np.array_equal(a, page_tokens("ab" * 31 + "ac", 16))
    assert all(int(t) & PSEUDO_TOKEN_FLAG for t in a[:4]) and not a[4:].any()
    assert len(page_tokens("x", 1)) == 1 and int(page_tokens("x", 1)[0]) & PSEUDO_TOKEN_FLAG


def test_importing_the_package_is_cheap():
    code = "import sys, dynamo_components.sglang as m; print(int('sglang' in sys.modules), int('torch' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=h.REPO)
    assert out.stdout.split() == ["0", "0"], out.stderr
