"""Batched decoding and migration, in-process on the `tiny` preset (no Dynamo graph).

* One forward pass over a batch of sequences of different lengths gives, in float32, the same
  greedy tokens as decoding each sequence on its own.
* A generation interrupted mid-way (its worker "died") and continued by a *new* engine on the same
  store loads the prompt + generated KV saved during decoding and produces the same greedy tokens
  as the uninterrupted run (float32).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vua_nixl import KVStore
from vua_nixl.errors import InvalidInputError
from vua_nixl_engine import Engine, build_preset

CHUNK = 32


@pytest.fixture(scope="module")
def tiny_fp32():
    return build_preset("tiny", dtype=torch.float32)


def _prompt(n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(3, 500, size=n)]


def _serial(engine: Engine, prompt: list[int], n: int) -> list[int]:
    return engine.generate(prompt, max_new_tokens=n, use_store=False, save=False, stop_at_eos=False).token_ids


@pytest.mark.parametrize("block_size", [16, 12])
def test_batched_decode_equals_serial_fp32(tiny_fp32, block_size):
    engine = Engine(tiny_fp32, block_size=block_size, num_blocks=200)
    prompts = [_prompt(n, seed) for seed, n in enumerate([5, 37, 64, 100, 131])]
    want = [_serial(engine, p, 24) for p in prompts]

    seqs = [engine.start(p) for p in prompts]
    got = [[engine.prefill(s, use_store=False, save=False).first_token] for s in seqs]
    # requests join and leave the batch at different steps, as in a serving loop
    for step in range(23):
        active = [i for i in range(len(seqs)) if step >= i and len(got[i]) < 24]
        toks = engine.step_batch([seqs[i] for i in active])
        for i, t in zip(active, toks):
            got[i].append(t)
    for i in range(len(seqs)):
        while len(got[i]) < 24:
            got[i].extend(engine.step_batch([seqs[i]]))
        engine.free(seqs[i])
    assert got == want
    assert engine.paged.free_blocks == engine.paged.num_blocks


def test_step_batch_logits_match_single_step(tiny_fp32):
    """The batched forward computes the same next-token distribution (within fp32 rounding)."""
    engine = Engine(tiny_fp32, block_size=16, num_blocks=100)
    a, b = engine.start(_prompt(40, 1)), engine.start(_prompt(9, 2))
    for s in (a, b):
        engine.prefill(s, use_store=False, save=False)
    ka = engine.export_kv(a)
    ta = engine.step_batch([a, b])
    # recompute a's step alone from the same KV
    a2 = engine.start_with_kv(a.tokens[:-1], ka)
    assert engine.step(a2) == ta[0]
    torch.testing.assert_close(engine.export_kv(a2), engine.export_kv(a)[:, :, : a2.num_computed], rtol=0, atol=1e-5)


def test_step_batch_rejects_duplicates_and_handles_odd_sequences(tiny_fp32):
    engine = Engine(tiny_fp32, block_size=16, num_blocks=100)
    a = engine.start(_prompt(20, 3))
    engine.prefill(a, use_store=False, save=False)
    with pytest.raises(InvalidInputError):
        engine.step_batch([a, a])
    assert engine.step_batch([]) == []
    # a sequence with two pending tokens (hand-off shape) is stepped on its own, same result
    b = engine.start_with_kv(a.tokens + [7], engine.export_kv(a))
    ref = engine.start_with_kv(a.tokens + [7], engine.export_kv(a))
    got = engine.step_batch([b, a])
    assert got[0] == engine.step(ref)


@pytest.mark.parametrize("cut", [45, 70])
def test_migrated_generation_continues_with_same_tokens_fp32(tiny_fp32, tmp_path, cut):
    """Worker A decodes, saving each completed chunk (prompt + generated); it 'dies' after ``cut``
    tokens. Worker B (a new engine, same store) gets prompt + the tokens streamed so far, as
    Dynamo's migration sends them, loads the saved KV and must finish with the same tokens."""
    total = 100
    prompt = _prompt(50, 7)
    ref_engine = Engine(tiny_fp32, block_size=16)
    want = _serial(ref_engine, prompt, total)

    a = Engine(tiny_fp32, block_size=16, store=KVStore(tmp_path, ref_engine.namespace, chunk_tokens=CHUNK, backend="POSIX"))
    seq = a.start(prompt)
    out = [a.prefill(seq).first_token]
    while len(out) < cut:
        out.append(a.step(seq))
    assert out == want[:cut]
    a.flush()  # what had been saved before the crash; the sequence itself is never freed
    saved = (len(prompt) + cut - 1) // CHUNK * CHUNK
    assert saved > len(prompt)

    b_store = KVStore(tmp_path, ref_engine.namespace, chunk_tokens=CHUNK, backend="POSIX")
    b = Engine(tiny_fp32, block_size=16, store=b_store)
    rest = b.generate(prompt + out, max_new_tokens=total - cut, stop_at_eos=False)
    assert rest.reused_tokens == saved  # prompt *and* generated KV came from the store
    assert out + rest.token_ids == want


