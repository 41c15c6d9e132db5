#!/usr/bin/env python3
"""TTFT of `vllm serve` with and without the vua-nixl store (GPU host; cannot run on CPU).

    python benchmarks/vllm_gpu_ttft.py --model Qwen/Qwen2.5-0.5B-Instruct --store-root /mnt/kv \
        --prompt-tokens 2048 8192 32768 --out results/vllm_ttft.json

For each prompt length it measures, on fresh server processes (so vLLM's own GPU prefix cache
cannot help):

  baseline   vllm serve without a connector: the prompt is computed (median of --repeats);
  cold       vllm serve with VuaNixlConnector, first time: computed, then saved to the store;
  warm       a *new* vllm serve with VuaNixlConnector: the prompt's KV is loaded from the store.

vLLM's prefix caching is disabled in all runs (``--no-enable-prefix-caching``) so every number
is either "computed" or "loaded from the store". TTFT is the time from sending a streaming
``/v1/completions`` request (prompt given as token ids, ``max_tokens=1``) to its first chunk.
Needs: a CUDA GPU, vLLM and this repo installed in the same Python (``pip install -e .``),
NIXL, and a store root on the file system you want to measure (GDS needs a block-backed FS).
Prints one JSON document; ``--out`` writes it too.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def connector_config(store_root: str, chunk_tokens: int) -> str:
    return json.dumps({
        "kv_connector": "VuaNixlConnector",
        "kv_connector_module_path": "dynamo_components.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"store_root": store_root, "chunk_tokens": chunk_tokens},
    })


class Server:
    def __init__(self, args: argparse.Namespace, with_store: bool, log: Path) -> None:
        cmd = [args.vllm, "serve", args.model, "--port", str(args.port), "--host", "127.0.0.1",
               "--block-size", str(args.block_size), "--no-enable-prefix-caching",
               "--max-model-len", str(max(args.prompt_tokens) + 64),
               "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
        if with_store:
            cmd += ["--kv-transfer-config", connector_config(args.store_root, args.chunk_tokens)]
        cmd += args.extra
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.port = args.port
        deadline = time.monotonic() + args.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        self.close()
        raise RuntimeError(f"vllm serve did not become healthy in {args.start_timeout} s; see {log}")

    def ttft(self, model: str, tokens: list[int]) -> float:
        body = json.dumps({"model": model, "prompt": tokens, "max_tokens": 1, "stream": True,
                           "temperature": 0.0}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
        while True:
            line = resp.fp.readline()
            if not line:
                raise RuntimeError("stream ended without a token")
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                elapsed = time.perf_counter() - t0
                break
        resp.read()
        conn.close()
        return elapsed

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def wait_saved(store_root: str, n_chunks: int, timeout: float = 120.0) -> int:
    """Saves land after the request finished (asynchronously): wait for the chunk files."""
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        count = sum(1 for _ in Path(store_root).glob("ns/*/*/*/*.kvb"))
        if count >= n_chunks:
            return count
        time.sleep(0.5)
    return count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--store-root", required=True, help="an empty directory on the file system to measure")
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--start-timeout", type=float, default=900.0)
    ap.add_argument("--vllm", default=shutil.which("vllm") or "vllm")
    ap.add_argument("--vocab", type=int, default=20000, help="token ids are drawn from [100, vocab)")
    ap.add_argument("--logs", default="results/vllm_ttft_logs")
    ap.add_argument("--out")
    ap.add_argument("extra", nargs="*", help="extra vllm serve arguments (after --)")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("vllm_gpu_ttft.py needs a CUDA GPU (vLLM's wheels have no CPU kernels)", file=sys.stderr)
        return 2
    root = Path(args.store_root)
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        print(f"--store-root {root} must be empty (cold runs must miss)", file=sys.stderr)
        return 2
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    prompts = {n: [rng.randrange(100, args.vocab) for _ in range(n)] for n in args.prompt_tokens}
    result: dict = {"model": args.model, "gpu": torch.cuda.get_device_name(0), "store_root": str(root),
                    "block_size": args.block_size, "chunk_tokens": args.chunk_tokens, "runs": {}}

    srv = Server(args, with_store=False, log=logs / "baseline.log")
    try:
        for n, toks in prompts.items():
            srv.ttft(args.model, toks[:64])  # warm-up (CUDA graphs, allocator)
            result["runs"].setdefault(str(n), {})["baseline_s"] = statistics.median(
                srv.ttft(args.model, toks) for _ in range(args.repeats))
    finally:
        srv.close()

    srv = Server(args, with_store=True, log=logs / "cold.log")
    try:
        srv.ttft(args.model, [rng.randrange(100, args.vocab) for _ in range(32)])  # warm-up, below one chunk
        for n, toks in prompts.items():
            result["runs"][str(n)]["cold_s"] = srv.ttft(args.model, toks)
    finally:
        want = sum(n // args.chunk_tokens for n in prompts)
        result["chunks_saved"] = wait_saved(str(root), want)
        srv.close()

    for rep in range(args.repeats):
        srv = Server(args, with_store=True, log=logs / f"warm{rep}.log")  # a fresh engine each time
        try:
            srv.ttft(args.model, [rng.randrange(100, args.vocab) for _ in range(32)])
            for n, toks in prompts.items():
                result["runs"][str(n)].setdefault("warm_s", []).append(srv.ttft(args.model, toks))
        finally:
            srv.close()
    for row in result["runs"].values():
        row["warm_median_s"] = statistics.median(row["warm_s"])
        row["speedup_vs_baseline"] = row["baseline_s"] / row["warm_median_s"]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
