"""A small paged-KV inference engine with prefix reuse through the vua-nixl store.

Request flow (what a production engine + KV connector does, on one sequence at a time):

1. ``start``: validate the prompt, allocate paged blocks.
2. ``prefill``: ask the store for the longest stored prefix of the prompt (``lookup``), load it in
   one batched transfer (``get``) into a staging buffer and scatter it into the sequence's blocks,
   run the model only over the remaining tokens, take the first token, and *then* hand the new
   full chunks to the write-behind saver. Time to first token never includes a store write.
3. ``step``: one greedy decode step over the paged KV.
4. ``free``: give the blocks back (a pending save keeps its own reference).

At least one prompt token is always computed, because the first token needs the logits of the
last prompt position; so at most ``len(prompt) - 1`` tokens (rounded down to whole store chunks)
are ever reused.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable
from typing import Sequence as Seq

import numpy as np
import torch

from vua_nixl.dtypes import dtype_name
from vua_nixl.errors import InvalidInputError, VuaNixlError
from vua_nixl.keys import KVLayout, Namespace
from vua_nixl_engine.errors import PromptTooLongError, StoreMismatchError
from vua_nixl_engine.hf_cache import batched_decode_view, paged_cache_view
from vua_nixl_engine.modeldir import LoadedModel, load_model
from vua_nixl_engine.paged import PagedKVCache
from vua_nixl_engine.saver import WriteBehindSaver

log = logging.getLogger(__name__)


@dataclass
class PrefillStats:
    """What one prefill did. ``ttft_s`` runs from the call to the first token being known."""

    first_token: int
    reused_tokens: int
    computed_tokens: int
    ttft_s: float
    prompt_tokens: int = 0
    lookup_s: float = 0.0  # store.lookup
    load_s: float = 0.0  # store.get (the batched transfer) + scatter into blocks
    get_s: float = 0.0  # store.get alone: one batched NIXL read + header/checksum validation
    scatter_s: float = 0.0  # staging buffer -> the sequence's paged blocks (0 on a direct load)
    cpu_s: float = 0.0  # process CPU time (all threads) during the prefill: robust to a busy machine
    load_path: str = ""  # "direct": the store wrote into the paged blocks; "staging": via a copy
    compute_s: float = 0.0  # model forward over the non-reused tokens
    save_queued_tokens: int = 0  # tokens handed to write-behind (0: nothing new to save)
    partial_tokens: int = 0  # of reused_tokens, loaded from the partial-tail store (past the last full chunk)
    logits: torch.Tensor | None = field(default=None, repr=False)  # float32 logits of the last prompt position


@dataclass
class Generation:
    token_ids: list[int]
    reused_tokens: int
    computed_tokens: int
    ttft_s: float
    prompt_tokens: int = 0
    total_s: float = 0.0
    prefill: PrefillStats | None = field(default=None, repr=False)


@dataclass(eq=False)
class Sequence:
    """One request's state: its tokens (prompt, then generated), blocks and progress.

    ``num_computed`` tokens have KV in the paged cache; tokens after that are *pending* and are
    fed to the model by the next ``prefill``/``step``.
    """

    seq_id: int
    tokens: list[int]
    prompt_len: int
    blocks: list[int]
    block_table: torch.Tensor
    num_computed: int = 0
    stored_tokens: int = 0  # prefix length known to be in (or on its way to) the store
    tail_stored: int = 0  # end of the partial tail saved (see Engine.partial_store)
    autosave: bool = True  # save chunks completed while decoding (Engine.save_during_decode)
    freed: bool = False

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]


def kv_shape_of(config: Any) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a transformers decoder config."""
    layers = int(config.num_hidden_layers)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return layers, kv_heads, head_dim


def namespace_for(loaded: LoadedModel) -> Namespace:
    """The store namespace of a loaded model's KV, without building an engine (no KV allocation).
    Open the store with it: ``KVStore(root, namespace_for(loaded))``."""
    layers, kv_heads, head_dim = kv_shape_of(loaded.model.config)
    dtype = next(loaded.model.parameters()).dtype
    return Namespace(
        model=loaded.model_id,
        dtype=dtype_name(dtype),
        layout=KVLayout(num_layers=layers, kv_heads=kv_heads, head_dim=head_dim),
        revision=loaded.revision,
    )


