"""Partial last chunk: keyed tail blocks vs a store whose chunk is the engine block.

    python -m vua_nixl_engine.tail_io

A 1,500-token prompt in the qwen2-0.5b KV layout (24 layers, 2 KV heads, head dim 64, bf16),
random KV, POSIX backend: put + (lookup + get) of the 1,488 reusable tokens, either as 256-token
chunks plus the tail's 16-token blocks under a keyed header (what the engine does), or as
16-token chunks throughout. Medians over 3 stores x 5 loads.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import numpy as np
import torch

from vua_nixl import KVLayout, KVStore, Namespace


def main() -> int:
    ns = Namespace(model="bench/qwen-shape", dtype="bfloat16", layout=KVLayout(num_layers=24, kv_heads=2, head_dim=64),
                   revision="x")
    n_tok = 1500
    res: dict[str, list[float]] = {}

    def zeros(n: int) -> torch.Tensor:
        return torch.zeros(24, 2, n, 2, 64, dtype=torch.bfloat16)

    for trial in range(3):
        with tempfile.TemporaryDirectory(prefix="vua-tail-io-") as td:
            big = KVStore(td, ns, chunk_tokens=256, backend="POSIX")
            tail = KVStore(td, ns, chunk_tokens=16, backend="POSIX", agent=big.agent)
            fine = KVStore(td, ns, chunk_tokens=16, backend="POSIX", agent=big.agent)
            rng = np.random.default_rng(trial)
            toks = rng.integers(0, 1000, size=n_tok).astype(np.int64)
            ftoks = rng.integers(0, 1000, size=n_tok).astype(np.int64)
            m = (n_tok // 256) * 256
            t = ((n_tok - m) // 16) * 16
            synth = np.concatenate([rng.integers(0, 2**31, size=16).astype(np.int64), toks[m : m + t]])
            kv = torch.randn(24, 2, n_tok, 2, 64).to(torch.bfloat16)
            t0 = time.perf_counter()
            big.put(toks[:m], kv[:, :, :m])
            tail.put(synth, torch.cat([zeros(16), kv[:, :, m : m + t]], 2))
            t1 = time.perf_counter()
            fine.put(ftoks[: m + t], kv[:, :, : m + t])
            t2 = time.perf_counter()
            res.setdefault("put: 256-token chunks + keyed tail", []).append(t1 - t0)
            res.setdefault("put: 16-token chunks", []).append(t2 - t1)
            out_a, out_b, out_c = zeros(m), zeros(16 + t), zeros(m + t)
            for _ in range(5):
                t0 = time.perf_counter()
                n1 = big.lookup(toks[: n_tok - 1])
                big.get(toks[:n1], out=out_a)
                n2 = tail.lookup(synth)
                tail.get(synth[:n2], out=out_b)
                t1 = time.perf_counter()
                n3 = fine.lookup(ftoks[: n_tok - 1])
                fine.get(ftoks[:n3], out=out_c)
                t2 = time.perf_counter()
                assert n1 + n2 - 16 == n3 == m + t, (n1, n2, n3)
                res.setdefault("lookup+get: 256-token chunks + keyed tail", []).append(t1 - t0)
                res.setdefault("lookup+get: 16-token chunks", []).append(t2 - t1)
            for s in (big, tail, fine):
                s.close()
    for k, v in res.items():
        print(f"{k:42s} median {1e3 * statistics.median(v):7.1f} ms  (n={len(v)})")
    print(f"{m + t} tokens: {m // 256 + 1 + t // 16} files keyed, {(m + t) // 16} files with 16-token chunks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
