"""The observer contract: how lifecycle, metrics and router events hear about a store's work.

Modelled on vLLM's connector base: one base class whose hooks all do nothing, so an observer
overrides only what it cares about, and one fan-out in the store instead of ``hasattr`` probes at
every call site. Hooks run on the caller's thread; ``before_write`` may raise to refuse a put
(the capacity guard does), every other hook is told about something that already happened, so
its failure is logged and never turns a published put or a served hit into an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence, SupportsIndex

import numpy as np

from vua_nixl.errors import InvalidInputError

if TYPE_CHECKING:
    from vua_nixl.store.kvstore import KVStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredChunk:
    """A chunk that this process just published (handed to observers, e.g. Dynamo KV events)."""

    index: int
    key: bytes
    parent: bytes
    tokens: np.ndarray
    nbytes: int
    path: str
    #: Written into an evicted block file claimed from the recycle pool, not a new file.
    recycled: bool = False


class StoreObserver:
    """Base class of everything that listens to a :class:`KVStore`. Every hook is a no-op."""

    def before_write(self, store: "KVStore", nbytes: int) -> None:
        """About to write ``nbytes``; raise (e.g. ``CapacityError``) to refuse the put."""

    def on_stored(self, store: "KVStore", chunks: Sequence[StoredChunk]) -> None:
        """``chunks`` are published and visible to every reader of the root."""

    def on_put_failed(self, store: "KVStore", nbytes: int, error: Exception) -> None:
        """A put that passed ``before_write`` published nothing."""

    def on_hit(self, store: "KVStore", keys: Sequence[bytes], nbytes: int, seconds: float) -> None:
        """``keys`` were loaded and verified."""

    def on_miss(self, store: "KVStore", requested_tokens: int, matched_tokens: int) -> None:
        """A load matched nothing."""

    def on_removed(self, store: "KVStore", keys: Sequence[bytes], reason: str) -> None:
        """``keys`` are gone: ``reason`` is "delete", "evict" or "expired"."""

    def on_corrupt(self, store: "KVStore", path: str, reason: str) -> None:
        """A block failed validation and was moved aside."""


class ObserverList(list):  # type: ignore[type-arg]
    """The store's observers: a list that admits only :class:`StoreObserver` and fans hooks out."""

    def __init__(self, observers: Iterable[StoreObserver] = ()):
        super().__init__()
        self.extend(observers)

    @staticmethod
    def _check(obs: Any) -> StoreObserver:
        if not isinstance(obs, StoreObserver):
            raise InvalidInputError(
                f"store observers must subclass vua_nixl.StoreObserver, got {type(obs).__name__}")
        return obs

    def append(self, obs: StoreObserver) -> None:
        super().append(self._check(obs))

    def extend(self, observers: Iterable[StoreObserver]) -> None:
        super().extend(self._check(o) for o in observers)

    def insert(self, index: SupportsIndex, obs: StoreObserver) -> None:
        super().insert(index, self._check(obs))

    def before_write(self, store: "KVStore", nbytes: int) -> None:
        for obs in list(self):
            obs.before_write(store, nbytes)

    def notify(self, hook: str, store: "KVStore", *args: Any, skip: Any = None) -> None:
        """Call ``hook`` on every observer (but ``skip``); a failing observer is logged, not raised."""
        for obs in list(self):
            if obs is skip:
                continue
            try:
                getattr(obs, hook)(store, *args)
            except Exception:
                log.exception("store observer %s failed in %s", type(obs).__name__, hook)