# ---- the worker's decode batcher (in-process, no Dynamo runtime) ------------------------------


def test_worker_batcher_serves_concurrent_streams_in_one_forward(tiny_fp32):
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from dynamo_components.worker import DecodeBatcher, WorkerStats

    engine = Engine(tiny_fp32, block_size=16, num_blocks=200)
    prompts = [_prompt(n, 20 + n) for n in (8, 30, 50, 71)]
    want = [_serial(engine, p, 12) for p in prompts]
    stats = WorkerStats()
    pool = ThreadPoolExecutor(2)

    async def one(batcher: DecodeBatcher, p: list[int]) -> list[int]:
        seq = engine.start(p)
        out = [engine.prefill(seq, use_store=False, save=False).first_token]
        while len(out) < 12:
            out.append(await batcher.next_token(seq))
            await asyncio.sleep(0)  # a stream yields its token to the client between steps
        engine.free(seq)
        return out

    async def main() -> list[list[int]]:
        batcher = DecodeBatcher(engine, pool, max_batch=3, stats=stats)
        return list(await asyncio.gather(*(one(batcher, p) for p in prompts)))

    try:
        got = asyncio.run(main())
    finally:
        pool.shutdown()
    assert got == want
    assert stats.decode_batch_max == 3  # capped by max_batch
    assert stats.decode_steps < 4 * 11  # fewer forward passes than tokens
    assert engine.paged.free_blocks == engine.paged.num_blocks


def test_worker_batcher_error_fails_only_its_request(tiny_fp32):
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from dynamo_components.worker import DecodeBatcher

    engine = Engine(tiny_fp32, block_size=16, num_blocks=100)
    good, bad = engine.start(_prompt(10, 1)), engine.start(_prompt(10, 2))
    for s in (good, bad):
        engine.prefill(s, use_store=False, save=False)
    engine.free(bad)  # a freed sequence cannot be stepped
    pool = ThreadPoolExecutor(1)

    async def main():
        b = DecodeBatcher(engine, pool, max_batch=8)
        return await asyncio.gather(b.next_token(good), b.next_token(bad), return_exceptions=True)

    try:
        ok, err = asyncio.run(main())
    finally:
        pool.shutdown()
    assert isinstance(ok, int) and isinstance(err, InvalidInputError)


def test_cpu_worker_advertises_cpu_device():
    """Dynamo reports an endpoint as 'cuda' unless the GPU-visibility variables hide the GPUs:
    a CPU worker sets them so /health says what it runs on."""
    from dynamo_components.worker import advertise_device

    env: dict[str, str] = {}
    assert advertise_device("cpu", env) == "cpu" and env == {"NVIDIA_VISIBLE_DEVICES": "void"}
    env = {"CUDA_VISIBLE_DEVICES": ""}
    assert advertise_device("cpu", env) == "cpu" and "NVIDIA_VISIBLE_DEVICES" not in env
    env = {}
    assert advertise_device("cuda:0", env) == "cuda" and env == {}


def test_max_batch_flag_and_env(monkeypatch):
    import argparse

    from dynamo_components.worker import WorkerConfig, add_worker_arguments, options_from_args

    p = argparse.ArgumentParser()
    add_worker_arguments(p)
    assert options_from_args(p.parse_args(["--max-batch", "2"]), "decode").max_batch == 2
    monkeypatch.setenv("VUA_NIXL_WORKER_MAX_BATCH", "5")
    assert WorkerConfig().max_batch == 5


def test_step_batch_error_steps_nothing(tiny_fp32):
    engine = Engine(tiny_fp32, block_size=16, num_blocks=100)
    a, b = engine.start(_prompt(10, 1)), engine.start(_prompt(10, 2))
    for s in (a, b):
        engine.prefill(s, use_store=False, save=False)
    engine.free(b)
    n = len(a.tokens)
    with pytest.raises(InvalidInputError, match="freed"):
        engine.step_batch([a, b])
    assert len(a.tokens) == n
