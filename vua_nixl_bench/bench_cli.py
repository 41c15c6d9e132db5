"""``vua-nixl plan`` and ``vua-nixl bench storage`` (registered by ``vua_nixl.cli``)."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import sys
from pathlib import Path
from typing import Any

from vua_nixl.config import parse_size

from .flags import NIXLBENCH_FLAGS
from .nbconfig import ConfigError, NixlbenchConfig, format_bytes

log = logging.getLogger(__name__)


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add ``plan`` and ``bench`` (with ``storage``) to the top-level subparsers."""
    p = sub.add_parser(
        "plan",
        help="KV bytes per token/chunk/request for a model, its load time, and the matching nixlbench run",
        description="Size a model's KV cache at a context length and print the nixlbench run "
                    "(block = one chunk on one GPU, batch = the request's chunk count) that validates it.",
    )
    p.add_argument("--model", required=True, help="HF model directory (or config.json) or a preset name")
    p.add_argument("--tokens", required=True, type=_tokens, help="context length in tokens (e.g. 131072 or 128k)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--chunk-tokens", type=int, default=256, help="tokens per stored chunk (default 256)")
    p.add_argument("--dtype", default=None, help="KV dtype (bf16, fp16, fp8, ...); default: the model's")
    p.add_argument("--bandwidth-gbps", type=float, default=35.0,
                   help="storage read bandwidth per GPU in GB/s (1e9), default 35 (a published GDS run)")
    p.add_argument("--prefill-tflops", type=float, default=0.0,
                   help="effective prefill TFLOP/s per GPU to estimate recompute time (e.g. 400 on an H100); 0 = skip")
    p.add_argument("--backend", default="GDS", choices=("GDS", "GDS_MT", "POSIX"), help="backend of the nixlbench run")
    p.add_argument("--op", default="READ", choices=("READ", "WRITE"), help="op of the nixlbench run (load = READ)")
    p.add_argument("--filepath", default="/mnt/kv/nixlbench", help="directory for nixlbench's test file")
    p.add_argument("--write-toml", metavar="PATH", help="also write the nixlbench TOML there")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    b = sub.add_parser("bench", help="benchmarks (see `vua-nixl bench storage -h`)")
    bsub = b.add_subparsers(dest="bench_command", metavar="BENCH")
    b.set_defaults(func=lambda args: b.print_help() or 2)  # type: ignore[func-returns-value]
    s = bsub.add_parser(
        "storage",
        help="run a nixlbench config through raw NIXL, the vua_nixl store, and nixlbench if on PATH",
        description="Replay a nixlbench_configs/*.toml matrix through the NIXL Python API and through "
                    "KVStore put/get with the same chunk bytes, verify every byte, and print one table "
                    "in nixlbench's columns with the store/raw ratio.",
    )
    s.add_argument("--config", required=True, help="nixlbench TOML (e.g. nixlbench_configs/posix_uring_read_direct.toml)")
    s.add_argument("--dir", default=None, help="directory for test files (default: the config's filepath if it "
                                               "exists, else a temp dir)")
    s.add_argument("--out", default=None, help="output prefix; writes PREFIX.csv/.json/.png "
                                               "(default results/storage_<config>_<utc time>)")
    s.add_argument("--set", action="append", default=[], metavar="FLAG=VALUE",
                   help="override a config flag, as a nixlbench command-line flag would (repeatable; sizes "
                        "accept KiB/MiB/GiB)")
    s.add_argument("--fallback", action="store_true",
                   help="if GDS/GDS_MT or VRAM cannot start here, run POSIX with DRAM instead of failing")
    s.add_argument("--fallback-posix-api", default="AIO", choices=("AIO", "URING", "POSIXAIO"))
    s.add_argument("--no-raw", action="store_true", help="skip the raw NIXL rows")
    s.add_argument("--no-store", action="store_true", help="skip the store rows")
    s.add_argument("--nixlbench", default="auto", help="nixlbench binary (default: from PATH if present); 'none' to skip")
    s.add_argument("--layout", default="model", choices=("model", "flat"),
                   help="store KV layout: model = bf16 GQA-like, 2*layers segments per chunk (default); "
                        "flat = one contiguous segment per chunk")
    s.add_argument("--model", default="auto",
                   help="store rows use this model's own KV layout (a `vua-nixl plan` preset or HF config dir; "
                        "--tp for its rank's share); auto (default): the model a KV-shaped config names in its "
                        "header, else --layout; none: always --layout")
    s.add_argument("--tp", type=int, default=None, help="tensor-parallel size for --model (default: the config's, or 1)")
    s.add_argument("--chunk-tokens", type=int, default=256, help="store chunk_tokens where the block allows (default 256)")
    s.add_argument("--no-checksum", action="store_true", help="store loads skip XXH3 payload checks (not for production)")
    s.add_argument("--max-memory", type=parse_size, default=None, help="cap on buffers allocated (default 40%% of "
                                                                       "available memory, at most 8 GiB)")
    s.add_argument("--repeat", type=int, default=1, help="measure each point N times, alternating raw/store, "
                                                           "and report the median (noisy shared disks)")
    s.add_argument("--raw-new-files", action="store_true",
                   help="WRITE configs: add a raw-newfile row (each block written to a new file, as the store "
                        "does) to separate file-system allocation cost from store overhead")
    s.add_argument("--recycle", action="store_true",
                   help="WRITE: store puts after the first round overwrite the previous round's evicted block files "
                        "(a recycle pool, as a store at capacity has), not new ones; eviction and the pool's aging "
                        "are outside the timed region")
    s.add_argument("--drop-cache", action="store_true", help="fadvise(DONTNEED) the raw file after pre-filling it")
    s.add_argument("--keep-files", action="store_true", help="leave test files and store roots in place")
    s.add_argument("--quiet", action="store_true", help="no table on stdout (files are still written)")
    s.set_defaults(func=cmd_bench_storage)


