"""A real Dynamo graph (stock frontend, KV router, runtime) serving vua-nixl workers.

Everything runs inside a private network namespace (see netns): the host-side
run re-executes this file once under ``unshare -n`` and replays each test's outcome. One graph is
shared by the whole file: 2 prefill workers + 1 decode worker on one shared store, the `tiny`
model, 32-token store chunks, 16-token KV blocks. Tests run in file order; later ones kill
workers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import random
import signal
import time
import urllib.error

import pytest
from netns import NetnsRunner, inside

pytestmark = [pytest.mark.dynamo, pytest.mark.slow]

BLOCK = 16
CHUNK = 32


def prompt(seed: int, n: int) -> list[int]:
    """A deterministic random prompt of ``n`` token ids (all ordinary tokens of the tiny vocab)."""
    rng = random.Random(seed)
    return [rng.randrange(20, 480) for _ in range(n)]


def cached(resp: dict) -> int:
    return int(((resp.get("usage") or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


@pytest.fixture(scope="module")
def ns():
    """Host side: run this file in a network namespace once. Inside: None."""
    if inside():
        return None
    return NetnsRunner(__file__, timeout=420).run()


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    if not inside():
        yield None
        return
    from dynamo_components.graph import Graph, GraphSpec

    spec = GraphSpec(
        model="tiny", work_dir=str(tmp_path_factory.mktemp("graph")), prefill=2, decode=1, http_port=0,
        chunk_tokens=CHUNK, block_size=BLOCK, default_max_tokens=16,
    )
    g = Graph(spec)
    try:
        g.start()
        g.wait_ready(timeout=180)
        # The graph is exported to the test process too: a router/runtime client here needs it.
        os.environ.update({k: v for k, v in g.env().items() if k.startswith("DYN_")})
        yield g
    finally:
        g.stop()


@pytest.fixture(scope="module")
def reference(graph):
    """Greedy reference outputs from an in-process engine on the same model directory."""
    if graph is None:
        return None
    from vua_nixl_engine import Engine

    eng = Engine.from_model(graph.model_dir)

    def run(tokens: list[int], n: int) -> list[int]:
        return eng.generate(tokens, max_new_tokens=n, use_store=False, save=False, stop_at_eos=True).token_ids

    return run


def test_completion_end_to_end_then_cached(ns, graph, reference):
    if ns is not None:
        return ns.check("test_completion_end_to_end_then_cached")
    p = prompt(1, 300)
    r1 = graph.completion(p, max_tokens=12)
    out1 = graph.worker_stats("decode-0")["last"]["output"]
    r2 = graph.completion(p, max_tokens=12)
    out2 = graph.worker_stats("decode-0")["last"]["output"]
    assert r1["usage"]["prompt_tokens"] == 300
    assert cached(r1) == 0
    # the router sends the repeat to the worker holding the prompt in its own cache (device tier),
    # which reuses whole blocks of the first 299 tokens (here equal to 9 store chunks of 32)
    assert cached(r2) == (299 // BLOCK) * BLOCK
    assert sum(graph.worker_stats(n).get("hot_hits", 0) for n in graph.workers("prefill")) == 1
    assert r1["choices"][0]["text"] == r2["choices"][0]["text"]
    assert out1 == out2 == reference(p, len(out1))
    assert r1["usage"]["completion_tokens"] == len(out1)


def test_router_overlap_scores_show_shared_tier_for_every_worker(ns, graph):
    if ns is not None:
        return ns.check("test_router_overlap_scores_show_shared_tier_for_every_worker")
    from dynamo.llm import KvRouter, KvRouterConfig
    from dynamo.runtime import DistributedRuntime

    p = prompt(1, 300)  # stored by the previous test (one prefill worker wrote it)
    want = (299 // CHUNK) * CHUNK // BLOCK
    prefill_ids = {graph.worker_stats(n)["instance_id"] for n in graph.workers("prefill")}
    assert len(prefill_ids) == 2

    async def scores() -> dict:
        hot = 300 // BLOCK

        rt = DistributedRuntime(asyncio.get_running_loop(), "file", "tcp", event_plane="zmq")
        try:
            router = KvRouter(rt.endpoint("vua.prefill.generate"), BLOCK, KvRouterConfig())
            deadline = time.monotonic() + 30
            while True:
                s = await router.get_overlap_scores(p)
                rows = {w["worker_id"]: w for w in s["workers"]}
                done = all(rows.get(i, {}).get("disk_blocks", 0) >= want for i in prefill_ids)
                done = done and max(rows.get(i, {}).get("device_blocks", 0) for i in prefill_ids) >= hot
                if done or time.monotonic() > deadline:
                    return rows
                await asyncio.sleep(0.5)
        finally:
            rt.shutdown()

    rows = asyncio.run(scores())
    for wid in prefill_ids:
        assert wid in rows, f"router does not know prefill worker {wid:x}: {rows}"
        # shared tier (external, reported with disk): every worker, whoever wrote the chunks
        assert rows[wid]["disk_blocks"] == want, rows[wid]
    # device tier: only the worker that computed the prompt holds it in its own (hot) cache
    hot = 300 // BLOCK
    assert sorted(rows[w]["device_blocks"] for w in prefill_ids) == [0, hot], rows


def test_handoff_modes_give_identical_outputs(ns, graph, reference):
    if ns is not None:
        return ns.check("test_handoff_modes_give_identical_outputs")
    outs = {}
    for i, mode in enumerate(("nixl", "store", "nixl")):
        p = prompt(2, 200)
        r = graph.completion(p, max_tokens=10, nvext={"annotations": [f"vua_handoff={mode}"]})
        last = graph.worker_stats("decode-0")["last"]
        assert last["handoff"] == mode, last
        if mode == "nixl":
            assert last["computed_tokens"] == 0  # the whole prompt's KV came over NIXL
        else:
            assert last["computed_tokens"] <= CHUNK  # only the tail past the stored chunks
        outs[(i, mode)] = (r["choices"][0]["text"], last["output"])
    texts = {v[0] for v in outs.values()}
    tokens = {tuple(v[1]) for v in outs.values()}
    assert len(texts) == 1 and len(tokens) == 1, outs
    assert list(tokens.pop()) == reference(prompt(2, 200), 10)
    # a fresh prompt straight over NIXL too (nothing stored yet for it)
    p = prompt(3, 150)
    r = graph.completion(p, max_tokens=8, nvext={"annotations": ["vua_handoff=nixl"]})
    last = graph.worker_stats("decode-0")["last"]
    assert cached(r) == 0 and last["handoff"] == "nixl"
    assert last["output"] == reference(p, 8)


def _served_by(graph, before: dict[str, int], role: str = "prefill") -> str:
    after = {n: graph.worker_stats(n).get("requests", 0) for n in graph.workers(role)}
    moved = [n for n in after if after[n] > before.get(n, 0)]
    assert len(moved) == 1, (before, after)
    return moved[0]


def test_cross_worker_reuse_through_the_shared_store(ns, graph, reference):
    if ns is not None:
        return ns.check("test_cross_worker_reuse_through_the_shared_store")
    p = prompt(4, 260)
    before = {n: graph.worker_stats(n).get("requests", 0) for n in graph.workers("prefill")}
    r1 = graph.completion(p, max_tokens=8)
    first = _served_by(graph, before)
    s1 = graph.worker_stats(first)["last"]
    assert s1["reused_tokens"] == 0 and s1["computed_tokens"] == 260
    # Stop worker 1: the only way the next request can avoid recomputing is the shared store.
    graph.kill(first, signal.SIGTERM)
    other = [n for n in graph.workers("prefill") if n != first]
    assert len(other) == 1
    before = {n: graph.worker_stats(n).get("requests", 0) for n in other}
    deadline = time.monotonic() + 30
    while True:
        try:
            r2 = graph.completion(p, max_tokens=8, timeout=30)
            break
        except urllib.error.HTTPError:
            if time.monotonic() > deadline:  # the frontend may briefly route to the stopped worker
                raise
            time.sleep(0.5)
    assert _served_by(graph, before) == other[0]
    s2 = graph.worker_stats(other[0])["last"]
    assert s2["reused_tokens"] == (259 // CHUNK) * CHUNK
    assert s2["computed_tokens"] == 260 - s2["reused_tokens"] < s1["computed_tokens"]
    assert cached(r2) == s2["reused_tokens"]
    assert r1["choices"][0]["text"] == r2["choices"][0]["text"]
    assert graph.worker_stats("decode-0")["last"]["output"] == reference(p, 8)


def test_worker_killed_mid_request_then_recovery(ns, graph, reference):
    if ns is not None:
        return ns.check("test_worker_killed_mid_request_then_recovery")
    from vua_nixl.audit import verify

    p = prompt(5, 120)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    t0 = time.monotonic()
    # min_tokens keeps it generating (random weights emit EOS early otherwise): ~10 s of decode
    fut = pool.submit(graph.completion, p, 1500, 60, min_tokens=1500)
    # wait until the decode worker is generating (its prefill has been recorded), then kill it
    time.sleep(1.5)
    assert not fut.done(), "the long request finished before the worker could be killed"
    graph.kill("decode-0", signal.SIGKILL)
    try:
        resp = fut.result(timeout=90)
        # A response after the kill must not pretend to be complete.
        assert resp["usage"]["completion_tokens"] < 1500 or resp["choices"][0]["finish_reason"] != "length", resp
        outcome = "truncated"
    except urllib.error.HTTPError as exc:
        outcome = f"HTTP {exc.code}"
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:  # connection reset
        outcome = f"error {exc}"
    print("KILL OUTCOME", outcome, time.monotonic() - t0)
    assert time.monotonic() - t0 < 90
    # A replacement decode worker joins; the next request succeeds.
    graph.start_worker("decode", name="decode-1")
    graph.wait_ready(timeout=120, names=["decode-1"])
    print("READY", time.monotonic() - t0)
    q = prompt(6, 90)
    deadline = time.monotonic() + 30
    while True:
        try:
            r = graph.completion(q, max_tokens=6, timeout=30)
            break
        except urllib.error.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    print("SERVED", time.monotonic() - t0)
    assert r["choices"][0]["finish_reason"] in ("length", "stop")
    assert graph.worker_stats("decode-1")["last"]["output"] == reference(q, 6)
    # The store is consistent: every block validates (header, checksum), no temporaries published.
    checked, bad = verify(graph.store)
    assert checked > 0 and not bad, (outcome, bad)


def test_aggregated_graph_store_aware(ns, graph, reference, tmp_path_factory):
    """The non-disaggregated mode: 2 aggregated workers on one store (hot caches off)."""
    if ns is not None:
        return ns.check("test_aggregated_graph_store_aware")
    from dynamo_components.graph import Graph, GraphSpec

    spec = GraphSpec(
        model=graph.model_dir, work_dir=str(tmp_path_factory.mktemp("agg")), aggregated=2, http_port=0,
        chunk_tokens=CHUNK, block_size=BLOCK, hot_cache_mb=0, namespace="vuaagg",
    )
    with Graph(spec) as agg:
        agg.start()
        agg.wait_ready(timeout=150)
        p = prompt(7, 200)
        before = {n: agg.worker_stats(n).get("requests", 0) for n in agg.workers("aggregated")}
        r1 = agg.completion(p, max_tokens=8)
        first = _served_by(agg, before, "aggregated")
        # stop the worker that computed it: the other one must load the prefix from the store
        agg.kill(first, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while True:
            try:
                r2 = agg.completion(p, max_tokens=8, timeout=30)
                break
            except urllib.error.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        other = agg.workers("aggregated")[0]
        last = agg.worker_stats(other)["last"]
        assert cached(r1) == 0 and cached(r2) == (199 // CHUNK) * CHUNK == last["reused_tokens"]
        assert r1["choices"][0]["text"] == r2["choices"][0]["text"]
        assert last["output"] == reference(p, 8)
