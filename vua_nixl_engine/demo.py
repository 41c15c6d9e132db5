"""`vua-nixl demo`: time to first token with and without the store on the workloads this
product exists for.

Two scripted workloads share one model and one store:

* **RAG**: one long document, several different questions about it. The document's KV is
  computed once (first question) and loaded from the store for every later question.
* **Multi-turn chat**: every turn resends the whole history plus a new user message; the
  history's KV comes from the store, only the new message is computed.

Each request runs twice on the same engine: once as a plain prefill (no lookup, no save: the
baseline TTFT) and once through the store. Both generate the same number of greedy tokens and
the outputs are compared, so the demo also shows that reuse changes nothing but the latency.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vua_nixl.dtypes import torch_dtype
from vua_nixl_engine.engine import Engine
from vua_nixl_engine.modeldir import load_model_dir, make_model_dir
from vua_nixl_engine.text import paragraph

log = logging.getLogger(__name__)

QUESTIONS = (
    "Which team owns the storage tier described above, and what is its latency budget?",
    "Summarize the eviction policy in two sentences.",
    "What happens to a request when the shared prefix is not in the cache?",
    "List every number mentioned in the document and what it refers to.",
    "How does the document say bandwidth and throughput relate to cost?",
    "Which requests would benefit most from reuse, according to the text?",
    "What are the risks of a cache miss during a release?",
    "Give a one-line title for this document.",
)

SYSTEM = "You are a helpful assistant. Answer using only the provided document."


@dataclass
class DemoOptions:
    model: str | None = None  # local model directory; overrides preset
    preset: str = "qwen2-0.5b"
    store: Path | None = None
    out: Path = Path("results/demo")
    backend: str = "POSIX"
    chunk_tokens: int = 64
    doc_tokens: int = 1536
    questions: int = 4
    turns: int = 5
    turn_tokens: int = 120
    reply_tokens: int = 100
    system_tokens: int = 300
    max_new_tokens: int = 4
    keep_store: bool = False
    seed: int = 0
    dtype: str | None = None  # run the model (and store its KV) in this dtype; default: the model's


@dataclass
class RequestResult:
    name: str
    kind: str  # "rag" or "chat"
    prompt_tokens: int
    reused_tokens: int
    computed_tokens: int
    ttft_store_s: float
    ttft_nostore_s: float
    speedup: float
    load_s: float
    lookup_s: float
    compute_s: float
    save_s: float  # write-behind time to flush this request's new chunks (after its first token)
    same_output: bool  # greedy tokens equal with and without the store
    first_logits_max_diff: float  # max |logit| difference at the first token, store vs no store
    output_tokens: list[int] = field(default_factory=list)


def _text_of_tokens(engine: Engine, seed: int, tokens: int) -> str:
    """Whole paragraphs of synthetic text adding up to about ``tokens`` tokens."""
    rng = random.Random(seed)
    parts: list[str] = []
    count = 0
    while count < tokens:
        p = paragraph(rng, rng.randint(3, 6))
        parts.append(p)
        count += len(engine.encode(p + "\n\n"))
    return "\n\n".join(parts)


def _prompt_ids(engine: Engine, messages: list[dict[str, str]]) -> list[int]:
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return engine.encode(text)


def _run_request(engine: Engine, name: str, kind: str, ids: list[int], max_new: int) -> RequestResult:
    # The store run goes first, so any warm-up effect favours the baseline (a conservative speedup).
    gen = engine.generate(ids, max_new, stop_at_eos=False)
    t0 = time.perf_counter()
    engine.flush()
    save_s = time.perf_counter() - t0
    base = engine.generate(ids, max_new, use_store=False, save=False, stop_at_eos=False)
    p = gen.prefill
    return RequestResult(
        name=name,
        kind=kind,
        prompt_tokens=len(ids),
        reused_tokens=gen.reused_tokens,
        computed_tokens=gen.computed_tokens,
        ttft_store_s=gen.ttft_s,
        ttft_nostore_s=base.ttft_s,
        speedup=base.ttft_s / gen.ttft_s if gen.ttft_s > 0 else float("inf"),
        load_s=p.load_s if p else 0.0,
        lookup_s=p.lookup_s if p else 0.0,
        compute_s=p.compute_s if p else 0.0,
        save_s=save_s,
        same_output=gen.token_ids == base.token_ids,
        first_logits_max_diff=float((gen.prefill.logits - base.prefill.logits).abs().max()) if gen.prefill and base.prefill else 0.0,
        output_tokens=gen.token_ids,
    )


def write_chart(results: list[RequestResult], path: Path, title: str) -> None:
    """TTFT vs prompt length, with and without the store (PNG, matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    chat = [r for r in results if r.kind == "chat"]
    rag = [r for r in results if r.kind == "rag"]
    if chat:  # the chat's prompt grows turn by turn: a curve
        x = [r.prompt_tokens for r in chat]
        ax.plot(x, [r.ttft_nostore_s for r in chat], "s-", color="tab:red", label="chat turns: no store (full prefill)")
        ax.plot(x, [r.ttft_store_s for r in chat], "s-", color="tab:green", label="chat turns: with vua-nixl store")
    if rag:  # RAG questions share one document: a cluster of points at one length
        x = [r.prompt_tokens for r in rag]
        ax.scatter(x, [r.ttft_nostore_s for r in rag], marker="o", s=60, facecolors="none", edgecolors="tab:red",
                   label="RAG questions: no store")
        ax.scatter(x, [r.ttft_store_s for r in rag], marker="o", s=60, color="tab:green", label="RAG questions: with store")
        first = rag[0]
        ax.annotate("1st question:\ncomputes + saves\nthe document", (first.prompt_tokens, first.ttft_store_s),
                    textcoords="offset points", xytext=(-150, -30), fontsize=7, arrowprops={"arrowstyle": "->", "lw": 0.6})
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("time to first token (s)")
    ax.set_title("TTFT vs prompt length")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    names = [r.name for r in results]
    bars = ax2.barh(range(len(results)), [r.speedup for r in results],
                    color=["tab:blue" if r.kind == "rag" else "tab:purple" for r in results])
    for bar, r in zip(bars, results):
        ax2.annotate(f"{r.speedup:.1f}x  ({r.reused_tokens}/{r.prompt_tokens} reused)", (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                     xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    ax2.set_xlim(0, max(r.speedup for r in results) * 1.6)
    ax2.set_yticks(range(len(results)), names, fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xlabel("TTFT speedup with store (x)")
    ax2.axvline(1.0, color="gray", linewidth=0.8)
    ax2.grid(True, axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(opts: DemoOptions) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from vua_nixl import KVStore

    console = Console(width=None if sys.stdout.isatty() else 132)
    t_start = time.perf_counter()
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)

    # 1. model: a user directory, or a preset built once and cached under OUT/models/
    if opts.model:
        model_dir = Path(opts.model)
    else:
        model_dir = out / "models" / f"{opts.preset}-seed{opts.seed}"
        with console.status(f"building model preset {opts.preset} (random weights, seed {opts.seed}) ..."):
            make_model_dir(opts.preset, model_dir, seed=opts.seed)
    with console.status(f"loading {model_dir} ..."):
        loaded = load_model_dir(model_dir, dtype=torch_dtype(opts.dtype) if opts.dtype else None)
    engine = Engine(loaded)
    console.print(
        f"[bold]model[/] {model_dir}  ({engine.num_layers} layers, {engine.kv_heads} KV heads x {engine.head_dim}, "
        f"{engine.namespace.dtype}, {engine.kv_bytes_per_token() / 1024:.1f} KiB KV per token, torch threads {torch.get_num_threads()})"
    )

    # 2. store
    default_store = opts.store is None
    store_root = out / "store" if default_store else opts.store
    if default_store and not opts.keep_store and store_root.exists():
        shutil.rmtree(store_root)
    store = KVStore(store_root, engine.namespace, chunk_tokens=opts.chunk_tokens, backend=opts.backend)
    engine.attach_store(store)
    backend = store.stats().get("backend", opts.backend)
    console.print(f"[bold]store[/] {store_root}  (NIXL backend {backend}, {opts.chunk_tokens}-token chunks)")

    # Warm-up at a realistic length, through the whole store path (lookup, compute, write-behind),
    # then its chunks are deleted. Not measured. Besides kernels and allocator, this starts the
    # saver thread, whose first torch op makes libgomp count more threads than CPUs and stop
    # spin-waiting: on a busy 2-core machine spinning OpenMP threads make prefill several times
    # slower, so without this the first request would run in a different regime than the rest.
    with console.status("warming up ..."):
        warm = engine.encode(_text_of_tokens(engine, 99, opts.doc_tokens))
        engine.generate(warm, 2, use_store=False, save=False)
        engine.generate(warm, 2)
        engine.flush()
        store.delete(warm)

    # 3. workload
    doc = _text_of_tokens(engine, 1000 + opts.seed, opts.doc_tokens)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(opts.questions)]
    results: list[RequestResult] = []
    total = len(questions) + opts.turns
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("requests", total=total)
        for i, q in enumerate(questions):
            name = f"rag-q{i + 1}"
            progress.update(task, description=f"{name} (document + question)")
            msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Document:\n{doc}\n\nQuestion: {q}"}]
            r = _run_request(engine, name, "rag", _prompt_ids(engine, msgs), opts.max_new_tokens)
            results.append(r)
            progress.console.print(_row_line(r))
            progress.advance(task)
        # A replayed conversation: a long system prompt, then user turns and scripted replies.
        history: list[dict[str, str]] = [{"role": "system", "content": _text_of_tokens(engine, 3000, opts.system_tokens)}]
        for t in range(opts.turns):
            name = f"chat-t{t + 1}"
            progress.update(task, description=f"{name} (history + new message)")
            history.append({"role": "user", "content": _text_of_tokens(engine, 2000 + t, opts.turn_tokens)})
            ids = _prompt_ids(engine, history)
            if len(ids) + opts.max_new_tokens > engine.max_context:  # a small model's context is full
                progress.console.print(f"{name}: the conversation ({len(ids)} tokens) no longer fits the model's "
                                       f"context of {engine.max_context} tokens; the chat ends here")
                break
            r = _run_request(engine, name, "chat", ids, opts.max_new_tokens)
            history.append({"role": "assistant", "content": _text_of_tokens(engine, 4000 + t, opts.reply_tokens)})
            results.append(r)
            progress.console.print(_row_line(r))
            progress.advance(task)
    engine.flush()

    # 4. report
    table = Table(title="TTFT with and without the vua-nixl store")
    for col in ("request", "prompt", "reused", "computed", "TTFT no store", "TTFT store", "speedup", "load", "max|dlogit|", "same tokens"):
        table.add_column(col, justify="right" if col != "request" else "left", no_wrap=True)
    for r in results:
        table.add_row(
            r.name, str(r.prompt_tokens), str(r.reused_tokens), str(r.computed_tokens),
            f"{r.ttft_nostore_s * 1000:.0f} ms", f"{r.ttft_store_s * 1000:.0f} ms", f"{r.speedup:.1f}x",
            f"{r.load_s * 1000:.1f} ms", f"{r.first_logits_max_diff:.3g}", "yes" if r.same_output else "no",
        )
    console.print(table)
    hits = [r for r in results if r.reused_tokens]
    sum_base = sum(r.ttft_nostore_s for r in results)
    sum_store = sum(r.ttft_store_s for r in results)
    summary = {
        "requests": len(results),
        "requests_with_reuse": len(hits),
        "tokens_reused": sum(r.reused_tokens for r in results),
        "prompt_tokens": sum(r.prompt_tokens for r in results),
        "ttft_nostore_total_s": sum_base,
        "ttft_store_total_s": sum_store,
        "overall_speedup": sum_base / sum_store if sum_store else None,
        "median_speedup_on_hits": sorted(r.speedup for r in hits)[len(hits) // 2] if hits else None,
        "requests_with_same_tokens": sum(r.same_output for r in results),
        "max_first_logit_diff": max(r.first_logits_max_diff for r in results),
        "wall_s": time.perf_counter() - t_start,
    }
    meta = {
        "model_dir": str(model_dir),
        "namespace": {**engine.namespace.describe(), "layout": asdict(engine.namespace.layout)},
        "kv_bytes_per_token": engine.kv_bytes_per_token(),
        "store_root": str(store_root),
        "backend": backend,
        "chunk_tokens": opts.chunk_tokens,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "store_stats": store.stats(),
        "write_behind": asdict(engine.saver.stats) if engine.saver else None,
    }
    json_path = out / "demo.json"
    json_path.write_text(json.dumps({"summary": summary, "meta": meta, "requests": [asdict(r) for r in results]}, indent=2, default=str) + "\n")
    png_path = out / "demo_ttft.png"
    write_chart(results, png_path, f"{engine.namespace.model} on {platform.machine()} ({os.cpu_count()} CPUs), "
                f"NIXL {backend}, {opts.chunk_tokens}-token chunks")
    console.print(
        f"reused {summary['tokens_reused']} of {summary['prompt_tokens']} prompt tokens; total TTFT "
        f"{sum_base:.2f} s -> {sum_store:.2f} s ({summary['overall_speedup']:.1f}x)"
    )
    console.print(
        f"greedy tokens identical in {summary['requests_with_same_tokens']}/{len(results)} requests; first-token logits "
        f"within {summary['max_first_logit_diff']:.3g}. Loaded KV is bit-identical to what was saved; reuse vs "
        f"recompute differs only by {engine.namespace.dtype} rounding (computing a suffix alone vs inside the full "
        "prompt), which can flip a near-tie of this random-weights model (see docs/ENGINE.md)."
    )
    console.print(f"wrote {png_path} and {json_path} in {summary['wall_s']:.0f} s")
    engine.close()
    store.close()
    return 0


def _row_line(r: RequestResult) -> str:
    return (
        f"{r.name:8s} prompt {r.prompt_tokens:5d}  reused {r.reused_tokens:5d}  "
        f"TTFT {r.ttft_nostore_s * 1000:6.0f} -> {r.ttft_store_s * 1000:5.0f} ms "
        f"[bold]{r.speedup:5.1f}x[/] {'same tokens' if r.same_output else 'tokens differ'}"
    )
