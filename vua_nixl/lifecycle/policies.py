"""Eviction policies: how a block's subtree is scored, behind one small interface.

The pruner orders blocks so that every block comes after all of its descendants (a prefix of
that order can be unlinked without orphaning anything). A policy only decides the *score* of a
subtree, from the block's own access record and its children's scores; lower scores go first.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Protocol, Sequence

from vua_nixl.errors import InvalidInputError

Policy = Literal["lru", "lfu", "ttl"]


class _Scored(Protocol):
    last: float
    hits: int


class EvictionPolicy:
    """Base class: ``subtree_score`` must be at least every child's score (a parent outlives its
    children), and comparable as a tuple."""

    name: str = ""

    def subtree_score(self, block: _Scored, child_scores: Sequence[tuple[float, ...]]) -> tuple[float, ...]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LRUPolicy(EvictionPolicy):
    """Least recently used first: a subtree is as recent as its most recent access."""

    name = "lru"

    def subtree_score(self, block: _Scored, child_scores: Sequence[tuple[float, ...]]) -> tuple[float, ...]:
        return (max([block.last, *(s[0] for s in child_scores)]),)


class LFUPolicy(EvictionPolicy):
    """Least frequently used first, ties by recency: a subtree scores as its busiest block."""

    name = "lfu"

    def subtree_score(self, block: _Scored, child_scores: Sequence[tuple[float, ...]]) -> tuple[float, ...]:
        return max([(float(block.hits), block.last), *child_scores])


class TTLPolicy(LRUPolicy):
    """Expire what nobody touched for ``max_age_s``; under a byte limit, behave as LRU."""

    name = "ttl"

    def __init__(self, max_age_s: float):
        self.max_age_s = max_age_s


def make_policy(name: Any, max_age_s: Optional[float] = None) -> EvictionPolicy:
    """The policy called ``name`` (lru, lfu, ttl); ttl needs ``max_age_s``."""
    if isinstance(name, EvictionPolicy):
        return name
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    if name == "ttl":
        if max_age_s is None:
            raise InvalidInputError("the ttl policy needs max_age_s")
        return TTLPolicy(max_age_s)
    raise InvalidInputError(f"unknown eviction policy {name!r} (lru, lfu, ttl)")
