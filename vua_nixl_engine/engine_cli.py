"""`vua-nixl make-model` and `vua-nixl demo`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _quiet_transformers() -> None:
    """transformers' own progress bars would interleave with ours."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover - cosmetic only
        pass


def cmd_make_model(args: argparse.Namespace) -> int:
    from vua_nixl_engine.errors import EngineError
    from vua_nixl_engine.modeldir import make_model_dir

    _quiet_transformers()
    try:
        path = make_model_dir(args.preset, args.out, seed=args.seed, overwrite=args.force)
    except EngineError as exc:
        log.error("%s", exc)
        return 2
    print(path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vua_nixl.errors import VuaNixlError
    from vua_nixl_engine.demo import DemoOptions, run_demo

    _quiet_transformers()
    opts = DemoOptions(
        dtype=args.dtype,
        model=args.model,
        preset=args.preset,
        store=Path(args.store) if args.store else None,
        out=Path(args.out),
        backend=args.backend,
        chunk_tokens=args.chunk_tokens,
        doc_tokens=args.doc_tokens,
        questions=args.questions,
        turns=args.turns,
        turn_tokens=args.turn_tokens,
        reply_tokens=args.reply_tokens,
        system_tokens=args.system_tokens,
        max_new_tokens=args.max_new_tokens,
        keep_store=args.keep_store,
        seed=args.seed,
    )
    try:
        return run_demo(opts)
    except VuaNixlError as exc:
        log.error("%s", exc)
        return 2


def register(sub: argparse._SubParsersAction) -> None:
    from vua_nixl_engine.presets import PRESETS

    p = sub.add_parser(
        "make-model",
        help="write a model directory (random weights, offline tokenizer) for a preset",
        description="Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json (with a "
        "chat template) and generation_config.json for a preset, e.g. for Dynamo's frontend to serve.",
    )
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model shape (default: tiny)")
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument("--seed", type=int, default=0, help="weights seed (same seed, same weights)")
    p.add_argument("--force", action="store_true", help="overwrite an existing directory")
    p.set_defaults(func=cmd_make_model)

    d = sub.add_parser(
        "demo",
        help="TTFT with and without the store on a RAG + multi-turn chat workload",
        description="Builds (or reuses) a model, opens a local store, and runs a scripted workload: "
        "several questions over one long document, then a chat whose history grows each turn. "
        "Prints prompt tokens, tokens reused, TTFT and speedup per request; writes a PNG chart and a JSON.",
    )
    src = d.add_mutually_exclusive_group()
    src.add_argument("--model", help="a local Hugging Face model directory to use instead of a preset")
    src.add_argument("--preset", default="qwen2-0.5b", choices=sorted(PRESETS), help="preset to build (default: qwen2-0.5b)")
    d.add_argument("--store", help="store root (default: OUT/store, emptied at start unless --keep-store)")
    d.add_argument("--out", default="results/demo", help="output directory (default: results/demo)")
    d.add_argument("--backend", default="POSIX", choices=["auto", "POSIX", "GDS", "GDS_MT"], help="NIXL backend (default: POSIX)")
    d.add_argument("--chunk-tokens", type=int, default=64, help="tokens per stored chunk (default: 64)")
    d.add_argument("--doc-tokens", type=int, default=1536, help="length of the shared RAG document (default: 1536)")
    d.add_argument("--questions", type=int, default=4, help="questions asked about the document (default: 4)")
    d.add_argument("--turns", type=int, default=5, help="chat turns (default: 5)")
    d.add_argument("--turn-tokens", type=int, default=120, help="tokens per user chat message (default: 120)")
    d.add_argument("--reply-tokens", type=int, default=100, help="tokens per replayed assistant reply (default: 100)")
    d.add_argument("--system-tokens", type=int, default=300, help="tokens in the chat's system prompt (default: 300)")
    d.add_argument("--max-new-tokens", type=int, default=4, help="tokens generated per request (default: 4)")
    d.add_argument("--keep-store", action="store_true", help="do not empty the default store first")
    d.add_argument("--seed", type=int, default=0, help="preset weights seed")
    d.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="model and KV dtype (default: the model's; float32 makes reuse and recompute agree token for token)")
    d.set_defaults(func=cmd_demo)
