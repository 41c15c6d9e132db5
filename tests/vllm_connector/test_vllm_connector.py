"""VuaNixlConnector inside vLLM's real scheduler, with the real NIXL POSIX agent (CPU).

Every engine here is vLLM's ``Scheduler`` with the connector built by vLLM's connector factory
from ``kv_transfer_config``, and the worker-side connector driven by vLLM's own model-runner
mixin over KV caches allocated by vLLM. Only the forward pass is fake (it writes random bytes),
so any KV found in a second engine can only have come through the store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import Engine, kv_transfer, make_vllm_config

HERE = Path(__file__).parent
REPO = HERE.parent.parent
CHUNK = 32  # tokens per store chunk (2 vLLM blocks of 16)


def prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1000, (n,), generator=g).tolist()


def engine(model_dir: str, store_root: str, *, seed: int = 0, block_size: int = 16, cache_dtype: str = "auto",
           events_endpoint: str | None = None, layout: str = "LBNHC", **extra) -> Engine:
    extra.setdefault("chunk_tokens", CHUNK)
    cfg = make_vllm_config(model_dir, kv_transfer(store_root, **extra), block_size=block_size,
                           cache_dtype=cache_dtype, events_endpoint=events_endpoint, layout=layout)
    return Engine(cfg, seed=seed)


def chunk_files(store_root: str) -> list[Path]:
    return sorted(Path(store_root).glob("ns/*/*/*/*.kvb"))


# ---- loading ------------------------------------------------------------------------------------


def test_connector_class_comes_from_vllms_factory_and_import_is_cheap():
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    from dynamo_components.vllm import VuaNixlConnector

    cls = KVConnectorFactory.get_connector_class(KVTransferConfig(**kv_transfer("/unused")))
    assert cls is VuaNixlConnector and issubclass(cls, KVConnectorBase_V1)
    code = "import sys, dynamo_components.vllm as m; print(sorted(k for k in ('vllm', 'torch') if k in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"  # importing the package pulls in neither vLLM nor torch


def test_second_engine_in_another_process_loads_prompt_and_reply_bit_identical(model_dir, store_root, tmp_path):
    """Engine 1 computes a prompt and generates; request_finished saves every full chunk of
    prompt + reply. A fresh engine in another process gets a follow-up turn (prompt + reply +
    new tokens): it schedules only the unmatched tokens, and the KV it loaded is byte-for-byte
    what engine 1 computed."""
    p = prompt(1, 90)
    e1 = engine(model_dir, store_root, seed=11)
    try:
        e1.add("turn1", p, max_tokens=8)
        e1.run()
        reply = e1.outputs["turn1"]
        assert len(reply) == 8 and e1.computed["turn1"] == 97  # 90 prompt + 7 decode steps (last token not fed)
        # 97 computed tokens -> 3 chunks of 32 = 96 tokens, the last one holding 6 generated tokens
        assert len(chunk_files(store_root)) == 3
        kv1 = e1.token_kv(e1.tables["turn1"], 96)
        stats1 = dict(e1.connector._scheduler.stats)
    finally:
        e1.close()
    assert stats1["saves"] == 1 and stats1["loads"] == 0

    follow_up = p + reply + prompt(2, 20)  # 118 tokens
    dump = tmp_path / "kv2.pt"
    spec = {"model": model_dir, "store": store_root, "extra": {"chunk_tokens": CHUNK}, "seed": 22,
            "requests": [{"id": "turn2", "prompt": follow_up, "max_tokens": 1, "dump_kv": str(dump), "dump_tokens": 96}]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(HERE / "harness.py"), str(tmp_path / "spec.json")],
                          capture_output=True, text=True, cwd=REPO, timeout=240)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    r = res["requests"]["turn2"]
    assert (r["start"], r["scheduled"]) == (96, 22)  # only the 22 unmatched tokens are computed
    assert r["computed"] == 22
    assert res["stats"]["loads"] == 1 and res["stats"]["hit_tokens"] == 96
    kv2 = torch.load(dump)
    assert kv2.shape == kv1.shape == (96, 2, 2, 64)  # tokens, layers, heads, K|V bytes (bf16)
    assert torch.equal(kv1, kv2)


def test_partial_prefix_and_local_prefix_cache_are_combined(model_dir, store_root):
    """A prompt sharing only its first chunk loads exactly that chunk; blocks vLLM already holds in
    its own prefix cache are not loaded again (the connector is asked beyond the local hit)."""
    base = prompt(3, 100)
    e1 = engine(model_dir, store_root, seed=1)
    try:
        e1.add("a", base)
        e1.run()
        kv_a = e1.token_kv(e1.tables["a"], 96)
    finally:
        e1.close()
    e2 = engine(model_dir, store_root, seed=2)
    try:
        e2.add("b", base[:40] + prompt(4, 30))  # shares chunk 0 (32 tokens) only
        e2.run()
        assert e2.first_sched["b"] == (70 - 32, 32)
        assert torch.equal(e2.token_kv(e2.tables["b"], 32), kv_a[:32])
        # now the full prompt: vLLM's prefix cache has block 0-1 (32 tokens) from "b"; the store has 96
        e2.add("c", base)
        e2.run()
        assert e2.first_sched["c"] == (100 - 96, 96)
        assert torch.equal(e2.token_kv(e2.tables["c"], 96), kv_a)
        stats = e2.connector._scheduler.stats
        assert stats["hit_tokens"] == 32 + 64  # the second load only covered what vLLM lacked
    finally:
        e2.close()


# ---- failures -----------------------------------------------------------------------------------


def _save_prompt(model_dir: str, store_root: str, p: list[int]) -> torch.Tensor:
    e = engine(model_dir, store_root, seed=5)
    try:
        e.add("w", p)
        e.run()
        return e.token_kv(e.tables["w"], len(p) - len(p) % CHUNK)
    finally:
        e.close()


def test_corrupt_chunk_makes_vllm_recompute_exactly_its_blocks(model_dir, store_root):
    p = prompt(6, 130)
    kv_w = _save_prompt(model_dir, store_root, p)  # 4 chunks = 128 tokens
    e = engine(model_dir, store_root, seed=6)
    try:
        keys = e.connector._scheduler.stores[0].keys_for(p)
        path = e.connector._scheduler.stores[0].block_path(keys[2])
        with open(path, "r+b") as fh:  # flip one payload byte of chunk 2: same size, bad checksum
            fh.seek(-100, os.SEEK_END)
            b = fh.read(1)
            fh.seek(-100, os.SEEK_END)
            fh.write(bytes([b[0] ^ 0xFF]))
        e.add("r", p)
        e.run()
        table = e.tables["r"]
        # the lookup promised 128 tokens; chunk 2 (tokens 64..95 = blocks 4, 5) fails its checksum,
        # so blocks 4..7 are reported and vLLM recomputes from token 64: exactly 130 - 64 tokens
        assert e.invalid_blocks == set(table[4:8])
        assert e.first_sched["r"] == (130 - 64, 64)
        assert torch.equal(e.token_kv(table, 64), kv_w[:64])
        assert e.connector._scheduler.stats["load_shortfall_tokens"] == 64
        # the recomputed request was saved again: the store is whole for the next engine
        assert e.connector._scheduler.stores[0].lookup(p) == 128
    finally:
        e.close()


def test_chunk_file_removed_between_lookup_and_load(model_dir, store_root):
    p = prompt(7, 130)
    kv_w = _save_prompt(model_dir, store_root, p)
    e = engine(model_dir, store_root, seed=7)
    try:
        store = e.connector._scheduler.stores[0]
        last = store.block_path(store.keys_for(p)[3])
        removed = []

        def evict_when_load_is_issued(out):
            meta = out.kv_connector_metadata
            if meta.loads and not removed:
                assert meta.loads[0].num_tokens == 128  # the lookup saw all 4 chunks
                os.unlink(last)  # evicted by someone else before the worker reads it
                removed.append(last)

        e.add("r", p)
        e.run(after_schedule=evict_when_load_is_issued)
        table = e.tables["r"]
        assert removed and e.invalid_blocks == set(table[6:8])
        assert e.first_sched["r"] == (130 - 96, 96)
        assert torch.equal(e.token_kv(table, 96), kv_w[:96])
    finally:
        e.close()


def test_store_root_missing_or_not_a_directory_fails_at_startup_naming_path_and_backend(model_dir, tmp_path):
    from dynamo_components.vllm.config import StoreUnavailableError

    missing = tmp_path / "not-mounted"
    with pytest.raises(StoreUnavailableError) as err:
        engine(model_dir, str(missing))
    msg = str(err.value)
    assert str(missing) in msg and "NIXL backend POSIX" in msg and "does not exist" in msg
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(StoreUnavailableError, match=f"{afile} is not a directory"):
        engine(model_dir, str(afile))
    with pytest.raises(ValueError, match="chunk_tokens=40 must be a positive multiple of vLLM's block size 16"):
        engine(model_dir, str(tmp_path), chunk_tokens=40)
    with pytest.raises(ValueError, match=r"unknown kv_connector_extra_config keys \['storeroot'\]"):
        engine(model_dir, str(tmp_path), storeroot="/x")


def test_slow_lookup_makes_vllm_retry_instead_of_blocking(model_dir, store_root, monkeypatch):
    import threading

    p = prompt(8, 64)
    _save_prompt(model_dir, store_root, p)
    e = engine(model_dir, store_root, seed=8, lookup_wait_ms=1)
    try:
        store = e.connector._scheduler.stores[0]
        gate = threading.Event()
        real = store.lookup
        monkeypatch.setattr(store, "lookup", lambda toks: (gate.wait(30), real(toks))[1])  # a stalled mount
        e.add("s", p)
        for _ in range(3):
            out = e.step()
            assert out.num_scheduled_tokens == {}  # asked again next step, nothing computed yet
        assert e.scheduler.requests["s"].status.name == "WAITING"
        gate.set()
        e.run()
        assert e.first_sched["s"] == (64 - 63, 63)  # full hit: vLLM recomputes only the last token
    finally:
        e.close()


# ---- namespaces -------------------------------------------------------------------------------------


def test_tp_rank_block_size_and_kv_dtype_never_hit(model_dir, store_root):
    from harness import kv_cache_config_for
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from dynamo_components.vllm.config import namespace_for
    from dynamo_components.vllm.worker import WorkerSide

    p = prompt(9, 100)
    _save_prompt(model_dir, store_root, p)  # block 16, bf16, TP 1: 96 tokens stored
    # a different block size (same chunk size, so only the block size differs)
    e = engine(model_dir, store_root, seed=9, block_size=32)
    try:
        e.add("bs", p)
        e.run()
        assert e.first_sched["bs"] == (100, 0)
    finally:
        e.close()
    # an fp8 KV cache: no hit on bf16 data; its own saves round-trip bit-exactly
    e = engine(model_dir, store_root, seed=10, cache_dtype="fp8")
    try:
        assert e.connector._scheduler.stores[0].namespace.dtype == "float8_e4m3fn"
        e.add("f1", p)
        e.run()
        assert e.first_sched["f1"] == (100, 0)
        kv_f = e.token_kv(e.tables["f1"], 96)
    finally:
        e.close()
    e = engine(model_dir, store_root, seed=12, cache_dtype="fp8")
    try:
        e.add("f2", p)
        e.run()
        assert e.first_sched["f2"] == (4, 96)
        assert torch.equal(e.token_kv(e.tables["f2"], 96), kv_f)
    finally:
        e.close()
    # TP=2: each rank has its own namespace; the scheduler needs every rank's chunks
    cfg = make_vllm_config(model_dir, kv_transfer(store_root, chunk_tokens=CHUNK), tp_size=2)
    kvcc = kv_cache_config_for(cfg)
    sched = KVConnectorFactory.create_connector(cfg, KVConnectorRole.SCHEDULER, kvcc)
    try:
        side = sched._scheduler
        fps = {s.fp_hex for s in side.stores}
        assert len(fps) == 2
        settings, plan = side.settings, side.plan
        assert namespace_for(settings, plan, 1, 0).fingerprint(CHUNK).hex() not in fps
        assert [s.lookup(p) for s in side.stores] == [0, 0]  # TP=1 data is invisible to both ranks
        # rank 1 alone stores the prefix: still no hit, since rank 0's heads are missing
        w1 = WorkerSide(cfg, kvcc, ranks=(1, 0))
        try:
            kv = torch.zeros(w1.store.layout.shape(96), dtype=torch.bfloat16)
            assert w1.store.put(p[:96], kv) == 96
        finally:
            w1.shutdown()
        assert [s.lookup(p) for s in side.stores] == [0, 96]
        assert side._lookup(p) == 0
    finally:
        sched.shutdown()


def test_multiconnector_with_vllms_nixl_connector(model_dir, store_root):
    """The disaggregated set-up's kv_transfer_config: vLLM's MultiConnector with its NixlConnector
    (prefill -> decode hand-off) first and ours second. Both are built for real (NixlConnector's
    worker starts its own NIXL agent); a request without remote-prefill parameters is served
    from the store through the MultiConnector. Block size 32: vLLM's CPU attention backend,
    which NixlConnector consults, needs multiples of 32."""
    ours = kv_transfer(store_root, chunk_tokens=64)
    multi = {"kv_connector": "MultiConnector", "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
             "kv_connector_extra_config": {"connectors": [
                 {"kv_connector": "NixlConnector", "kv_role": "kv_both"},
                 {k: ours[k] for k in ("kv_connector", "kv_connector_module_path", "kv_role",
                                       "kv_connector_extra_config")}]}}
    p = prompt(30, 100)
    e = Engine(make_vllm_config(model_dir, multi, block_size=32), seed=30)
    try:
        names = [type(c).__name__ for c in e.connector._connectors]
        assert names[0].startswith("Nixl") and names[1] == "VuaNixlConnector"  # 0.31: NixlPullConnector
        e.add("a", p)
        e.run()
        kv = e.token_kv(e.tables["a"], 64)
    finally:
        e.close()
    e = Engine(make_vllm_config(model_dir, multi, block_size=32), seed=31)
    try:
        e.add("b", p)
        e.run()
        assert e.first_sched["b"] == (100 - 64, 64)
        assert torch.equal(e.token_kv(e.tables["b"], 64), kv)
    finally:
        e.close()
