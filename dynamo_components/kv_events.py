"""Tell Dynamo's KV router which prefixes a worker can serve, and from which tier.

Dynamo's router keeps a radix tree of KV blocks per worker and credits a worker for the
blocks of a request's prefix it already holds: 1.0 per block on the device tier, 0.75 on the
host tier and ``disk_cache_hit_weight`` (0.25 by default) on the disk/external tiers. Nothing
in Dynamo publishes a *shared* tier, so a prefix stored by worker A is invisible to the router
when it considers worker B, although B could load it from the shared store.

This module closes that gap:

* :class:`KvTierPublisher` feeds tier-tagged vLLM-style events (``BlockStored`` /
  ``BlockRemoved`` with a ``medium``) into Dynamo's own ``KvEventPublisher`` in *relay mode*,
  the only public path that carries a storage tier (``publish_stored`` is device-only).
  ``EXTERNAL`` maps to the router's external tier, ``GPU`` to the device tier.
* :class:`SharedTierAdvertiser` is a store observer that announces this worker's own puts at
  once and follows the store root's shared access log (the lifecycle's one event log: every
  process appends ``stored`` / ``evicted`` / ``removed`` / ``corrupt`` records) to announce
  what *other* workers stored and withdraw what anyone evicted. So each worker advertises
  *all* of the store's prefixes as its own external-tier blocks, which is exactly what the
  shared store makes true. A restarted worker replays the compacted access index and
  re-advertises the store's contents (restart persistence extends to the router). A bounded
  background sweep re-checks advertised chunks against the files.

Block identity: the router recomputes each block's *local* hash from the event's token ids
(XXH3-64 over the block's tokens, i.e. ``compute_block_hash_for_seq(tokens, block_size)``);
the ``block_hashes`` we send are the external, prefix-chained identifiers the router uses to
link a block to its parent and to remove it later. They are derived deterministically from
the local hashes, so every worker names the same prefix block the same way.
"""

from __future__ import annotations

import logging
import os
import queue
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import xxhash

from vua_nixl.errors import VuaNixlError
from vua_nixl.format import read_header_file
from vua_nixl.lifecycle.accesslog import CORRUPT, EVICTED, REMOVED, STORED, LogFollower
from vua_nixl.lifecycle.index import AccessIndex
from vua_nixl.store.observers import StoreObserver

log = logging.getLogger(__name__)

#: vLLM event "medium" for blocks that live in the shared vua-nixl store (router tier: external).
MEDIUM_SHARED = "EXTERNAL"
#: vLLM event "medium" for blocks a worker holds in its own accelerator/host memory (tier: device).
MEDIUM_DEVICE = "GPU"

_U64 = 1 << 64
_I64_MAX = (1 << 63) - 1


def to_signed64(value: int) -> int:
    """Map an unsigned 64-bit hash to the signed range Dynamo's bindings expect."""
    value &= _U64 - 1
    return value - _U64 if value > _I64_MAX else value


