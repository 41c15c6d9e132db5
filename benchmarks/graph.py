"""TTFT through a real Dynamo graph, with the shared vua-nixl store vs without it, in one run.

Workload (the same prompts for both configurations):

* shared documents: ``--docs`` documents of ~``--doc-tokens`` tokens; each is asked
  ``1 + --repeats`` different short questions. The first question of a document is *cold*; the
  others share the document prefix (*repeat*);
* multi-turn: ``--sessions`` chats of ``--turns`` turns on a further document, each turn's prompt
  being the previous prompt + the model's answer + a new question (turns after the first are
  *repeat* requests too).

Prompts are *not* chunk multiples: documents are text (their token counts fall anywhere in a
256-token chunk) and every prompt ends with a question; the summary lists each repeat's
``prompt_tokens % chunk``. Repeat TTFT is reported separately for the document questions and
for the chat turns: each turn is timed with ``--max-tokens`` (1) like every request, then the
same prompt is sent once more, untimed, for a ``--reply-tokens`` reply; the next turn is the
previous prompt + that reply's text + a new question.

Then, on the store graph, throughput: ``--concurrency`` levels (default 1, 4, 8), each sending that
many requests at once (distinct ~``--tput-prompt-tokens``-token prompts, ``--tput-tokens``
generated tokens each, ``ignore_eos``); tokens/s = completion tokens / wall time of the level.
The decode worker batches concurrent sequences (``--max-batch``, one forward per step).

Each configuration runs its own graph: the stock frontend (``--router-mode kv``), 2 prefill
workers and 1 decode worker. Both graphs run side by side and every request is sent to each in
turn (same background load). Requests are sent one at a time with ``stream: true``; TTFT is the
time to the first streamed chunk, and with the default ``--max-tokens 1`` also the request's
latency (the frontend can hold a chunk back while detokenizing; one token removes that effect).
Prefill tokens computed are read from the prefill workers' counters. The script re-executes itself in a private network namespace (``unshare -n``) because
Dynamo's ZMQ event plane binds 0.0.0.0.

    python benchmarks/graph.py --model qwen2-0.5b            # the issue's target: >= 5x p50 on repeats
    python benchmarks/graph.py --model tiny --doc-tokens 512  # seconds, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dynamo_components.graph import (  # noqa: E402
    Graph,
    GraphSpec,
    in_private_netns,
    netns_available,
    netns_command,
    resolve_model_dir,
)

log = logging.getLogger("benchmarks.graph")


def make_text(seed: int, approx_tokens: int, tokenizer: Any) -> str:
    """Deterministic English-like text of about ``approx_tokens`` tokens."""
    from vua_nixl_engine.text import paragraph

    rng = random.Random(seed)
    parts: list[str] = []
    while len(tokenizer.encode(" ".join(parts)).ids) < approx_tokens:
        parts.append(paragraph(rng, 3))
    return " ".join(parts)


def question(seed: int) -> str:
    from vua_nixl_engine.text import sentence

    return "\n\nQuestion: " + sentence(random.Random(10_000 + seed)) + "\nAnswer:"


def stream_completion(url: str, model: str, prompt: str, max_tokens: int, timeout: float = 600,
                      **extra: Any) -> dict[str, Any]:
    """POST a streaming completion; return ttft, total time, text and usage."""
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}, **extra,
    }
    req = urllib.request.Request(
        f"{url}/completions", data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    t0 = time.perf_counter()
    ttft = None
    text, usage = [], None
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("choices"):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(chunk["choices"][0].get("text") or "")
            if chunk.get("usage"):
                usage = chunk["usage"]
    total = time.perf_counter() - t0
    return {"ttft_s": ttft if ttft is not None else total, "total_s": total, "text": "".join(text), "usage": usage or {}}


def build_workload(args: argparse.Namespace, tokenizer: Any) -> list[tuple[str, str, str | None]]:
    """(kind, prompt-or-prefix, question) items; multi-turn items are expanded while running."""
    items: list[tuple[str, str, str | None]] = []
    for d in range(args.docs):
        doc = make_text(100 + d, args.doc_tokens, tokenizer)
        for q in range(1 + args.repeats):
            items.append(("cold" if q == 0 else "repeat", doc, question(d * 100 + q)))
    for s in range(args.sessions):
        doc = make_text(900 + s, args.doc_tokens, tokenizer)
        items.append(("session", doc, None))
    return items


def prefill_computed(graph: Graph) -> int:
    return sum(int(graph.worker_stats(n).get("computed_tokens", 0)) for n in graph.workers("prefill", alive=False))


def start_graph(args: argparse.Namespace, name: str, use_store: bool, base: Path) -> tuple[Graph, float]:
    spec = GraphSpec(
        model=args.model, work_dir=str(base / name), prefill=2, decode=1, no_store=not use_store, http_port=0,
        chunk_tokens=args.chunk_tokens, block_size=16, handoff=args.handoff if use_store else "nixl",
        max_num_seqs=2, kv_cache_tokens=args.kv_cache_tokens, threads_per_worker=args.threads,
        hot_cache_mb=args.hot_cache_mb, namespace=f"bench{name.replace('-', '')}", max_batch=args.max_batch,
    )
    graph = Graph(spec)
    t0 = time.perf_counter()
    try:
        graph.start()
        graph.wait_ready(timeout=args.startup_timeout)
    except BaseException:
        graph.stop()
        raise
    startup = time.perf_counter() - t0
    log.info("[%s] graph up in %.1f s at %s", name, startup, graph.url)
    stream_completion(graph.url, graph.model_name, "Warm-up request.", 1)
    return graph, startup


def run_interleaved(args: argparse.Namespace, configs: list[tuple[str, bool]], workload, base: Path) -> list[dict[str, Any]]:
    """Start every configuration's graph, then send each request to each graph in turn.

    Interleaving puts both configurations under the same background load (this machine is
    shared), so their difference is the store's, not the neighbours'. Idle workers cost ~1% CPU.
    """
    graphs: dict[str, Graph] = {}
    out: dict[str, dict[str, Any]] = {}
    try:
        for name, use_store in configs:
            g, startup = start_graph(args, name, use_store, base)
            graphs[name] = g
            out[name] = {"config": name, "startup_s": startup, "rows": [], "computed0": prefill_computed(g)}

        def send(kind: str, source: str, prompt_for: dict[str, str]) -> None:
            for name, g in graphs.items():
                r = stream_completion(g.url, g.model_name, prompt_for[name], args.max_tokens)
                r["token_ids"] = list((g.worker_stats("decode-0").get("last") or {}).get("output") or [])
                row = _row(kind, source, r)
                out[name]["rows"].append(row)
                log.info("[%s] %s ttft %.3f s (total %.3f s) prompt %d cached %d", name, kind, row["ttft_s"],
                         row["total_s"], row["prompt_tokens"], row["cached_tokens"])
                if source == "turn" and args.reply_tokens > 0:
                    # the assistant's reply (untimed; the timed request above measured TTFT with
                    # --max-tokens): the decode worker saves prompt + reply KV when it ends
                    r = stream_completion(g.url, g.model_name, prompt_for[name], args.reply_tokens)
                if source == "turn":
                    prompt_for[name] = prompt_for[name] + (r["text"] or ANSWER)

        for kind, prefix, q in workload:
            if kind == "session":
                prompts = {n: prefix for n in graphs}
                for turn in range(args.turns):
                    prompts = {n: p + question(50_000 + turn) for n, p in prompts.items()}
                    send("cold" if turn == 0 else "repeat", "turn", prompts)
            else:
                send(kind, "doc", {n: prefix + (q or "") for n in graphs})
        time.sleep(1.0)  # stats files are rewritten after each request; let the last one land
        for name, g in graphs.items():
            res = out[name]
            res["prefill_tokens_computed"] = prefill_computed(g) - res.pop("computed0")
            res["prompt_tokens"] = sum(r["prompt_tokens"] for r in res["rows"])
        if args.concurrency and "store" in graphs:
            for name, g in list(graphs.items()):
                if name != "store":  # leave the store graph alone on the cores
                    g.stop()
                    graphs.pop(name)
            out["store"]["throughput"] = throughput(args, graphs["store"])
    finally:
        for g in graphs.values():
            g.stop()
    return [out[n] for n, _ in configs if n in out]


def throughput(args: argparse.Namespace, g: Graph) -> list[dict[str, Any]]:
    """Tokens/s with 1, 4, 8... concurrent requests on one graph (distinct prompts)."""
    import concurrent.futures

    from vua_nixl_engine.text import sentence

    rows = []
    seed = 0
    for c in args.concurrency:
        prompts = []
        for _ in range(c):
            seed += 1
            rng = random.Random(70_000 + seed)
            prompts.append(" ".join(sentence(rng) for _ in range(max(1, args.tput_prompt_tokens // 24))))
        before = g.worker_stats("decode-0")
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(c) as pool:
            res = list(pool.map(lambda p: stream_completion(
                g.url, g.model_name, p, args.tput_tokens, min_tokens=args.tput_tokens, ignore_eos=True), prompts))
        wall = time.perf_counter() - t0
        time.sleep(0.5)
        after = g.worker_stats("decode-0")
        toks = sum(int(r["usage"].get("completion_tokens") or 0) for r in res)
        row = {
            "concurrency": c, "requests": c, "completion_tokens": toks, "wall_s": wall, "tokens_per_s": toks / wall,
            "mean_latency_s": sum(r["total_s"] for r in res) / c, "ttft_p50_s": pct([r["ttft_s"] for r in res], 0.5),
            "prompt_tokens_mean": sum(int(r["usage"].get("prompt_tokens") or 0) for r in res) / c,
            "decode_steps": int(after.get("decode_steps", 0)) - int(before.get("decode_steps", 0)),
            "decode_batch_max": int(after.get("decode_batch_max", 0)),
        }
        rows.append(row)
        log.info("[throughput] concurrency %d: %d tokens in %.2f s = %.1f tok/s (%d decode steps)",
                 c, toks, wall, row["tokens_per_s"], row["decode_steps"])
    return rows


#: appended as the "answer" of a chat turn when the model's reply is empty (1-token replies)
ANSWER = " The answer is in the second paragraph of the document."


def _row(kind: str, source: str, r: dict[str, Any]) -> dict[str, Any]:
    u = r["usage"]
    return {
        "kind": kind, "source": source, "ttft_s": r["ttft_s"], "total_s": r["total_s"],
        "prompt_tokens": int(u.get("prompt_tokens") or 0),
        "cached_tokens": int(((u.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0),
        "text": r["text"],
        "token_ids": r.get("token_ids") or [],
    }


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(results: list[dict[str, Any]], chunk: int = 256) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for res in results:
        cfg = res["config"]
        out[cfg] = {"prefill_tokens_computed": res["prefill_tokens_computed"], "prompt_tokens": res["prompt_tokens"]}
        for kind in ("cold", "repeat"):
            t = [r["ttft_s"] for r in res["rows"] if r["kind"] == kind]
            out[cfg][kind] = {"n": len(t), "ttft_p50_s": pct(t, 0.5), "ttft_p90_s": pct(t, 0.9),
                              "cached_tokens": sum(r["cached_tokens"] for r in res["rows"] if r["kind"] == kind)}
        for source, label in (("doc", "repeat_doc"), ("turn", "repeat_chat")):
            rows = [r for r in res["rows"] if r["kind"] == "repeat" and r["source"] == source]
            t = [r["ttft_s"] for r in rows]
            out[cfg][label] = {"n": len(t), "ttft_p50_s": pct(t, 0.5), "ttft_p90_s": pct(t, 0.9),
                               "prompt_tokens": [r["prompt_tokens"] for r in rows],
                               "prompt_mod_chunk": [r["prompt_tokens"] % chunk for r in rows],
                               "cached_tokens": [r["cached_tokens"] for r in rows]}
        if res.get("throughput"):
            out[cfg]["throughput"] = res["throughput"]
    if "store" in out and "no-store" in out:
        out["repeat_p50_speedup"] = out["no-store"]["repeat"]["ttft_p50_s"] / out["store"]["repeat"]["ttft_p50_s"]
        out["repeat_p90_speedup"] = out["no-store"]["repeat"]["ttft_p90_s"] / out["store"]["repeat"]["ttft_p90_s"]
        for label in ("repeat_doc", "repeat_chat"):
            a, b = out["no-store"][label]["ttft_p50_s"], out["store"][label]["ttft_p50_s"]
            out[f"{label}_p50_speedup"] = a / b if b == b and b > 0 else float("nan")
        # compare token ids (the decode worker's record); an empty output is never "identical"
        pairs = list(zip(results[0]["rows"], results[1]["rows"]))
        same = [bool(a["token_ids"]) and a["token_ids"] == b["token_ids"] for a, b in pairs]
        out["identical_outputs"] = f"{sum(same)}/{len(same)}"
        out["empty_outputs"] = sum(1 for a, b in pairs for r in (a, b) if not r["token_ids"] or not r["text"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2-0.5b", help="preset or model directory")
    p.add_argument("--docs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="further questions per document")
    p.add_argument("--sessions", type=int, default=1)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--doc-tokens", type=int, default=1536)
    p.add_argument("--max-tokens", type=int, default=1,
                   help="tokens per request; 1 makes the request's latency its TTFT (the frontend may hold back "
                        "the first streamed chunk while detokenizing a random-weight model's output)")
    p.add_argument("--reply-tokens", type=int, default=24, help="generated tokens per chat turn (the reply the next "
                   "turn carries)")
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 8],
                   help="throughput levels (concurrent requests) on the store graph; none to skip")
    p.add_argument("--tput-tokens", type=int, default=32, help="generated tokens per throughput request")
    p.add_argument("--tput-prompt-tokens", type=int, default=128, help="approximate throughput prompt length")
    p.add_argument("--max-batch", type=int, default=None, help="workers' --max-batch (default: the worker's, 8)")
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--handoff", choices=("store", "nixl"), default="nixl",
                   help="hand-off of the store configuration (the no-store baseline always uses nixl)")
    p.add_argument("--kv-cache-tokens", type=int, default=16384)
    p.add_argument("--hot-cache-mb", type=int, default=0,
                   help="workers' own prefix cache; 0 (default) isolates the shared store's effect")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS per worker")
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument("--out", default=None, help="write the JSON results here")
    p.add_argument("--only", choices=("store", "no-store"), default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not in_private_netns():
        ok, why = netns_available()
        if not ok:
            log.error("needs a private network namespace: %s", why)
            return 2
        return subprocess.call(netns_command([sys.executable, str(Path(__file__).resolve()), *(argv or sys.argv[1:])]))

    model_dir = resolve_model_dir(args.model)
    args.model = model_dir
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    workload = build_workload(args, tokenizer)
    configs = [(n, u) for n, u in (("store", True), ("no-store", False)) if not args.only or args.only == n]
    with tempfile.TemporaryDirectory(prefix="vua-bench-graph-") as td:
        results = run_interleaved(args, configs, workload, Path(td))
    summary = summarize(results, args.chunk_tokens)
    summary["params"] = {k: v for k, v in vars(args).items() if k != "out"}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
