"""Measure what a migrated generation does: greedy tokens after a worker "dies" mid-generation
and a fresh engine continues from the store, against the uninterrupted run.

    python -m vua_nixl_engine.migration --preset tiny --dtype bfloat16 --trials 40

Per trial: a random prompt, an uninterrupted greedy run of ``--tokens`` tokens, then the same
run on engine A (saving each completed store chunk while decoding, as the workers do) stopped
after a random number of tokens, and engine B (new, same store) continuing from
``prompt + tokens so far`` (what Dynamo's migration sends). A trial *diverges* if any
continued token differs. float32 gives 0 divergences; see docs/ENGINE.md for bf16.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import numpy as np


def measure(preset: str, dtype: str, trials: int, tokens: int, chunk: int, seed: int = 0,
            partial: bool = False) -> dict:
    import torch  # noqa: F401

    from vua_nixl import KVStore
    from vua_nixl_engine import Engine, build_preset, open_partial_store

    loaded = build_preset(preset, dtype=dtype)
    rng = np.random.default_rng(seed)
    vocab = min(500, len(loaded.tokenizer) if loaded.tokenizer is not None else 500)
    diverged, first_diff, reused, t0 = 0, [], [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vua-migration-") as td:
        ref = Engine(loaded, block_size=16)

        def engine() -> Engine:
            e = Engine(loaded, block_size=16)
            st = KVStore(td, ref.namespace, chunk_tokens=chunk, backend="POSIX")
            e.attach_store(st)
            if partial:
                e.attach_partial_store(open_partial_store(st, 16, backend="POSIX"))
            return e

        for _ in range(trials):
            prompt = [int(x) for x in rng.integers(3, vocab, size=int(rng.integers(20, 200)))]
            want = ref.generate(prompt, max_new_tokens=tokens, use_store=False, save=False, stop_at_eos=False).token_ids
            cut = int(rng.integers(chunk // 2, tokens - 1))
            a = engine()
            seq = a.start(prompt)
            out = [a.prefill(seq).first_token]
            while len(out) < cut:
                out.append(a.step(seq))
            a.flush()
            a.close()  # the sequence is never freed or saved at the end: the worker died
            b = engine()
            rest = b.generate(prompt + out, max_new_tokens=tokens - cut, stop_at_eos=False)
            b.close()
            got = out + rest.token_ids
            reused.append(rest.reused_tokens / max(1, len(prompt) + cut))
            if got != want:
                diverged += 1
                first_diff.append(next(i for i, (x, y) in enumerate(zip(got, want)) if x != y) - cut)
    return {
        "preset": preset, "dtype": dtype, "trials": trials, "tokens": tokens, "chunk_tokens": chunk,
        "partial_tail": partial, "diverged": diverged, "divergence_rate": diverged / trials,
        "tokens_after_cut_to_first_difference": first_diff, "mean_reused_fraction": float(np.mean(reused)),
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--chunk-tokens", type=int, default=32)
    p.add_argument("--partial", action="store_true", help="also use the partial-tail store")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(json.dumps(measure(a.preset, a.dtype, a.trials, a.tokens, a.chunk_tokens, a.seed, a.partial), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