def local_block_hashes(tokens: Sequence[int], block_size: int) -> list[int]:
    """Per-block hashes exactly as Dynamo's router computes them (full blocks only)."""
    from dynamo.llm import compute_block_hash_for_seq

    n_full = (len(tokens) // block_size) * block_size
    if n_full == 0:
        return []
    return [int(h) for h in compute_block_hash_for_seq(list(map(int, tokens[:n_full])), block_size)]


def chained_block_hashes(tokens: Sequence[int], block_size: int) -> list[int]:
    """Prefix-chained, signed 64-bit block identifiers for every full block of ``tokens``.

    ``h[i] = xxh3_64(h[i-1] || local[i])``: equal prefixes give equal identifiers in every
    process (no PYTHONHASHSEED dependence), and a block's identifier depends on its whole
    prefix, like a vLLM block hash.
    """
    out: list[int] = []
    parent = 0
    for local in local_block_hashes(tokens, block_size):
        parent = to_signed64(xxhash.xxh3_64_intdigest(struct.pack("<qQ", parent, local & (_U64 - 1))))
        out.append(parent)
    return out


class KvTierPublisher:
    """Publish tier-tagged KV block events for one worker through Dynamo's relay mode.

    A ZMQ ``XPUB`` socket on loopback is the "engine side" of Dynamo's relay; Dynamo's
    ``KvEventPublisher(zmq_endpoint=...)`` subscribes to it and forwards every event onto the
    event plane under this worker's id. ``XPUB`` (not ``PUB``) lets us see the subscription
    arrive and hold events until then, so nothing published during start-up is lost to ZMQ's
    slow-joiner drop. The socket is owned by one background thread because ZMQ sockets are not
    thread-safe and events come from the asyncio loop and from executor threads alike.
    """

    def __init__(
        self,
        endpoint: Any,
        block_size: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        enable_local_indexer: bool = True,
        dp_rank: int = 0,
    ) -> None:
        import zmq  # noqa: F401  (fail early and clearly when pyzmq is missing)

        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.block_size = int(block_size)
        self.dp_rank = int(dp_rank)
        self._queue: queue.Queue[list[dict[str, Any]] | None] = queue.Queue()
        self._ready = threading.Event()
        self._subscribed = threading.Event()
        self._bound: str | None = None
        self._error: BaseException | None = None
        self._seq = 0
        self._thread = threading.Thread(
            target=self._run, args=(host, port), name="vua-kv-events", daemon=True
        )
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None or self._bound is None:
            raise RuntimeError(f"cannot bind the KV event socket: {self._error}")
        from dynamo.llm import KvEventPublisher

        self._publisher = KvEventPublisher(
            endpoint,
            kv_block_size=self.block_size,
            dp_rank=self.dp_rank,
            enable_local_indexer=enable_local_indexer,
            zmq_endpoint=self._bound,
        )
        log.info("KV tier events relayed through %s (block size %d)", self._bound, self.block_size)

    @property
    def zmq_endpoint(self) -> str:
        """The loopback ZMQ endpoint Dynamo's relay subscribes to."""
        assert self._bound is not None
        return self._bound

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        """Block until Dynamo's relay has subscribed (events are buffered until then)."""
        return self._subscribed.wait(timeout)

    # -- events -----------------------------------------------------------------------
    def stored(
        self,
        tokens: Sequence[int],
        first_block: int,
        end_block: int,
        medium: str = MEDIUM_SHARED,
        *,
        hashes: Sequence[int] | None = None,
    ) -> list[int]:
        """Announce blocks ``[first_block, end_block)`` of the prefix ``tokens``.

        Returns the chained identifiers of the announced blocks (for a later removal).
        """
        bs = self.block_size
        end_block = min(end_block, len(tokens) // bs)
        if end_block <= first_block:
            return []
        chain = list(hashes) if hashes is not None else chained_block_hashes(tokens[: end_block * bs], bs)
        new = chain[first_block:end_block]
        parent = chain[first_block - 1] if first_block > 0 else None
        self._send(
            [
                {
                    "type": "BlockStored",
                    "block_hashes": new,
                    "parent_block_hash": parent,
                    "token_ids": [int(t) for t in tokens[first_block * bs : end_block * bs]],
                    "block_size": bs,
                    "lora_id": None,
                    "medium": medium,
                }
            ]
        )
        return new

    def stored_chain(
        self, parent: int | None, hashes: Sequence[int], token_ids: Sequence[int], medium: str
    ) -> None:
        """Announce pre-hashed blocks (used when replaying a journal record)."""
        if not hashes:
            return
        self._send(
            [
                {
                    "type": "BlockStored",
                    "block_hashes": list(hashes),
                    "parent_block_hash": parent,
                    "token_ids": [int(t) for t in token_ids],
                    "block_size": self.block_size,
                    "lora_id": None,
                    "medium": medium,
                }
            ]
        )

    def removed(self, hashes: Iterable[int], medium: str = MEDIUM_SHARED) -> None:
        """Announce that blocks are gone from ``medium``."""
        hashes = list(hashes)
        if hashes:
            self._send([{"type": "BlockRemoved", "block_hashes": hashes, "medium": medium}])

    def close(self) -> None:
        """Stop the relay thread and Dynamo's subscriber."""
        try:
            self._publisher.shutdown()
        except Exception:  # pragma: no cover - shutdown is best effort
            log.debug("KvEventPublisher shutdown failed", exc_info=True)
        self._queue.put(None)
        self._thread.join(timeout=5)

    # -- socket thread ----------------------------------------------------------------
    def _send(self, events: list[dict[str, Any]]) -> None:
        self._queue.put(events)

    def _run(self, host: str, port: int) -> None:
        import zmq

        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.XPUB)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            if port:
                sock.bind(f"tcp://{host}:{port}")
                self._bound = f"tcp://{host}:{port}"
            else:
                chosen = sock.bind_to_random_port(f"tcp://{host}")
                self._bound = f"tcp://{host}:{chosen}"
        except BaseException as exc:  # surfaced to the constructor
            self._error = exc
            sock.close()
            self._ready.set()
            return
        self._ready.set()
        pending: list[list[dict[str, Any]]] = []
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while True:
                for s, _ in poller.poll(20):
                    msg = s.recv()
                    if msg and msg[0] == 1 and not self._subscribed.is_set():
                        log.debug("KV event relay subscribed")
                        self._subscribed.set()
                stop = False
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    pending.append(item)
                if self._subscribed.is_set():
                    for events in pending:
                        self._seq += 1
                        payload = msgpack.packb([time.time(), events, self.dp_rank], use_bin_type=True)
                        sock.send_multipart([b"", self._seq.to_bytes(8, "big"), payload])
                    pending.clear()
                if stop:
                    return
        finally:
            sock.close(linger=0)


# ------------------------------------------------------------------------------------------
# Advertiser: store + the root's access log + publisher
# ------------------------------------------------------------------------------------------


@dataclass
class StoredRecord:
    """A chunk known to be in the store: key, parent key (None for a prompt's first chunk), tokens."""

    key: str
    parent: str | None
    tokens: list[int] = field(default_factory=list)


@dataclass
class _Chunk:
    parent: str | None  # parent chunk key (hex); None for a prompt's first chunk
    tokens: tuple[int, ...]
    hashes: list[int] | None = None  # chained block ids, once the parent's chain is known


class SharedTierAdvertiser(StoreObserver):
    """Keeps the router's view of this worker's shared-tier blocks equal to the store's contents.

    Sources of truth, all funnelled into one table of store chunks (by chunk key):

    * ``on_stored`` / ``on_removed``: :class:`vua_nixl.store.KVStore` observer hooks, called for
      chunks this process wrote or deleted (from the store's writer thread);
    * :meth:`note_prompt`: after a request, every stored chunk of its prompt, including chunks
      written by processes that keep no access log;
    * :meth:`poll_log`: chunks other processes stored, evicted, removed or quarantined, read from
      the root's shared access log (the lifecycle's one event log; token ids come from the
      block headers, so the log itself stays small and fixed-size);
    * :meth:`replay`: at start-up, every chunk the compacted access index knows;
    * :meth:`validate`: a bounded background sweep for chunks whose files disappeared without
      a record this process saw (a log consumed before it was read, a crash).

    Each store chunk of ``chunk_tokens`` tokens is announced as ``chunk_tokens / block_size``
    router blocks, chained from the parent chunk's last block.
    """

    def __init__(self, publisher: KvTierPublisher, store: Any, follower: LogFollower | None = None) -> None:
        self.publisher = publisher
        self.store = store
        self.follower = follower
        self.block_size = publisher.block_size
        chunk = int(store.chunk_tokens)
        if chunk % self.block_size:
            raise ValueError(f"store chunk_tokens {chunk} is not a multiple of the block size {self.block_size}")
        self._chunks: dict[str, _Chunk] = {}
        self._pending: set[str] = set()  # chunks whose parent chain is not known yet
        self._lock = threading.RLock()
        self._sweep: list[str] = []  # keys left to check in the current validation sweep

    # -- introspection -----------------------------------------------------------------
    @property
    def advertised_blocks(self) -> int:
        """Router blocks currently announced on the shared tier by this worker."""
        with self._lock:
            return sum(len(c.hashes) for c in self._chunks.values() if c.hashes)

    @property
    def known_chunks(self) -> int:
        with self._lock:
            return len(self._chunks)

    # -- StoreObserver hooks -----------------------------------------------------------
    def on_stored(self, store: Any, chunks: Sequence[Any]) -> None:
        """Store hook: chunks this process just published."""
        root = getattr(store, "fingerprint", None)
        recs = []
        for c in sorted(chunks, key=lambda c: c.index):
            parent = None if (c.index == 0 or c.parent == root) else c.parent.hex()
            recs.append(StoredRecord(c.key.hex(), parent, [int(t) for t in c.tokens]))
        self._apply(recs)

    def on_removed(self, store: Any, keys: Sequence[bytes], reason: str) -> None:
        """Store hook: chunks this process deleted or evicted."""
        self._remove([k.hex() for k in keys])

    # -- other sources -----------------------------------------------------------------
    def note_prompt(self, tokens: Sequence[int]) -> int:
        """Advertise every stored chunk of ``tokens``' prefix not known yet; returns how many."""
        keys = self.store.keys_for(tokens)
        if not keys:
            return 0
        with self._lock:
            if all(k.hex() in self._chunks for k in keys):
                return 0
        have = int(self.store.lookup(tokens)) // int(self.store.chunk_tokens)
        ct = int(self.store.chunk_tokens)
        recs = []
        for i in range(have):
            kh = keys[i].hex()
            with self._lock:
                if kh in self._chunks and self._chunks[kh].hashes is not None:
                    continue
            recs.append(StoredRecord(kh, keys[i - 1].hex() if i else None, [int(t) for t in tokens[i * ct : (i + 1) * ct]]))
        return self._apply(recs)

    def poll_log(self) -> int:
        """Apply what other processes recorded in the root's access log; returns chunks changed."""
        if self.follower is None:
            return 0
        recs = self.follower.read_new({STORED, EVICTED, REMOVED, CORRUPT})
        with self._lock:
            new = [r.key for r in recs if r.kind == STORED and r.key.hex() not in self._chunks]
        changed = self._apply(self._from_headers(new))
        gone = [r.key.hex() for r in recs if r.kind != STORED]
        return changed + self._remove(gone)

    def replay(self) -> int:
        """Start-up: advertise every chunk of this namespace that the compacted access index
        knows, then whatever the logs add. Returns how many chunks were announced."""
        idx = AccessIndex.load(self.store.paths.root)
        keys = list(idx.blocks.get(self.store.fp_hex, {}))
        return self._apply(self._from_headers(keys)) + self.poll_log()

    def validate(self, limit: int = 256) -> int:
        """Check up to ``limit`` advertised chunks (a rolling sweep over all of them) and withdraw
        those whose block file is gone; returns how many were withdrawn."""
        with self._lock:
            if not self._sweep:
                self._sweep = list(self._chunks)
            batch, self._sweep = self._sweep[:limit], self._sweep[limit:]
        gone = []
        for kh in batch:
            try:
                if not os.path.exists(self.store.block_path(bytes.fromhex(kh))):
                    gone.append(kh)
            except (ValueError, OSError):
                gone.append(kh)
        if gone:
            log.info("withdrawing %d shared-tier chunks that left the store", len(gone))
        return self._remove(gone)

    def _from_headers(self, keys: Sequence[bytes]) -> list[StoredRecord]:
        """Tokens and parents of chunks other processes stored, from their block headers."""
        out = []
        root = self.store.fingerprint
        for key in keys:
            try:
                h = read_header_file(self.store.block_path(key))
            except (OSError, VuaNixlError):
                continue  # gone already, or not a valid block: nothing to advertise
            if h.key != key or h.namespace != root or len(h.tokens) != 8 * int(self.store.chunk_tokens):
                continue  # (a sealed tenant block carries a digest, not token ids: not advertised)
            toks = np.frombuffer(h.tokens, dtype="<i8").tolist()
            out.append(StoredRecord(key.hex(), None if h.parent == root else h.parent.hex(), toks))
        return out

    # -- core ---------------------------------------------------------------------------
    def _chain(self, chunk: _Chunk) -> list[int] | None:
        if chunk.hashes is not None:
            return chunk.hashes
        if chunk.parent is None:
            start = 0
        else:
            parent = self._chunks.get(chunk.parent)
            if parent is None or parent.hashes is None:
                return None
            start = parent.hashes[-1]
        out = []
        h = start
        for local in local_block_hashes(chunk.tokens, self.block_size):
            h = to_signed64(xxhash.xxh3_64_intdigest(struct.pack("<qQ", h, local & (_U64 - 1))))
            out.append(h)
        chunk.hashes = out
        return out

    def _apply(self, recs: Sequence[StoredRecord]) -> int:
        """Record chunks, announce those whose chain resolves (children wait for parents)."""
        ct = int(self.store.chunk_tokens)
        announce: list[tuple[int | None, list[int], tuple[int, ...]]] = []
        with self._lock:
            for r in recs:
                kh = r.key
                if len(r.tokens) != ct:
                    log.warning("ignoring a chunk record with %d tokens (chunk is %d)", len(r.tokens), ct)
                    continue
                if kh in self._chunks:
                    continue
                self._chunks[kh] = _Chunk(r.parent, tuple(r.tokens))
                self._pending.add(kh)
            # Resolve until no progress: records may arrive child-first from different files.
            progress = True
            while progress and self._pending:
                progress = False
                for kh in list(self._pending):
                    c = self._chunks.get(kh)
                    if c is None:
                        self._pending.discard(kh)
                    elif self._chain(c) is not None:
                        self._pending.discard(kh)
                        parent_hash = self._chunks[c.parent].hashes[-1] if c.parent else None  # type: ignore[index]
                        announce.append((parent_hash, c.hashes, c.tokens))  # type: ignore[arg-type]
                        progress = True
        for parent_hash, hashes, toks in announce:
            self.publisher.stored_chain(parent_hash, hashes, toks, MEDIUM_SHARED)
        return len(announce)

    def _remove(self, keys: Sequence[str]) -> int:
        gone_hashes: list[int] = []
        gone_keys: list[str] = []
        with self._lock:
            for kh in keys:
                c = self._chunks.pop(kh, None)
                self._pending.discard(kh)
                if c is None:
                    continue
                gone_keys.append(kh)
                if c.hashes:
                    gone_hashes.extend(c.hashes)
        if gone_hashes:
            self.publisher.removed(gone_hashes, MEDIUM_SHARED)
        return len(gone_keys)
