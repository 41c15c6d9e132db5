"""A Dynamo worker + KvRouter that relays a vLLM engine's KV events (run in a private netns).

    python router_probe.py EVENTS_ENDPOINT BLOCK_SIZE TOKENS_JSON WORKDIR

Registers one "vLLM worker" with Dynamo (file discovery, TCP request plane, ZMQ event plane),
attaches Dynamo's ``KvEventPublisher`` in relay mode to the engine's ZMQ event endpoint (exactly
what ``python -m dynamo.vllm --kv-events-config`` does), writes ``WORKDIR/ready`` and then waits
until the router's overlap scores for TOKENS show the worker's blocks; prints them as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path


async def main(endpoint: str, block: int, tokens: list[int], work: Path) -> dict:
    from dynamo.llm import KvEventPublisher, KvRouter, KvRouterConfig, ModelInput, ModelType, WorkerType, register_model
    from dynamo.runtime import DistributedRuntime

    loop = asyncio.get_running_loop()
    rt = DistributedRuntime(loop, "file", "tcp", event_plane="zmq")
    ep = rt.endpoint("vllmtest.backend.generate")

    async def gen(request, context=None):
        yield {"token_ids": [1], "finish_reason": "stop"}

    asyncio.ensure_future(ep.serve_endpoint(gen))
    await register_model(ModelInput.Tokens, ModelType.Completions, ep, "vllmtest", "vllmtest",
                         worker_type=WorkerType.Aggregated, kv_cache_block_size=block, skip_model_assets=True)
    pub = KvEventPublisher(ep, kv_block_size=block, enable_local_indexer=True, zmq_endpoint=endpoint)
    rrt = DistributedRuntime(loop, "file", "tcp", event_plane="zmq")
    router = KvRouter(rrt.endpoint("vllmtest.backend.generate"), block, KvRouterConfig())
    wid = ep.connection_id()
    (work / "ready").write_text("1")
    want = len(tokens) // block
    deadline = time.monotonic() + float(os.environ.get("PROBE_TIMEOUT", "60"))
    row: dict = {}
    while time.monotonic() < deadline:
        scores = await router.get_overlap_scores(tokens)
        row = {w["worker_id"]: w for w in scores["workers"]}.get(wid, {})
        if row.get("disk_blocks", 0) >= want:
            break
        await asyncio.sleep(0.2)
    best = await router.best_worker(tokens)
    del pub
    rt.shutdown()
    rrt.shutdown()
    return {"row": {k: v for k, v in row.items() if isinstance(v, (int, float, str))}, "best": list(best)[:1] == [wid]}


if __name__ == "__main__":
    ep, blk, toks, work = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), Path(sys.argv[4])
    os.environ.update(DYN_FILE_KV=str(work / "discovery"), DYN_TCP_RPC_HOST="127.0.0.1",
                      DYN_EVENT_PLANE_HOST="127.0.0.1", DYN_SYSTEM_HOST="127.0.0.1")
    print("PROBE " + json.dumps(asyncio.run(main(ep, blk, toks, work))), flush=True)
    os._exit(0)  # the runtime's threads would keep the process alive
