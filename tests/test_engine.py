"""Engine: paged KV, exact reuse through the store, bad input. Tiny preset only (fast on 2 CPUs).

Every assertion is on values: KV bytes, token ids, logits within tolerance, error messages.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from vua_nixl import KVLayout, KVStore, Namespace
from vua_nixl.errors import InvalidInputError
from vua_nixl_engine import (
    Engine,
    ModelLoadError,
    OutOfBlocksError,
    PagedKVCache,
    PromptTooLongError,
    StoreMismatchError,
    build_preset,
    load_model_dir,
    make_model_dir,
    namespace_for,
)

CHUNK = 32


@pytest.fixture(scope="module")
def tiny_bf16():
    return build_preset("tiny")


@pytest.fixture(scope="module")
def tiny_fp32():
    return build_preset("tiny", dtype=torch.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir("tiny", tmp_path_factory.mktemp("models") / "tiny")


def _store(root: Path, engine: Engine, chunk: int = CHUNK) -> KVStore:
    return KVStore(root, engine.namespace, chunk_tokens=chunk, backend="POSIX")


def _prompt(n: int, seed: int = 0, vocab: int = 500) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(3, vocab, size=n)]


# ---- paged cache -------------------------------------------------------------------------------


def test_paged_scatter_gather_roundtrip_non_contiguous_blocks():
    paged = PagedKVCache(num_layers=2, kv_heads=2, head_dim=4, num_blocks=10, block_size=4, dtype=torch.bfloat16)
    # fragment the pool so the sequence's blocks are not contiguous
    a = paged.allocate(3)
    b = paged.allocate(2)
    paged.release(a)
    blocks = paged.allocate(4, contiguous=False)
    assert blocks == [2, 1, 0, 5]  # freed blocks are reused first: the table is out of order
    assert paged.contiguous_view(blocks, 14) is None
    table = torch.tensor(blocks)
    kv = torch.randn(2, 2, 14, 2, 4).to(torch.bfloat16)
    slots = paged.slots(table, 0, 14)
    paged.scatter(slots, kv)
    assert torch.equal(paged.gather(slots), kv)
    # token 5 is block table[1], offset 1
    assert torch.equal(paged.kv[:, :, blocks[1], 1], kv[:, :, 5])
    # the other sequence's blocks were not touched
    assert torch.count_nonzero(paged.kv[:, :, b]) == 0
    paged.release(blocks)
    paged.release(b)
    assert paged.free_blocks == 10
    # a contiguous run is a strided canonical view of the cache (what KVStore.get(out=) accepts)
    run = paged.allocate(4)
    assert run == [0, 1, 2, 3]
    view = paged.contiguous_view(run, 14)
    assert view.shape == (2, 2, 14, 2, 4) and view.stride()[2:] == (8, 4, 1)
    view.copy_(kv)
    assert torch.equal(paged.gather(paged.slots(torch.tensor(run), 0, 14)), kv)


def test_paged_out_of_blocks_is_a_clear_error():
    paged = PagedKVCache(num_layers=1, kv_heads=1, head_dim=2, num_blocks=2, block_size=4, dtype=torch.float32)
    paged.allocate(2)
    with pytest.raises(OutOfBlocksError, match=r"paged KV cache is full: need 1 blocks of 4 tokens, 0 of 2 free"):
        paged.allocate(1)


# ---- model correctness over paged KV -----------------------------------------------------------


def test_paged_prefill_and_decode_match_transformers(tiny_fp32):
    """The engine's attention over paged blocks gives transformers' own logits and greedy tokens."""
    engine = Engine(tiny_fp32, block_size=8)
    ids = _prompt(45)
    gen = engine.generate(ids, max_new_tokens=6, stop_at_eos=False)
    model = tiny_fp32.model
    with torch.no_grad():
        ref_logits = model(torch.tensor([ids])).logits[0, -1].float()
        ref = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    torch.testing.assert_close(gen.prefill.logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert gen.token_ids == ref[0, len(ids):].tolist()
    assert len(set(gen.token_ids)) > 1  # random weights still give varied output
    assert engine.paged.free_blocks == engine.paged.num_blocks


# ---- exactness through the store ---------------------------------------------------------------


def test_restored_kv_is_bit_identical_to_saved(tiny_bf16, tmp_path):
    engine = Engine(tiny_bf16, block_size=16)
    with _store(tmp_path, engine) as store:
        engine.attach_store(store)
        ids = _prompt(100)
        seq = engine.start(ids)
        stats = engine.prefill(seq)
        assert stats.reused_tokens == 0 and stats.computed_tokens == 100
        assert stats.save_queued_tokens == 96
        assert engine.flush(timeout=30)
        saved = engine.export_kv(seq)
        assert saved.shape == (2, 2, 100, 2, 16) and saved.dtype == torch.bfloat16
        res = store.get(ids)
        assert res.tokens == 96
        assert torch.equal(res.kv, saved[:, :, :96])
        assert res.kv.view(torch.int16).equal(saved[:, :, :96].contiguous().view(torch.int16))
        # and a reusing prefill scatters exactly those bytes into its own (different) blocks
        seq2 = engine.start(ids + [7, 8])
        stats2 = engine.prefill(seq2)
        assert (stats2.reused_tokens, stats2.computed_tokens) == (96, 6)
        assert stats2.load_path == "direct"  # consecutive blocks: loaded with no staging copy
        assert set(seq2.blocks).isdisjoint(seq.blocks)
        assert torch.equal(engine.export_kv(seq2)[:, :, :96], saved[:, :, :96])
        engine.free(seq)
        engine.free(seq2)
        engine.close()


def test_load_into_fragmented_blocks_goes_through_staging(tiny_bf16, tmp_path):
    engine = Engine(tiny_bf16, block_size=8, num_blocks=40)
    ids = _prompt(100, seed=2)
    with _store(tmp_path, engine) as store:
        engine.attach_store(store)
        seq = engine.start(ids)
        engine.prefill(seq)
        engine.flush()
        saved = engine.export_kv(seq)
        engine.free(seq)
        # fragment the pool: hold every other block
        held = [engine.paged.allocate(1, contiguous=False)[0] for _ in range(40)]
        engine.paged.release(held[::2])
        seq2 = engine.start(ids + [9])
        assert engine.paged.contiguous_view(seq2.blocks, 96) is None
        stats = engine.prefill(seq2)
        assert (stats.reused_tokens, stats.load_path) == (96, "staging")
        assert torch.equal(engine.export_kv(seq2)[:, :, :96], saved[:, :, :96])
        engine.free(seq2)
        engine.paged.release(held[1::2])
        assert engine.paged.free_blocks == 40
        engine.close()


def test_greedy_continuation_from_restored_kv_equals_in_memory(tiny_bf16, tmp_path):
    """Decode from KV loaded out of the store == decode from the KV that stayed in memory."""
    engine = Engine(tiny_bf16, block_size=16)
    ids = _prompt(2 * CHUNK, seed=3)
    with _store(tmp_path, engine) as store:
        engine.attach_store(store)
        seq = engine.start(ids)
        first = engine.prefill(seq).first_token
        engine.flush()
        in_memory = [engine.step(seq) for _ in range(8)]
        restored = store.get(ids)
        assert restored.tokens == len(ids)
        seq2 = engine.start_with_kv(ids + [first], restored.kv.clone())
        from_store = [engine.step(seq2) for _ in range(8)]
        assert from_store == in_memory
        assert len(set(in_memory)) > 1
        engine.free(seq)
        engine.free(seq2)
        engine.close()


# (dtype fixture, block size, document tokens, question tail, new tokens, reused, logits tolerance)
_REUSE_CASES = [
    pytest.param("tiny_fp32", 16, 150, 13, 8, 128, 1e-4, 1e-4, id="fp32-block16"),
    pytest.param("tiny_fp32", 12, 150, 13, 8, 128, 1e-4, 1e-4, id="fp32-block12"),
    pytest.param("tiny_bf16", 16, 200, 20, 6, 192, 0.05, 0.1, id="bf16-block16"),
]


@pytest.mark.parametrize("model_fixture,block_size,doc_len,tail,new,reused,rtol,atol", _REUSE_CASES)
def test_reuse_vs_full_recompute(request, tmp_path, model_fixture, block_size, doc_len, tail, new, reused, rtol, atol):
    """Prefill with a reused prefix agrees with a full recompute (fp32 tight, bf16 loose) and
    generates the same token ids."""
    engine = Engine(request.getfixturevalue(model_fixture), block_size=block_size)
    doc = _prompt(doc_len, seed=5)
    with _store(tmp_path, engine) as store:
        engine.attach_store(store)
        engine.generate(doc + _prompt(9, seed=6), max_new_tokens=1)  # writes the document's chunks
        engine.flush()
        question = doc + _prompt(tail, seed=7)
        hit = engine.generate(question, max_new_tokens=new, stop_at_eos=False)
        full = engine.generate(question, max_new_tokens=new, stop_at_eos=False, use_store=False, save=False)
        assert hit.reused_tokens == reused and hit.computed_tokens == len(question) - reused
        assert full.reused_tokens == 0 and full.computed_tokens == len(question)
        torch.testing.assert_close(hit.prefill.logits, full.prefill.logits, rtol=rtol, atol=atol)
        assert len(hit.token_ids) == new and hit.token_ids == full.token_ids
        engine.close()


def test_whole_prompt_stored_still_computes_last_token(tiny_bf16, tmp_path):
    engine = Engine(tiny_bf16)
    ids = _prompt(64, seed=10)
    with _store(tmp_path, engine) as store:
        engine.attach_store(store)
        a = engine.generate(ids, max_new_tokens=4, stop_at_eos=False)
        engine.flush()
        b = engine.generate(ids, max_new_tokens=4, stop_at_eos=False)
        # 64 tokens = 2 chunks stored, but the first token needs the last position's logits
        assert (b.reused_tokens, b.computed_tokens) == (32, 32)
        assert a.token_ids == b.token_ids
        engine.close()


# ---- write-behind ------------------------------------------------------------------------------


class _BlockingStore:
    """Wraps a KVStore; put() waits until released, to prove the first token does not wait."""

    def __init__(self, inner: KVStore):
        self.inner = inner
        self.namespace = inner.namespace
        self.chunk_tokens = inner.chunk_tokens
        self.entered = threading.Event()
        self.release = threading.Event()

    def lookup(self, tokens):
        return self.inner.lookup(tokens)

    def get(self, tokens, out=None, device="cpu"):
        return self.inner.get(tokens, out=out, device=device)

    def put(self, tokens, kv):
        self.entered.set()
        assert self.release.wait(30)
        return self.inner.put(tokens, kv)


def test_write_behind_never_blocks_first_token_and_survives_free(tiny_bf16, tmp_path):
    engine = Engine(tiny_bf16, num_blocks=20)
    with _store(tmp_path, engine) as inner:
        store = _BlockingStore(inner)
        engine.attach_store(store)
        ids = _prompt(96, seed=11)
        seq = engine.start(ids)
        stats = engine.prefill(seq)  # returns although put() is blocked
        assert stats.save_queued_tokens == 96
        assert store.entered.wait(30)
        assert engine.saver.pending == 1
        expected = engine.export_kv(seq)
        held = list(seq.blocks)
        engine.free(seq)
        assert engine.paged.free_blocks == 20 - len(held)  # the saver still holds them
        # so a new sequence cannot get them and overwrite the KV before it is saved
        other = engine.start(_prompt(200, seed=12))
        assert set(other.blocks).isdisjoint(held)
        engine.prefill(other, save=False)
        store.release.set()
        assert engine.flush(timeout=30)
        assert engine.saver.stats.errors == 0
        assert torch.equal(inner.get(ids).kv, expected[:, :, :96])
        engine.free(other)
        assert engine.paged.free_blocks == 20
        engine.close()


def test_failed_save_is_counted_not_raised(tiny_bf16, tmp_path):
    engine = Engine(tiny_bf16)
    with _store(tmp_path, engine) as inner:

        class Broken(_BlockingStore):
            def put(self, tokens, kv):
                raise OSError("disk on fire")

        engine.attach_store(Broken(inner))
        gen = engine.generate(_prompt(70), max_new_tokens=2)
        assert engine.flush(timeout=30)
        assert len(gen.token_ids) == 2
        assert engine.saver.stats.errors == 1 and "disk on fire" in engine.saver.stats.last_error
        engine.close()


# ---- namespaces --------------------------------------------------------------------------------


def test_store_of_other_namespace_is_rejected_with_clear_error(tiny_bf16, tmp_path):
    engine = Engine(tiny_bf16)
    assert namespace_for(tiny_bf16) == engine.namespace
    other = Namespace(model=engine.namespace.model, dtype="float32", layout=KVLayout(num_layers=3, kv_heads=2, head_dim=16))
    with KVStore(tmp_path, other, chunk_tokens=CHUNK, backend="POSIX") as store:
        with pytest.raises(StoreMismatchError, match=r"dtype: store 'float32' vs model 'bfloat16'.*num_layers=3"):
            engine.attach_store(store)


def test_kv_of_other_namespace_under_same_root_is_a_clean_miss(tiny_bf16, tiny_fp32, tmp_path):
    """fp32 KV for the same tokens in the same root is invisible to the bf16 model (and vice versa)."""
    ids = _prompt(100, seed=13)
    e32 = Engine(tiny_fp32)
    with _store(tmp_path, e32) as s32:
        e32.attach_store(s32)
        e32.generate(ids, max_new_tokens=1)
        e32.flush()
        assert s32.lookup(ids) == 96
        e32.close()
    e16 = Engine(tiny_bf16)
    with _store(tmp_path, e16) as s16:
        e16.attach_store(s16)
        gen = e16.generate(ids, max_new_tokens=3, stop_at_eos=False)
        assert gen.reused_tokens == 0 and gen.computed_tokens == 100
        ref = e16.generate(ids, max_new_tokens=3, stop_at_eos=False, use_store=False, save=False)
        assert gen.token_ids == ref.token_ids
        e16.close()


# ---- bad input ---------------------------------------------------------------------------------


def test_prompt_longer_than_context_is_a_clear_error(tiny_bf16):
    engine = Engine(tiny_bf16)
    with pytest.raises(PromptTooLongError, match=r"prompt of 2049 tokens exceeds the model's context length of 2048 tokens"):
        engine.start([5] * 2049)
    with pytest.raises(PromptTooLongError, match=r"prompt of 2040 tokens plus 16 tokens to generate exceeds"):
        engine.generate([5] * 2040, max_new_tokens=16)
    assert engine.paged.free_blocks == engine.paged.num_blocks


def test_bad_tokens_are_clear_errors(tiny_bf16):
    engine = Engine(tiny_bf16)
    with pytest.raises(InvalidInputError, match=r"token id 512 is outside the model's vocabulary \(0..511\)"):
        engine.start([1, 2, 512])
    with pytest.raises(InvalidInputError, match=r"empty prompt"):
        engine.start([])


def test_step_without_pending_token_explains(tiny_bf16):
    engine = Engine(tiny_bf16)
    seq = engine.start_with_kv([1, 2, 3], torch.zeros(2, 2, 3, 2, 16, dtype=torch.bfloat16))
    with pytest.raises(InvalidInputError, match=r"no pending token.*pass prompt \+ \[first_token\] to start_with_kv"):
        engine.step(seq)
    with pytest.raises(InvalidInputError, match=r"kv has shape \(2, 2, 3, 2, 8\), this model needs \(2, 2, 3, 2, 16\)"):
        engine.start_with_kv([1, 2, 3], torch.zeros(2, 2, 3, 2, 8, dtype=torch.bfloat16))


def test_unknown_preset_or_path(tmp_path):
    with pytest.raises(ModelLoadError, match=r"'nope' is neither a preset \(tiny, small, qwen2-0.5b\) nor an existing model directory"):
        Engine.from_model("nope")
    with pytest.raises(ModelLoadError, match=r"model directory .*missing does not exist"):
        Engine.from_model(str(tmp_path / "missing"))


def _copy_dir(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_bad_model_dirs(model_dir, tmp_path):
    with pytest.raises(ModelLoadError, match=r"has no config.json"):
        load_model_dir(_copy_dir(model_dir, tmp_path / "a", skip=("config.json",)))
    with pytest.raises(ModelLoadError, match=r"has no weights \(model.safetensors"):
        load_model_dir(_copy_dir(model_dir, tmp_path / "b", skip=("model.safetensors",)))
    with pytest.raises(ModelLoadError, match=r"has no tokenizer.json"):
        load_model_dir(_copy_dir(model_dir, tmp_path / "c", skip=("tokenizer.json",)))
    d = _copy_dir(model_dir, tmp_path / "d")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "warp-drive-lm"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"unknown architecture 'warp-drive-lm'"):
        load_model_dir(d)
    e = _copy_dir(model_dir, tmp_path / "e")
    (e / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config.json is not valid JSON"):
        load_model_dir(e)
    f = _copy_dir(model_dir, tmp_path / "f")
    cfg = json.loads((f / "config.json").read_text())
    cfg["layer_types"] = ["sliding_attention", "full_attention"]
    cfg["use_sliding_window"] = True
    cfg["sliding_window"] = 64
    (f / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"only full-attention layers are supported"):
        load_model_dir(f)


# ---- model directories -------------------------------------------------------------------------


def test_make_model_dir_is_complete_and_serves_the_same_model(model_dir, tiny_bf16):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (model_dir / name).is_file(), name
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
    gen_cfg = json.loads((model_dir / "generation_config.json").read_text())
    assert gen_cfg["eos_token_id"] == [2, 0]
    loaded = load_model_dir(model_dir)
    engine = Engine(loaded)
    assert engine.namespace.model == "vua-nixl/tiny" and engine.namespace.dtype == "bfloat16"
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hello cache"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhello cache<|im_end|>\n<|im_start|>assistant\n"
    ids = engine.encode(text)
    assert ids == tiny_bf16.tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == 1  # <|im_start|> is one special token
    a = engine.generate(ids, max_new_tokens=5, stop_at_eos=False)
    b = Engine(tiny_bf16).generate(ids, max_new_tokens=5, stop_at_eos=False)
    assert a.token_ids == b.token_ids
    assert torch.equal(a.prefill.logits, b.prefill.logits)
    # a second make-model reuses the complete directory
    assert make_model_dir("tiny", model_dir) == model_dir


def test_cli_make_model(tmp_path):
    from vua_nixl.cli import main

    out = tmp_path / "m"
    assert main(["make-model", "--preset", "tiny", "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    assert main(["make-model", "--preset", "tiny", "--out", str(tmp_path / "junk")]) == 2


def test_cli_demo_tiny(tmp_path):
    from vua_nixl.cli import main

    out = tmp_path / "demo"
    rc = main(["demo", "--preset", "tiny", "--out", str(out), "--doc-tokens", "200", "--questions", "2",
               "--turns", "2", "--turn-tokens", "40", "--reply-tokens", "20", "--system-tokens", "60", "--chunk-tokens", "32", "--max-new-tokens", "2"])
    assert rc == 0
    data = json.loads((out / "demo.json").read_text())
    reqs = data["requests"]
    assert [r["name"] for r in reqs] == ["rag-q1", "rag-q2", "chat-t1", "chat-t2"]
    assert reqs[0]["reused_tokens"] == 0
    assert reqs[1]["reused_tokens"] >= 160 and reqs[1]["reused_tokens"] % 32 == 0
    assert reqs[3]["reused_tokens"] > 0
    assert all(r["same_output"] for r in reqs)  # tiny model: margins are wide
    assert (out / "demo_ttft.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generation_only_emits_ids_the_tokenizer_can_decode():
    """A padded embedding table (like qwen2-0.5b's 151,936 rows against its offline tokenizer)
    never yields undecodable ids: greedy picks are restricted to the tokenizer's ids."""
    import dataclasses

    from vua_nixl_engine.presets import PRESETS

    padded = dataclasses.replace(PRESETS["tiny"], name="tiny-padded", vocab_size=4096, tokenizer_vocab=512)
    eng = Engine(build_preset(padded, dtype=torch.float32))
    assert eng.vocab_size == 4096 and eng.emit_limit == len(eng.tokenizer) <= 512
    # make the padded rows win every argmax unless they are masked
    with torch.no_grad():
        eng.model.get_input_embeddings().weight[eng.emit_limit:] *= 50.0
    ids = eng.encode("The quick brown fox jumps over the lazy dog.")
    out = eng.generate(ids, max_new_tokens=24, use_store=False, save=False, stop_at_eos=False).token_ids
    assert out and max(out) < eng.emit_limit
    assert eng.decode(out).strip(), out


@pytest.mark.parametrize("name", ["tiny", "small", "qwen2-0.5b"])
def test_every_preset_tokenizer_fits_its_vocabulary(name):
    from vua_nixl_engine.presets import PRESETS
    from vua_nixl_engine.tokenizer import build_tokenizer

    p = PRESETS[name]
    tok, _ = build_tokenizer(p.tokenizer_vocab, p.max_context)
    assert 259 < len(tok) <= p.vocab_size  # specials + 256 bytes + merges: every byte decodable


# ---- partial last chunk (keyed partial block) ----------------------------------------------------


def _engine_with_partial(model, root: Path, block_size: int = 16) -> Engine:
    from vua_nixl_engine import open_partial_store

    engine = Engine(model, block_size=block_size)
    store = _store(root, engine)
    engine.attach_store(store)
    engine.attach_partial_store(open_partial_store(store, block_size, backend="POSIX"))
    return engine


def test_partial_last_chunk_is_reused_when_the_next_prompt_extends_it(tiny_fp32, tmp_path):
    """A 90-token prompt (chunks of 32) leaves 26 tokens past its last full chunk; a longer prompt
    that extends it loads 64 from the main store and the tail's whole 16-token block (80 in all),
    and agrees with a full recompute."""
    engine = _engine_with_partial(tiny_fp32, tmp_path)
    first = _prompt(90, seed=11)
    engine.generate(first, max_new_tokens=1)
    engine.flush()
    assert engine.tail_stats["saved"] == 1
    nxt = first + _prompt(20, seed=12)
    assert engine.stored_prefix(nxt[:-1]) == 80
    hit = engine.generate(nxt, max_new_tokens=6, stop_at_eos=False)
    full = engine.generate(nxt, max_new_tokens=6, stop_at_eos=False, use_store=False, save=False)
    assert hit.reused_tokens == 80 and hit.prefill.partial_tokens == 16
    torch.testing.assert_close(hit.prefill.logits, full.prefill.logits, rtol=1e-4, atol=1e-4)
    assert hit.token_ids == full.token_ids
    engine.close()


def test_partial_tail_of_a_short_prompt_and_a_diverging_prompt(tiny_fp32, tmp_path):
    engine = _engine_with_partial(tiny_fp32, tmp_path)
    short = _prompt(20, seed=13)  # shorter than one chunk: its first block is still reusable
    engine.generate(short, max_new_tokens=1)
    engine.flush()
    assert engine.generate(short + [5, 6, 7], max_new_tokens=1).reused_tokens == 16
    # a prompt that shares the full chunks but not a whole block of the tail: chunks only
    first = _prompt(90, seed=14)
    engine.generate(first, max_new_tokens=1)
    engine.flush()
    other = first[:70] + _prompt(30, seed=15)
    assert engine.generate(other, max_new_tokens=1).reused_tokens == 64
    engine.close()


def test_partial_tail_store_must_use_the_block_size(tiny_fp32, tmp_path):
    engine = Engine(tiny_fp32, block_size=16)
    store = _store(tmp_path, engine)
    engine.attach_store(store)
    with pytest.raises(InvalidInputError, match="block_size"):
        engine.attach_partial_store(_store(tmp_path, engine, chunk=32))
    engine.close()