def _tokens(text: str) -> int:
    t = text.strip().lower()
    if t.endswith("k"):
        return int(float(t[:-1]) * 1024)
    if t.endswith("m"):
        return int(float(t[:-1]) * 1024 * 1024)
    return int(t)


# -- plan ------------------------------------------------------------------------------------
def cmd_plan(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .plan import make_plan, nixlbench_config_for, resolve_model

    console = Console()
    try:
        shape = resolve_model(args.model)
        plan = make_plan(shape, args.tokens, tp=args.tp, chunk_tokens=args.chunk_tokens, dtype=args.dtype,
                         bandwidth_gbps=args.bandwidth_gbps, prefill_tflops=args.prefill_tflops)
        nb = nixlbench_config_for(plan, backend=args.backend, op=args.op, filepath=args.filepath)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    toml_text = nb.to_toml()
    if args.write_toml:
        Path(args.write_toml).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write_toml).write_text(toml_text)
    if args.json:
        print(json.dumps({**plan.to_dict(), "nixlbench_command": nb.command_line(),
                          "nixlbench_toml": toml_text}, indent=2))
        return 0
    t = Table(title=f"KV plan: {shape.name} ({shape.source}), {args.tokens} tokens, tp={args.tp}", show_header=False)
    t.add_column("quantity")
    t.add_column("value", justify="right")
    kind = (f"MLA latent {shape.kv_lora_rank}+{shape.qk_rope_head_dim}" if shape.mla
            else f"{shape.num_kv_heads} KV heads x {shape.head_dim} ({plan.kv_heads_per_rank} per rank)")
    t.add_row("attention", f"{shape.num_layers} layers, {kind}")
    t.add_row("dtype", plan.dtype)
    t.add_row("KV bytes / token (per GPU)", f"{plan.bytes_per_token:,} B ({format_bytes(plan.bytes_per_token)})")
    t.add_row(f"KV bytes / chunk of {plan.chunk_tokens} tokens", f"{plan.chunk_bytes:,} B ({format_bytes(plan.chunk_bytes)})")
    t.add_row("chunks per request", f"{plan.num_chunks:,} ({plan.stored_tokens:,} tokens stored)")
    t.add_row("KV bytes / request (per GPU)", f"{plan.request_bytes:,} B ({plan.request_bytes / 1e9:.3f} GB)")
    t.add_row(f"KV bytes / request (all {plan.tp} GPUs)", f"{plan.request_bytes_all_ranks / 1e9:.3f} GB"
              + (f" ({plan.replication}x replicated)" if plan.replication > 1 else ""))
    t.add_row(f"load time at {plan.bandwidth_gbps:g} GB/s per GPU", f"{plan.load_seconds:.3f} s")
    if plan.prefill_seconds is not None:
        t.add_row(f"prefill estimate at {plan.prefill_tflops:g} TFLOP/s per GPU", f"{plan.prefill_seconds:.2f} s")
        t.add_row("load vs recompute", f"{plan.speedup:.1f}x faster" if plan.speedup else "-")
    console.print(t)
    for n in plan.notes:
        console.print(f"[yellow]note:[/yellow] {n}")
    console.print("\n[bold]nixlbench command[/bold] (run on each GPU of the TP group; no etcd needed):")
    print(nb.command_line())
    console.print("\n[bold]nixlbench TOML[/bold] (nixlbench --config_file=FILE):")
    print(toml_text)
    return 0


