"""KV events for the shared tier: block identity, following the root's access log, and Dynamo's router.

The first tests are plain unit tests (no network). The ``dynamo``-marked ones talk to a real
Dynamo runtime and ``KvRouter`` and run inside a private network namespace (the host-side run
re-executes this file under ``unshare -n`` and replays the outcomes).
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import pytest
import torch
from netns import NetnsRunner, dynamo_importable, inside

from vua_nixl.lifecycle.observers import AccessRecorder

BLOCK = 16
CHUNK = 32

have_dynamo, why_not = dynamo_importable()
needs_dynamo = pytest.mark.skipif(not have_dynamo, reason=why_not)


class FakePublisher:
    """Records what an advertiser would send to Dynamo."""

    def __init__(self, block_size: int = BLOCK) -> None:
        self.block_size = block_size
        self.stored: list[tuple[int | None, list[int], tuple[int, ...], str]] = []
        self.removed_hashes: list[int] = []

    def stored_chain(self, parent, hashes, tokens, medium):
        self.stored.append((parent, list(hashes), tuple(tokens), medium))

    def removed(self, hashes, medium="EXTERNAL"):
        self.removed_hashes.extend(hashes)

    def all_stored(self) -> list[int]:
        return [h for _, hs, _, _ in self.stored for h in hs]


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, 500) for _ in range(n)]


def make_store(root, observers=()):
    from vua_nixl import KVLayout, KVStore, Namespace

    ns = Namespace(model="test/events", dtype="bfloat16", layout=KVLayout(num_layers=2, kv_heads=2, head_dim=16))
    return KVStore(str(root), ns, chunk_tokens=CHUNK, observers=observers)


def flush_logs(store) -> None:
    from vua_nixl.lifecycle.accesslog import shared_log

    shared_log(store.paths.root).flush()


def kv_for(n: int) -> torch.Tensor:
    return torch.randn(2, 2, n, 2, 16).to(torch.bfloat16)


# ---- unit tests -----------------------------------------------------------------------------


@needs_dynamo
def test_block_hashes_match_the_routers():
    from dynamo.llm import compute_block_hash_for_seq

    from dynamo_components.kv_events import chained_block_hashes, local_block_hashes, to_signed64

    t = tokens(1, 100)
    assert local_block_hashes(t, BLOCK) == [int(h) for h in compute_block_hash_for_seq(t[:96], BLOCK)]
    chain = chained_block_hashes(t, BLOCK)
    assert len(chain) == 6 and all(-(2**63) <= h < 2**63 for h in chain)
    # prefix property: a prefix's chain is a prefix of the chain; a different first block changes all
    assert chained_block_hashes(t[:48], BLOCK) == chain[:3]
    assert chained_block_hashes([t[0] + 1] + t[1:], BLOCK)[5] != chain[5]
    assert to_signed64(2**64 - 1) == -1 and to_signed64(5) == 5


def test_log_follower_reads_each_writers_records_once_and_waits_for_torn_ones(tmp_path):
    from vua_nixl.lifecycle.accesslog import EVICTED, STORED, AccessLog, LogFollower, pack

    ns_a, ns_b = b"A" * 16, b"B" * 16
    w1, w2 = AccessLog(tmp_path), AccessLog(tmp_path)
    w1.record(STORED, ns_a, b"k" * 16, b"p" * 16)
    w2.record(STORED, ns_b, b"x" * 16)  # another namespace: not ours
    w1.flush()
    w2.flush()
    fol = LogFollower(tmp_path, ns_a)
    got = fol.read_new()
    assert [(r.kind, r.key, r.aux) for r in got] == [(STORED, b"k" * 16, b"p" * 16)]
    assert fol.read_new() == []  # nothing is read twice
    # a writer killed mid-record: the torn tail is left until it is whole
    rec = pack(EVICTED, 1.0, ns_a, b"k" * 16)
    with open(w1.path, "ab") as fh:
        fh.write(rec[:20])
    assert fol.read_new() == []
    with open(w1.path, "ab") as fh:
        fh.write(rec[20:])
    assert [(r.kind, r.key) for r in fol.read_new()] == [(EVICTED, b"k" * 16)]
    # a file the pruner consumed and deleted is forgotten, and a new one is read from its start
    os.unlink(w1.path)
    assert fol.read_new() == []
    w1.record(STORED, ns_a, b"n" * 16)
    w1.flush()
    assert [r.key for r in fol.read_new()] == [b"n" * 16]


@needs_dynamo
def test_advertiser_follows_the_store_and_other_workers(tmp_path):
    from dynamo_components.kv_events import SharedTierAdvertiser, chained_block_hashes
    from vua_nixl.lifecycle.accesslog import LogFollower

    pub_a, pub_b = FakePublisher(), FakePublisher()
    store_a = make_store(tmp_path / "store", [AccessRecorder()])
    store_b = make_store(tmp_path / "store", [AccessRecorder()])
    adv_a = SharedTierAdvertiser(pub_a, store_a, LogFollower(store_a.paths.root, store_a.fingerprint))
    adv_b = SharedTierAdvertiser(pub_b, store_b, LogFollower(store_b.paths.root, store_b.fingerprint))
    store_a.observers.append(adv_a)
    store_b.observers.append(adv_b)

    t = tokens(2, 100)
    assert store_a.put(t, kv_for(100)) == 96
    want = chained_block_hashes(t[:96], BLOCK)
    assert pub_a.all_stored() == want  # 3 chunks -> 6 router blocks, chained across chunks
    assert pub_a.stored[0][0] is None and pub_a.stored[1][0] == want[1]  # parent links
    assert all(m == "EXTERNAL" for *_, m in pub_a.stored)
    # worker B learns about A's chunks from the root's access log (token ids from the block
    # headers) and advertises them as its own
    flush_logs(store_a)
    assert adv_b.poll_log() == 3
    assert pub_b.all_stored() == want
    # B extends the prefix: only the new chunk is written and announced, chained to A's
    t2 = t[:96] + tokens(3, 40)
    assert store_b.put(t2, kv_for(136)) == 128
    assert pub_b.all_stored() == want + chained_block_hashes(t2[:128], BLOCK)[6:]
    flush_logs(store_b)
    assert adv_a.poll_log() == 1
    assert pub_a.all_stored() == chained_block_hashes(t2[:128], BLOCK)
    # note_prompt is idempotent for known chunks
    assert adv_a.note_prompt(t2) == 0
    # removal by this process -> withdrawn here and, via the access log, at B
    assert store_a.delete(t2) == 4
    assert sorted(pub_a.removed_hashes) == sorted(chained_block_hashes(t2[:128], BLOCK))
    flush_logs(store_a)
    assert adv_b.poll_log() == 4
    assert sorted(pub_b.removed_hashes) == sorted(chained_block_hashes(t2[:128], BLOCK))
    assert adv_a.advertised_blocks == adv_b.advertised_blocks == 0


@needs_dynamo
def test_validate_withdraws_chunks_deleted_behind_our_back(tmp_path):
    from dynamo_components.kv_events import SharedTierAdvertiser, chained_block_hashes

    pub = FakePublisher()
    store = make_store(tmp_path / "store")
    adv = SharedTierAdvertiser(pub, store)
    t = tokens(4, 64)
    other = make_store(tmp_path / "store")  # a process that keeps no access log (e.g. a batch job)
    other.put(t, kv_for(64))
    assert adv.note_prompt(t) == 2  # found through lookup after a request
    assert pub.all_stored() == chained_block_hashes(t, BLOCK)
    os.unlink(store.block_path(store.keys_for(t)[1]))  # evicted by `vua-nixl gc` elsewhere
    assert adv.validate(limit=1) + adv.validate(limit=1) == 1  # a bounded, rolling sweep
    assert pub.removed_hashes == chained_block_hashes(t, BLOCK)[2:]
    assert adv.advertised_blocks == 2


@needs_dynamo
def test_hot_cache_longest_prefix_lru_and_device_events():
    from dynamo_components.hot_cache import HotPrefixCache
    from dynamo_components.kv_events import chained_block_hashes

    inserted, evicted = [], []
    per_token = 2 * 2 * 2 * 16 * 2  # [L=2, K/V, H=2, D=16] bf16
    cache = HotPrefixCache(
        BLOCK, 150 * per_token,
        on_insert=lambda toks, first, hashes: inserted.append((first, len(hashes), hashes)),
        on_evict=lambda hashes: evicted.append(list(hashes)),
    )
    a = tokens(6, 70)
    kv_a = kv_for(70)
    assert cache.insert(a, kv_a) == 64  # full blocks only
    assert inserted[-1][:2] == (0, 4) and inserted[-1][2] == chained_block_hashes(a[:64], BLOCK)
    # a request sharing 3 blocks + something else gets exactly those 48 tokens, bit-identical
    q = a[:50] + tokens(7, 30)
    n, kv = cache.lookup(q)
    assert n == 48 and torch.equal(kv, kv_a[:, :, :48])
    assert cache.lookup(a, max_tokens=40)[0] == 32  # capped (the engine must compute >= 1 token)
    assert cache.lookup(tokens(8, 64)) == (0, None)
    # an extension supersedes its prefix entry; only the new block is announced
    b = a[:64] + tokens(9, 16)
    assert cache.insert(b, kv_for(80)) == 80
    assert inserted[-1][:2] == (4, 5) and len(cache) == 1 and cache.nbytes == 80 * per_token
    assert cache.lookup(a)[0] == 64  # served through b
    c = tokens(10, 32)
    assert cache.insert(c, kv_for(32)) == 32 and len(cache) == 2
    cache.lookup(b)  # b becomes most recently used
    d = tokens(11, 64)
    assert cache.insert(d, kv_for(64)) == 64  # over budget: LRU c goes, withdrawn from the router
    assert evicted == [chained_block_hashes(c, BLOCK)]
    e = tokens(12, 64)
    cache.insert(e, kv_for(64))  # now b is the LRU
    assert set(evicted[-1]) == set(chained_block_hashes(b, BLOCK))
    assert cache.nbytes <= 150 * per_token and cache.lookup(a) == (0, None)


# ---- the real router, in a private network namespace -----------------------------------------


@pytest.fixture(scope="module")
def ns():
    if inside():
        return None
    return NetnsRunner(__file__, timeout=240, extra_args=["-m", "dynamo"]).run()


async def _workers(n: int, loop):
    """``n`` in-process Dynamo 'workers' (runtime + served endpoint + registered model card)."""
    from dynamo.llm import ModelInput, ModelType, WorkerType, register_model
    from dynamo.runtime import DistributedRuntime

    out = []
    for _ in range(n):
        rt = DistributedRuntime(loop, "file", "tcp", event_plane="zmq")
        ep = rt.endpoint("evtest.backend.generate")

        async def gen(request, context=None):
            yield {"token_ids": [1], "finish_reason": "stop"}

        asyncio.ensure_future(ep.serve_endpoint(gen))
        await register_model(
            ModelInput.Tokens, ModelType.Completions, ep, "evtest", "evtest",
            worker_type=WorkerType.Aggregated, kv_cache_block_size=BLOCK, skip_model_assets=True,
        )
        out.append((rt, ep))
    return out


async def _wait_scores(router, toks, pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        s = await router.get_overlap_scores(toks)
        rows = {w["worker_id"]: w for w in s["workers"]}
        if pred(rows) or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.3)


@pytest.mark.dynamo
def test_router_sees_shared_tier_on_every_worker_and_removals(ns, tmp_path):
    if ns is not None:
        return ns.check("test_router_sees_shared_tier_on_every_worker_and_removals")
    from dynamo.llm import KvRouter, KvRouterConfig
    from dynamo.runtime import DistributedRuntime

    from dynamo_components.kv_events import (
        KvTierPublisher,
        SharedTierAdvertiser,
        chained_block_hashes,
    )
    from vua_nixl.lifecycle.accesslog import LogFollower

    os.environ.update(
        DYN_FILE_KV=str(tmp_path / "discovery"), DYN_TCP_RPC_HOST="127.0.0.1",
        DYN_EVENT_PLANE_HOST="127.0.0.1", DYN_SYSTEM_HOST="127.0.0.1",
    )

    async def scenario():
        loop = asyncio.get_running_loop()
        workers = await _workers(2, loop)
        advs, stores, pubs = [], [], []
        for _, ep in workers:
            pub = KvTierPublisher(ep, BLOCK)
            store = make_store(tmp_path / "store", [AccessRecorder()])
            adv = SharedTierAdvertiser(pub, store, LogFollower(store.paths.root, store.fingerprint))
            store.observers.append(adv)
            pubs.append(pub)
            stores.append(store)
            advs.append(adv)
        ids = [ep.connection_id() for _, ep in workers]
        rrt = DistributedRuntime(loop, "file", "tcp", event_plane="zmq")
        router = KvRouter(rrt.endpoint("evtest.backend.generate"), BLOCK, KvRouterConfig())
        try:
            t = tokens(5, 100)
            stores[0].put(t, kv_for(100))  # worker 0 stores 3 chunks = 6 blocks (shared tier)
            pubs[1].stored(t, 0, 2, "GPU")  # worker 1 holds the first 2 blocks on its device
            rows = await _wait_scores(
                router, t, lambda r: r.get(ids[0], {}).get("disk_blocks") == 6 and r.get(ids[1], {}).get("device_blocks") == 2
            )
            assert rows[ids[0]]["disk_blocks"] == 6 and rows[ids[0]]["device_blocks"] == 0, rows
            # Router weights: 2 device blocks (credit 1.0 each) beat 6 shared blocks at the default
            # external weight 0.25 -- and lose once the shared tier is weighted like the device.
            assert (await router.best_worker(t))[0] == ids[1]
            heavy = KvRouter(rrt.endpoint("evtest.backend.generate"), BLOCK, KvRouterConfig(disk_cache_hit_weight=1.0))
            await _wait_scores(heavy, t, lambda r: r.get(ids[0], {}).get("disk_blocks") == 6)
            assert (await heavy.best_worker(t))[0] == ids[0]
            pubs[1].removed(chained_block_hashes(t, BLOCK)[:2], "GPU")

            # Worker 1 learns worker 0's chunks through the root's access log: every worker can serve them.
            flush_logs(stores[0])
            advs[1].poll_log()
            rows = await _wait_scores(router, t, lambda r: all(r.get(i, {}).get("disk_blocks") == 6 for i in ids))
            for i in ids:
                assert rows[i]["disk_blocks"] == 6 and rows[i]["device_blocks"] == 0, rows

            # Eviction: worker 0 deletes the prefix; both workers withdraw it.
            stores[0].delete(t)
            flush_logs(stores[0])
            advs[1].poll_log()
            rows = await _wait_scores(router, t, lambda r: all(r.get(i, {}).get("disk_blocks", 0) == 0 for i in ids))
            for i in ids:
                assert rows.get(i, {}).get("disk_blocks", 0) == 0, rows
        finally:
            for p in pubs:
                p.close()
            for rt, _ in workers:
                rt.shutdown()
            rrt.shutdown()

    asyncio.run(scenario())