class Engine:
    """Greedy, one-sequence-at-a-time engine over a paged KV cache. Thread-safe: calls are
    serialized by a lock, so a threaded server can share one engine."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        store: Any = None,
        device: str | torch.device = "cpu",
        block_size: int = 16,
        num_blocks: int | None = None,
        max_pending_saves: int = 64,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = torch.device(device)
        self.max_context = int(loaded.max_context)
        self.eos_token_ids = list(loaded.eos_token_ids)
        self.num_layers, self.kv_heads, self.head_dim = kv_shape_of(self.model.config)
        self.vocab_size = int(self.model.get_input_embeddings().weight.shape[0])
        # Ids the model may emit: those the tokenizer can decode. Like engines mask a padded
        # vocabulary, greedy picks never land on embedding rows past the tokenizer (a preset's
        # offline tokenizer is much smaller than e.g. Qwen's 151,936-row table).
        n_tok = len(self.tokenizer) if self.tokenizer is not None else self.vocab_size
        self.emit_limit = max(1, min(self.vocab_size, int(n_tok)))
        self.dtype = next(self.model.parameters()).dtype
        self.block_size = int(block_size)
        if num_blocks is None:
            num_blocks = -(-self.max_context // self.block_size) + 1
        self.paged = PagedKVCache(
            num_layers=self.num_layers,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            num_blocks=int(num_blocks),
            block_size=self.block_size,
            dtype=self.dtype,
            device=self.device,
        )
        self.namespace = namespace_for(loaded)
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._staging: torch.Tensor | None = None
        self._max_pending_saves = max_pending_saves
        self.store: Any = None
        self.saver: WriteBehindSaver | None = None
        self.chunk_tokens = 0
        #: Save each store chunk of a sequence as soon as decoding completes it (prompt *and*
        #: generated tokens), so a request migrated to another worker after this one died loads
        #: the exact KV this worker computed instead of recomputing it (see docs/ENGINE.md).
        self.save_during_decode = True
        self.partial_store: Any = None
        self._tail_pool: ThreadPoolExecutor | None = None
        self._tail_jobs: list[Future] = []
        self.tail_stats = {"saved": 0, "failed": 0, "dropped": 0, "hits": 0, "tokens": 0}
        self.attach_store(store)

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_model(
        cls,
        model: str | os.PathLike = "tiny",
        *,
        store: Any = None,
        device: str | torch.device = "cpu",
        block_size: int = 16,
        num_blocks: int | None = None,
        dtype: torch.dtype | str | None = None,
        seed: int = 0,
    ) -> "Engine":
        """Build from a preset name (random weights from ``seed``) or a local model directory."""
        td = None
        if dtype is not None:
            from vua_nixl.dtypes import torch_dtype

            td = torch_dtype(dtype)
        loaded = load_model(model, device=device, dtype=td, seed=seed)
        return cls(loaded, store=store, device=device, block_size=block_size, num_blocks=num_blocks)

    def attach_store(self, store: Any) -> None:
        """Use ``store`` (a KVStore opened with ``engine.namespace``) from now on; None detaches.

        Pending saves to a previous store are finished first.
        """
        with self._lock:
            self._check_store(store)
            if self.saver is not None:
                self.saver.close()
            self.store = store
            self.chunk_tokens = int(getattr(store, "chunk_tokens", 0) or 0) if store is not None else 0
            self.saver = (
                WriteBehindSaver(store, self.paged, max_pending=self._max_pending_saves) if store is not None else None
            )

    def attach_partial_store(self, partial: Any) -> None:
        """Reuse a prompt's partial last chunk (``None`` turns it off).

        ``partial`` is a KVStore with the main store's root and namespace and
        ``chunk_tokens == block_size`` (see :func:`open_partial_store`): its chunk size is in the
        key chain's fingerprint, so its keys never collide with the main store's. The tokens
        past a prompt's last full chunk are saved there (whole engine blocks) as a *keyed
        partial block*: a synthetic sequence whose first block is a digest of the main store's
        key of the prefix before them, then the tail tokens. A later prompt that extends this
        one loads its full chunks from the main store, then the tail blocks whose tokens it
        shares, by looking up ``digest(prefix key) + its own next tokens``."""
        with self._lock:
            self.flush()
            if partial is not None:
                if int(partial.chunk_tokens) != self.block_size:
                    raise InvalidInputError(
                        f"the partial-tail store needs chunk_tokens == block_size ({self.block_size}), "
                        f"got {partial.chunk_tokens}")
                self._check_store(partial)
                if self._tail_pool is None:
                    self._tail_pool = ThreadPoolExecutor(1, thread_name_prefix="vua-tail-save")
            self.partial_store = partial

    def _tail_header(self, prefix_tokens: np.ndarray) -> np.ndarray:
        """The synthetic first block of a tail: a digest of the main store's key of the prefix
        before the tail (the key chains every earlier token, the namespace and chunk size)."""
        n = int(prefix_tokens.size)
        key = self.store.keys_for(prefix_tokens)[-1] if n else b"vua-nixl/empty-prefix"
        h = hashlib.blake2b(bytes(key), digest_size=4 * self.block_size, person=b"vua-tail-v1").digest()
        return np.frombuffer(h, dtype=np.uint32).astype(np.int64)

    def _load_tail(self, seq: Sequence, stats: PrefillStats) -> None:
        """After the full chunks: load stored whole blocks of the prompt's partial last chunk."""
        start = seq.num_computed
        probe_end = seq.prompt_len - 1
        bs = self.block_size
        if self.partial_store is None or not self.chunk_tokens or start % self.chunk_tokens:
            return
        if probe_end - start < bs:
            return
        try:
            header = self._tail_header(np.asarray(seq.tokens[:start], dtype=np.int64))
            synth = np.concatenate([header, np.asarray(seq.tokens[start:probe_end], dtype=np.int64)])
            matched = int(self.partial_store.lookup(synth))
            n = matched - bs
            if n <= 0:
                return
            buf = self._staging_buffer(matched)
            res = self.partial_store.get(synth[:matched], out=buf)
            got = int(res.tokens or 0) - bs
            if got <= 0 or res.kv is None:
                return
        except (VuaNixlError, OSError) as exc:
            log.warning("partial-tail load failed, computing the tail instead: %s", exc)
            return
        self._ensure_capacity(seq, start + got)
        self.paged.scatter(self.paged.slots(seq.block_table, start, start + got), res.kv[:, :, bs : bs + got])
        seq.num_computed = start + got
        seq.tail_stored = start + got
        stats.partial_tokens = got
        self.tail_stats["hits"] += 1
        self.tail_stats["tokens"] += got

    def _queue_tail_save(self, seq: Sequence) -> int:
        """Save the whole engine blocks past the last full chunk (write-behind). Returns tokens."""
        if self.partial_store is None or self._tail_pool is None or not self.chunk_tokens:
            return 0
        bs = self.block_size
        start = (seq.num_computed // self.chunk_tokens) * self.chunk_tokens
        end = (seq.num_computed // bs) * bs
        if end <= start or end <= seq.tail_stored:
            return 0
        self._tail_jobs = [f for f in self._tail_jobs if not f.done()]
        if len(self._tail_jobs) >= self._max_pending_saves:
            self.tail_stats["dropped"] += 1
            return 0
        header = self._tail_header(np.asarray(seq.tokens[:start], dtype=np.int64))
        synth = np.concatenate([header, np.asarray(seq.tokens[start:end], dtype=np.int64)])
        kv = torch.zeros((self.num_layers, 2, end - start + bs, self.kv_heads, self.head_dim), dtype=self.dtype)
        kv[:, :, bs:] = self.paged.gather(self.paged.slots(seq.block_table, start, end)).cpu()
        store, stats = self.partial_store, self.tail_stats

        def job() -> None:
            try:
                store.put(synth, kv)
                stats["saved"] += 1
            except Exception:
                stats["failed"] += 1
                log.warning("saving a partial tail failed", exc_info=True)

        self._tail_jobs.append(self._tail_pool.submit(job))
        seq.tail_stored = end
        return end - start

    def stored_prefix(self, token_ids: Seq[int]) -> int:
        """Tokens of ``token_ids`` a prefill could load: full chunks plus the partial tail."""
        if self.store is None:
            return 0
        probe = np.asarray(list(token_ids), dtype=np.int64)
        n = int(self.store.lookup(probe))
        if self.partial_store is None or n % max(self.chunk_tokens, 1) or probe.size - n < self.block_size:
            return n
        synth = np.concatenate([self._tail_header(probe[:n]), probe[n:]])
        return n + max(0, int(self.partial_store.lookup(synth)) - self.block_size)

    def _check_store(self, store: Any) -> None:
        ns = getattr(store, "namespace", None) if store is not None else None
        if ns is None or ns == self.namespace:
            return
        diffs = []
        for name in ("model", "revision", "dtype", "layout", "tp_size", "tp_rank", "pp_size", "pp_rank"):
            a, b = getattr(ns, name, None), getattr(self.namespace, name, None)
            if a != b:
                diffs.append(f"{name}: store {a!r} vs model {b!r}")
        if not diffs:
            return  # differs only in tenant: a valid store for this model
        raise StoreMismatchError(
            "the KVStore's namespace does not match this model's KV (" + "; ".join(diffs) + "); "
            "open the store with engine.namespace, e.g. KVStore(root, engine.namespace)"
        )

    # ---- sequences --------------------------------------------------------------------------
    def _validate_tokens(self, token_ids: Any) -> list[int]:
        if isinstance(token_ids, torch.Tensor):
            if token_ids.is_floating_point() or token_ids.dim() != 1:
                raise InvalidInputError("token_ids must be a 1-D integer sequence")
            ids = [int(t) for t in token_ids.tolist()]
        else:
            arr = np.asarray(list(token_ids) if not isinstance(token_ids, np.ndarray) else token_ids)
            if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
                raise InvalidInputError("token_ids must be a 1-D integer sequence")
            ids = [int(t) for t in arr.tolist()]
        if not ids:
            raise InvalidInputError("empty prompt: at least one token is needed")
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise InvalidInputError(f"token id {bad} is outside the model's vocabulary (0..{self.vocab_size - 1})")
        return ids

    def _check_length(self, n: int, extra: int = 0) -> None:
        if n + extra > self.max_context:
            more = f" plus {extra} tokens to generate" if extra else ""
            raise PromptTooLongError(
                f"prompt of {n} tokens{more} exceeds the model's context length of {self.max_context} tokens"
            )

    def start(self, token_ids: Iterable[int]) -> Sequence:
        """Validate a prompt and allocate its blocks. Raises PromptTooLongError / OutOfBlocksError."""
        ids = self._validate_tokens(token_ids)
        self._check_length(len(ids))
        blocks = self.paged.allocate(self.paged.blocks_for(len(ids)))
        return Sequence(
            seq_id=next(self._ids),
            tokens=ids,
            prompt_len=len(ids),
            blocks=blocks,
            block_table=torch.tensor(blocks, dtype=torch.long, device=self.device),
        )

    def _ensure_capacity(self, seq: Sequence, n_tokens: int) -> None:
        need = self.paged.blocks_for(n_tokens) - len(seq.blocks)
        if need > 0:
            seq.blocks.extend(self.paged.allocate(need))
            seq.block_table = torch.tensor(seq.blocks, dtype=torch.long, device=self.device)

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks (a pending write-behind save keeps them until it is done)."""
        with self._lock:
            if seq.freed:
                return
            seq.freed = True
            self.paged.release(seq.blocks)
            seq.blocks = []

    # ---- compute ----------------------------------------------------------------------------
    def _forward(self, seq: Sequence) -> torch.Tensor:
        """Run the model over the sequence's pending tokens; return last-position float32 logits."""
        if seq.freed:
            raise InvalidInputError(f"sequence {seq.seq_id} was freed")
        past, total = seq.num_computed, len(seq.tokens)
        if total <= past:
            raise InvalidInputError(
                f"sequence {seq.seq_id} has no pending token: all {total} tokens already have KV. "
                "Append the next token first (engine.append(seq, token)); on the decode side of "
                "disaggregation pass prompt + [first_token] to start_with_kv"
            )
        self._check_length(total)
        self._ensure_capacity(seq, total)
        cache = paged_cache_view(self.paged, seq.block_table, past, total - past)
        ids = torch.tensor([seq.tokens[past:]], dtype=torch.long, device=self.device)
        pos = torch.arange(past, total, device=self.device).unsqueeze(0)
        with torch.inference_mode():
            out = self.model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
        seq.num_computed = total
        return out.logits[0, -1].float()

    def _staging_buffer(self, tokens: int) -> torch.Tensor:
        """A contiguous canonical ``[L, 2, tokens, H, D]`` buffer, reused across requests so the
        store's NIXL registration of it can be reused too."""
        per_token = 2 * self.num_layers * self.kv_heads * self.head_dim
        need = per_token * tokens
        if self._staging is None or self._staging.numel() < need:
            self._staging = torch.empty(need, dtype=self.dtype, device="cpu")
        return self._staging[:need].view(self.num_layers, 2, tokens, self.kv_heads, self.head_dim)

    def _load_prefix(self, seq: Sequence, stats: PrefillStats) -> None:
        """Load the longest stored prefix of the prompt (leaving >= 1 token to compute)."""
        probe = np.asarray(seq.tokens[: seq.prompt_len - 1], dtype=np.int64)
        if probe.size < max(self.chunk_tokens, 1):
            return
        t0 = time.perf_counter()
        try:
            matched = int(self.store.lookup(probe))
        except (VuaNixlError, OSError) as exc:
            log.warning("store lookup failed, computing the whole prompt: %s", exc)
            return
        t1 = time.perf_counter()
        stats.lookup_s = t1 - t0
        if matched <= 0:
            return
        # Straight into the sequence's blocks when they are consecutive (the usual case: start()
        # allocates runs); otherwise into a staging buffer and one scatter.
        out = self.paged.contiguous_view(seq.blocks, matched)
        direct = out is not None
        if out is None:
            out = self._staging_buffer(matched)
        try:
            res = self.store.get(probe[:matched], out=out)
        except (VuaNixlError, OSError) as exc:
            log.warning("store load of %d tokens failed, computing them instead: %s", matched, exc)
            return
        t2 = time.perf_counter()
        stats.get_s = t2 - t1
        n = int(res.tokens or 0)
        if n > 0 and res.kv is not None:
            if not direct:
                self.paged.scatter(self.paged.slots(seq.block_table, 0, n), res.kv[:, :, :n])
            stats.load_path = "direct" if direct else "staging"
            seq.num_computed = n
            seq.stored_tokens = n
        t3 = time.perf_counter()
        stats.scatter_s = t3 - t2
        stats.load_s = t3 - t1

    def prefill(self, seq: Sequence, *, use_store: bool = True, save: bool = True) -> PrefillStats:
        """Compute the prompt's KV (reusing what the store has) and the first token.

        ``use_store=False`` skips the lookup (a plain prefill, the no-store baseline);
        ``save=False`` skips the write-behind save.
        """
        with self._lock:
            t0 = time.perf_counter()
            c0 = time.process_time()
            if seq.num_computed >= len(seq.tokens):
                raise InvalidInputError(f"sequence {seq.seq_id} is already prefilled; use step()")
            stats = PrefillStats(first_token=-1, reused_tokens=0, computed_tokens=0, ttft_s=0.0, prompt_tokens=seq.prompt_len)
            if self.store is not None and use_store and seq.num_computed == 0:
                self._load_prefix(seq, stats)
                self._load_tail(seq, stats)
            stats.reused_tokens = seq.num_computed
            t1 = time.perf_counter()
            stats.computed_tokens = len(seq.tokens) - seq.num_computed
            logits = self._forward(seq)
            first = self._pick(logits)
            stats.compute_s = time.perf_counter() - t1
            stats.ttft_s = time.perf_counter() - t0
            stats.cpu_s = time.process_time() - c0
            stats.first_token = first
            stats.logits = logits
            seq.tokens.append(first)
            if save and self.saver is not None and self.chunk_tokens:
                stats.save_queued_tokens = self._queue_save(seq)
                self._queue_tail_save(seq)
            return stats

    def _queue_save(self, seq: Sequence) -> int:
        """Hand the prompt's full chunks not yet in the store to the write-behind saver."""
        n_full = (min(seq.prompt_len, seq.num_computed) // self.chunk_tokens) * self.chunk_tokens
        if n_full <= seq.stored_tokens:
            return 0
        ok = self.saver.submit(np.asarray(seq.tokens, dtype=np.int64), seq.block_table, seq.blocks, n_full)
        if ok:
            seq.stored_tokens = n_full
        return n_full if ok else 0

    def save_sequence(self, seq: Sequence) -> int:
        """Queue the full chunks of everything computed so far, prompt *and* generated tokens
        (call it when a request ends, before :meth:`free`): the next turn of a chat, whose
        prompt is this prompt + this reply, then reuses both. Returns the tokens queued."""
        with self._lock:
            if self.saver is None or not self.chunk_tokens:
                return 0
            self._queue_tail_save(seq)
            n_full = (seq.num_computed // self.chunk_tokens) * self.chunk_tokens
            if n_full <= seq.stored_tokens:
                return 0
            ok = self.saver.submit(np.asarray(seq.tokens, dtype=np.int64), seq.block_table, seq.blocks, n_full)
            if ok:
                seq.stored_tokens = n_full
            return n_full if ok else 0

    def append(self, seq: Sequence, token: int) -> None:
        """Append a token (e.g. the first token computed by a prefill worker) to be fed by step()."""
        with self._lock:
            tok = self._validate_tokens([token])[0]
            self._check_length(len(seq.tokens) + 1)
            seq.tokens.append(tok)

    def step(self, seq: Sequence) -> int:
        """One greedy decode step: feed the pending token(s), return the next token id."""
        with self._lock:
            self._check_length(len(seq.tokens) + 1)
            logits = self._forward(seq)
            tok = self._pick(logits)
            seq.tokens.append(tok)
            self._save_progress(seq)
            return tok

    def step_batch(self, seqs: Seq[Sequence]) -> list[int]:
        """One greedy decode step for several sequences with **one forward pass** over the batch.

        Each sequence must have exactly one pending token (the usual decode state); its K/V is
        written into its own paged blocks and every row attends over exactly its own tokens
        (right-padded gather + a 4-D mask, per-row position ids). Sequences with more than one
        pending token (e.g. a hand-off's ``first_token`` plus more) are stepped one at a time.
        Returns the next token of each sequence, in order. In float32 the tokens equal those of
        :meth:`step` called on each sequence (tests/test_batching.py)."""
        with self._lock:
            if not seqs:
                return []
            if len({id(s) for s in seqs}) != len(seqs):
                raise InvalidInputError("step_batch got the same sequence twice")
            for s in seqs:  # validate everything first: an error steps no sequence
                if s.freed:
                    raise InvalidInputError(f"sequence {s.seq_id} was freed")
                if len(s.tokens) <= s.num_computed:
                    raise InvalidInputError(f"sequence {s.seq_id} has no pending token")
                self._check_length(len(s.tokens) + 1)
            batch = [i for i, s in enumerate(seqs) if not s.freed and len(s.tokens) - s.num_computed == 1]
            out: list[int | None] = [None] * len(seqs)
            if len(batch) > 1:
                for i, tok in zip(batch, self._batched_step([seqs[i] for i in batch])):
                    out[i] = tok
            for i, s in enumerate(seqs):
                if out[i] is None:
                    out[i] = self.step(s)  # raises the usual errors (freed, no pending token...)
            return [int(t) for t in out]  # type: ignore[arg-type]

    def _batched_step(self, seqs: list[Sequence]) -> list[int]:
        lens = []
        for s in seqs:
            self._check_length(len(s.tokens) + 1)
            self._ensure_capacity(s, len(s.tokens))
            lens.append(len(s.tokens))
        b, t_max = len(seqs), max(lens)
        lens_t = torch.tensor(lens, dtype=torch.long, device=self.device)
        all_slots = torch.zeros((b, t_max), dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            all_slots[i, : lens[i]] = self.paged.slots(s.block_table, 0, lens[i])
        rows = torch.arange(b, device=self.device)
        new_slots = all_slots[rows, lens_t - 1]
        valid = torch.arange(t_max, device=self.device).unsqueeze(0) < lens_t.unsqueeze(1)
        mask = torch.zeros((b, 1, 1, t_max), dtype=self.dtype, device=self.device)
        mask.masked_fill_(~valid.view(b, 1, 1, t_max), torch.finfo(self.dtype).min)
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], dtype=torch.long, device=self.device)
        pos = (lens_t - 1).unsqueeze(1)
        cache = batched_decode_view(self.paged, new_slots, all_slots)
        with torch.inference_mode():
            res = self.model(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
        logits = res.logits[:, -1].float()
        toks = torch.argmax(logits[:, : self.emit_limit], dim=-1).tolist()
        for s, n, tok in zip(seqs, lens, toks):
            s.num_computed = n
            s.tokens.append(int(tok))
            self._save_progress(s)
        return [int(t) for t in toks]

    def _save_progress(self, seq: Sequence) -> None:
        """While decoding, queue each newly completed store chunk (see ``save_during_decode``)."""
        if not (self.save_during_decode and seq.autosave) or self.saver is None or not self.chunk_tokens:
            return
        n_full = (seq.num_computed // self.chunk_tokens) * self.chunk_tokens
        if n_full > seq.stored_tokens and n_full > seq.prompt_len:
            if self.saver.submit(np.asarray(seq.tokens, dtype=np.int64), seq.block_table, seq.blocks, n_full):
                seq.stored_tokens = n_full

    def _pick(self, logits: torch.Tensor) -> int:
        """Greedy choice among the ids the tokenizer can decode."""
        return int(torch.argmax(logits[: self.emit_limit]))

    def generate(
        self,
        token_ids: Iterable[int],
        max_new_tokens: int = 16,
        *,
        use_store: bool = True,
        save: bool = True,
        stop_at_eos: bool = True,
    ) -> Generation:
        """Prefill + greedy decode of up to ``max_new_tokens`` tokens (the first one included)."""
        if max_new_tokens < 1:
            raise InvalidInputError("max_new_tokens must be at least 1")
        ids = self._validate_tokens(token_ids)
        self._check_length(len(ids), max_new_tokens)
        t0 = time.perf_counter()
        seq = self.start(ids)
        seq.autosave = save
        try:
            stats = self.prefill(seq, use_store=use_store, save=save)
            out = [stats.first_token]
            while len(out) < max_new_tokens and not (stop_at_eos and out[-1] in self.eos_token_ids):
                out.append(self.step(seq))
        finally:
            self.free(seq)
        return Generation(
            token_ids=out,
            reused_tokens=stats.reused_tokens,
            computed_tokens=stats.computed_tokens,
            ttft_s=stats.ttft_s,
            prompt_tokens=len(ids),
            total_s=time.perf_counter() - t0,
            prefill=stats,
        )

    # ---- KV import / export (disaggregation) --------------------------------------------------
    def export_kv(self, seq: Sequence) -> torch.Tensor:
        """Canonical ``[L, 2, n, H, D]`` KV of the sequence's computed tokens (a copy)."""
        with self._lock:
            return self.paged.gather(self.paged.slots(seq.block_table, 0, seq.num_computed))

    def start_with_kv(self, token_ids: Iterable[int], kv: torch.Tensor) -> Sequence:
        """Start a sequence whose first ``kv.shape[2]`` tokens' KV was computed elsewhere.

        For the decode side of disaggregated serving pass ``prompt + [first_token]`` and the
        prompt's KV: the next ``step()`` feeds ``first_token`` and returns the second token.
        """
        with self._lock:
            if not isinstance(kv, torch.Tensor) or kv.dim() != 5:
                raise InvalidInputError("kv must be a canonical [layers, 2, tokens, kv_heads, head_dim] tensor")
            ids = self._validate_tokens(token_ids)
            n = int(kv.shape[2])
            expected = (self.num_layers, 2, n, self.kv_heads, self.head_dim)
            if tuple(kv.shape) != expected:
                raise InvalidInputError(f"kv has shape {tuple(kv.shape)}, this model needs {expected}")
            if kv.dtype != self.dtype:
                raise InvalidInputError(f"kv dtype {kv.dtype} does not match the model's KV dtype {self.dtype}")
            if n > len(ids):
                raise InvalidInputError(f"kv covers {n} tokens but only {len(ids)} token ids were given")
            seq = self.start(ids)
            if n:
                self.paged.scatter(self.paged.slots(seq.block_table, 0, n), kv)
            seq.num_computed = n
            seq.prompt_len = n if n < len(ids) else len(ids)
            return seq

    # ---- lifecycle --------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait for write-behind saves to reach the store; False on timeout."""
        ok = True if self.saver is None else self.saver.flush(timeout)
        jobs, deadline = list(self._tail_jobs), None if timeout is None else time.monotonic() + timeout
        for f in jobs:
            try:
                f.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except Exception:
                ok = False
        return ok

    def close(self) -> None:
        if self.saver is not None:
            self.saver.close()
        self.flush()
        if self._tail_pool is not None:
            self._tail_pool.shutdown(wait=True)
            self._tail_pool = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Seq[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)

    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.paged.kv.element_size()


def open_partial_store(store: Any, block_size: int, **kwargs: Any) -> Any:
    """The partial-tail store for ``store`` (same root, namespace and NIXL agent;
    ``chunk_tokens = block_size``), for :meth:`Engine.attach_partial_store`."""
    from vua_nixl.store import KVStore

    return KVStore(store.paths.root, store.namespace, chunk_tokens=int(block_size), agent=store.agent, **kwargs)