# -- bench storage ---------------------------------------------------------------------------
def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``FLAG=VALUE`` strings -> typed values (ints accept size suffixes, bools true/false/1/0)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects FLAG=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().lstrip("-")
        if key not in NIXLBENCH_FLAGS:
            raise ConfigError(f"--set {key}: unknown nixlbench flag")
        typ = NIXLBENCH_FLAGS[key][0]
        if typ is bool:
            v = value.strip().lower()
            if v not in ("1", "0", "true", "false", "yes", "no"):
                raise ConfigError(f"--set {key}: expected true/false, got {value!r}")
            out[key] = v in ("1", "true", "yes")
        elif typ is int:
            out[key] = parse_size(value)
        else:
            out[key] = value
    return out


def cmd_bench_storage(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .raw import BackendUnavailable, RunOptions
    from .results import render_table
    from .storage import default_max_memory, resolve_directory, run_storage_bench, write_outputs

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("nixl").setLevel(logging.WARNING)  # one INFO line per agent otherwise
    console = Console()
    if not console.is_terminal:  # piped or captured: keep all twelve columns readable
        console = Console(width=240)
    err = Console(stderr=True)
    try:
        cfg = NixlbenchConfig.from_toml(args.config)
        if args.set:
            cfg.update(parse_overrides(args.set))
    except (OSError, ConfigError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 2
    problems = cfg.validate()
    if problems:
        err.print("[red]error:[/red] nixlbench would reject this config: " + "; ".join(problems))
        return 2
    model, tp = None, args.tp or 1
    if args.model.lower() != "none":
        from .plan import resolve_model
        from .store_bench import model_of_config

        named = (args.model, args.tp or 1) if args.model.lower() != "auto" else model_of_config(Path(args.config).read_text())
        if named is not None:
            try:
                model, tp = resolve_model(named[0]), args.tp or named[1]
            except (OSError, ValueError, KeyError) as exc:
                err.print(f"[red]error:[/red] --model {named[0]}: {exc}")
                return 2
    directory = resolve_directory(cfg, args.dir)
    opts = RunOptions(
        directory=directory, fallback=args.fallback, fallback_posix_api=args.fallback_posix_api,
        max_memory=args.max_memory or default_max_memory(), keep_files=args.keep_files,
        drop_cache=args.drop_cache,
    )
    nb = None if args.nixlbench.lower() == "none" else args.nixlbench
    try:
        result = run_storage_bench(
            cfg, opts, raw=not args.no_raw, store=not args.no_store, nixlbench=nb,
            layout_mode=args.layout, chunk_tokens=args.chunk_tokens, verify_checksums=not args.no_checksum,
            repeat=args.repeat, raw_new_files=args.raw_new_files, model=model, tp=tp, recycle=args.recycle,
        )
    except BackendUnavailable as exc:
        err.print(f"[red]backend unavailable:[/red] {exc}")
        return 3
    except (MemoryError, ValueError, FileNotFoundError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 2
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    prefix = Path(args.out) if args.out else Path("results") / f"storage_{cfg.name}_{stamp}"
    title = (f"{cfg.name}: {cfg.op} {result.meta['backend_run']}"
             f"{'/' + str(cfg['posix_api_type']) if result.meta['backend_run'] == 'POSIX' else ''}"
             f" {'O_DIRECT' if cfg.direct else 'buffered'}, {cfg.num_threads} thread(s)")
    outputs = write_outputs(result, prefix, title)
    if not args.quiet:
        console.print(render_table(result.rows, title))
        for n in result.meta["notes"]:
            console.print(f"[yellow]note:[/yellow] {n}")
        big = [r for r in result.rows if r.path == "store" and r.block_size >= 4 << 20 and r.ratio is not None]
        if big:
            worst = min(big, key=lambda r: r.ratio or 0)
            console.print(f"store/raw (store bandwidth / raw NIXL at the same point) at >= 4 MiB blocks: min {worst.ratio:.3f} "
                          f"(block {format_bytes(worst.block_size)}, batch {worst.batch_size}); target >= 0.9")
        console.print("wrote " + ", ".join(outputs.values()))
    if result.failures:
        err.print("[red]nixlbench FAILED[/red]: " + "; ".join(result.failures)
                  + f" (full output in {outputs.get('json', 'the JSON result')})")
        return 1
    if not result.all_verified:
        err.print("[red]byte verification FAILED[/red] for: " + ", ".join(
            f"{r.path} {r.block_size}x{r.batch_size} ({r.verify_detail})" for r in result.rows if r.verified is False))
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m vua_nixl_bench.bench_cli``) for use without the top-level CLI."""
    parser = argparse.ArgumentParser(prog="vua-nixl")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
