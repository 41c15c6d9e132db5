"""Shared-tier KV events: from the connector, through vLLM's real ZMQ publisher, to Dynamo's router."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import zmq
from test_vllm_connector import engine, prompt

from dynamo_components.vllm.events import chained_block_hashes

HERE = Path(__file__).parent
BLOCK = 16


def _drain(sub: zmq.Socket, timeout: float = 5.0) -> list[dict]:
    """Every event on the socket: frames [topic, seq, msgpack([ts, [event, ...], dp_rank])]."""
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sub.poll(200):
            if events:
                break
            continue
        topic, seq, payload = sub.recv_multipart()
        assert topic == b"kv-events" and len(seq) == 8
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        events.extend(batch[1])
    return events


def _sub(endpoint: str) -> zmq.Socket:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    return sub


def test_events_reach_vllms_zmq_publisher_as_the_shared_tier(model_dir, store_root, tmp_path):
    p = prompt(21, 100)
    endpoint = f"ipc://{tmp_path}/kv-events-1.sock"
    sub = _sub(endpoint)
    e = engine(model_dir, store_root, seed=21, events_endpoint=endpoint)
    try:
        time.sleep(0.5)  # ZMQ slow joiner: let the SUB attach to the freshly bound PUB
        e.add("a", p)
        e.run()
        evs = _drain(sub)
        # vLLM's own prefix-cache events (medium GPU) travel on the same stream
        assert {x.get("medium") for x in evs} == {"GPU", "EXTERNAL"}
        stored = [x for x in evs if x.get("medium") == "EXTERNAL"]
        assert [x["type"] for x in stored] == ["BlockStored"]
        ev = stored[0]
        assert ev["block_size"] == BLOCK and ev["parent_block_hash"] is None
        assert ev["token_ids"] == p[:96]
        assert ev["block_hashes"] == chained_block_hashes(p[:96], BLOCK)
    finally:
        e.close()
        sub.close(0)

    # A load that comes up short (chunk 2 evicted after the lookup) announces what it loaded,
    # withdraws what it could not read, and the recomputed chunk is announced again once saved.
    endpoint = f"ipc://{tmp_path}/kv-events-2.sock"
    sub = _sub(endpoint)
    e = engine(model_dir, store_root, seed=22, events_endpoint=endpoint)
    try:
        time.sleep(0.5)
        store = e.connector._scheduler.stores[0]
        victim = Path(store.block_path(store.keys_for(p)[2]))

        def evict(out):
            if out.kv_connector_metadata.loads and victim.exists():
                victim.unlink()

        q = p[:96] + prompt(22, 10)
        e.add("b", q)
        e.run(after_schedule=evict)
        evs = [x for x in _drain(sub) if x.get("medium") == "EXTERNAL"]
        h = chained_block_hashes(q[:96], BLOCK)
        assert [x["type"] for x in evs] == ["BlockStored", "BlockRemoved", "BlockStored"]
        assert evs[0]["block_hashes"] == h[:4] and evs[0]["token_ids"] == q[:64]
        assert evs[1]["block_hashes"] == h[4:6]
        assert evs[2]["block_hashes"] == h[4:6] and evs[2]["parent_block_hash"] == h[3]
        assert evs[2]["token_ids"] == q[64:96]
    finally:
        e.close()
        sub.close(0)


def test_block_ids_match_dynamos_own_hashing():
    pytest.importorskip("dynamo.llm")
    from dynamo_components.kv_events import chained_block_hashes as dynamo_chain

    p = prompt(23, 200)
    assert chained_block_hashes(p, BLOCK) == dynamo_chain(p, BLOCK)
    assert chained_block_hashes(p, 32) == dynamo_chain(p, 32)


def _netns_ok() -> str | None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare/ip not available"
    r = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    return None if r.returncode == 0 else f"cannot create a network namespace: {r.stderr.decode().strip()}"


def test_dynamo_router_credits_the_engines_events_as_external_tier(model_dir, store_root, tmp_path):
    """Dynamo's ``KvEventPublisher`` in relay mode (what ``dynamo.vllm --kv-events-config`` runs)
    subscribes to the engine's ZMQ events; a ``KvRouter`` then scores the stored prefix on the
    worker's disk/external tier. The Dynamo side runs in a private network namespace (its event
    plane binds 0.0.0.0); the engine's ipc:// socket is a file, so it crosses namespaces."""
    pytest.importorskip("dynamo.llm")
    why = _netns_ok()
    if why:
        pytest.skip(why)
    endpoint = f"ipc://{tmp_path}/kv-events.sock"
    p = prompt(24, 100)
    work = tmp_path / "probe"
    work.mkdir()
    cmd = f'ip link set lo up && exec "{sys.executable}" "{HERE / "router_probe.py"}" "{endpoint}" {BLOCK} ' \
          f"'{json.dumps(p[:96])}' \"{work}\""
    e = engine(model_dir, store_root, seed=24, events_endpoint=endpoint)  # binds the PUB socket first
    probe = None
    try:
        probe = subprocess.Popen(["unshare", "-n", "sh", "-c", cmd], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 90
        while not (work / "ready").exists():
            assert probe.poll() is None, probe.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "router probe did not start"
            time.sleep(0.2)
        time.sleep(1.0)  # the relay's SUB has attached
        e.add("a", p)
        e.run()
        out, err = probe.communicate(timeout=90)
    finally:
        e.close()
        if probe is not None and probe.poll() is None:
            probe.kill()
            probe.wait()
    lines = [ln for ln in out.splitlines() if ln.startswith("PROBE ")]
    assert lines, err[-3000:]
    res = json.loads(lines[-1][len("PROBE "):])
    assert res["row"].get("disk_blocks") == 96 // BLOCK, res  # 6 blocks credited on the external tier
    # vLLM's own prefix-cache events (medium GPU) are relayed too: the engine still holds the blocks
    assert res["row"].get("device_blocks") == 96 // BLOCK
    assert res["best"]
