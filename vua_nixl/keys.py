"""Prefix-addressed chunk keys.

A chunk's key must identify the *whole prefix* up to and including that chunk, and nothing else
that could make two different KV tensors collide: the model, its KV dtype and layout, the
parallel rank that produced it, the chunk size and the tenant. So the chain is rooted in a
namespace fingerprint and each key hashes its parent key with its own tokens:

    key[-1] = fingerprint(namespace, chunk_tokens)
    key[i]  = XXH3-128(key[i-1] || int64-LE(tokens[i*C:(i+1)*C]))

Hashing is linear in the prompt (VUA's was quadratic) and uses no Python ``hash`` (so no
PYTHONHASHSEED dependence): a 128K-token prompt hashes in about a millisecond, identically in
every process and on every machine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import msgpack
import numpy as np
import xxhash

from vua_nixl.dtypes import dtype_name
from vua_nixl.errors import InvalidInputError

KEY_BYTES = 16
_DOMAIN = b"vua-nixl/namespace/v1"


@dataclass(frozen=True)
class KVLayout:
    """Shape of one token's KV for one parallel rank.

    Standard attention stores K and V per layer as ``[kv_heads, head_dim]`` per token. MLA
    (DeepSeek-style) stores one latent vector per token per layer: ``mla=True``, ``kv_heads=1``
    and ``head_dim`` is the latent width (kv_lora_rank + rope dim).
    """

    num_layers: int
    kv_heads: int
    head_dim: int
    mla: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidInputError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if self.mla and self.kv_heads != 1:
            raise InvalidInputError("KVLayout with mla=True must have kv_heads=1")

    def token_shape(self) -> tuple[int, ...]:
        """Shape of the canonical KV tensor for ``n`` tokens, with n left as -1."""
        if self.mla:
            return (self.num_layers, -1, self.head_dim)
        return (self.num_layers, 2, -1, self.kv_heads, self.head_dim)

    def shape(self, tokens: int) -> tuple[int, ...]:
        return tuple(tokens if d == -1 else d for d in self.token_shape())

    def elements_per_token(self) -> int:
        per = self.num_layers * self.kv_heads * self.head_dim
        return per if self.mla else 2 * per


@dataclass(frozen=True)
class Namespace:
    """Everything that must match for stored KV to be valid for a request.

    Two namespaces that differ in any field never share a key, so a bf16 cache is invisible to
    an fp8 engine, TP rank 1 never loads rank 0's heads, and tenant A cannot find tenant B's
    prefixes (the tenant salt is hashed in, never stored in clear in keys or paths).
    """

    model: str
    dtype: str
    layout: KVLayout
    revision: str = ""
    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    tenant: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise InvalidInputError("Namespace.model must be a non-empty string")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if not isinstance(self.layout, KVLayout):
            raise InvalidInputError(f"Namespace.layout must be a KVLayout, got {type(self.layout).__name__}")
        for size, rank in (("tp_size", "tp_rank"), ("pp_size", "pp_rank")):
            s, r = getattr(self, size), getattr(self, rank)
            if s < 1 or not 0 <= r < s:
                raise InvalidInputError(f"Namespace.{rank}={r} is outside 0..{size}-1 ({size}={s})")

    def describe(self) -> dict[str, Any]:
        """Plain description (tenant redacted) written next to a namespace's blocks for `ls`."""
        d = dataclasses.asdict(self)
        d["tenant"] = None if self.tenant is None else "<salted>"
        return d

    def fingerprint(self, chunk_tokens: int) -> bytes:
        """16-byte root of the key chain; stable across processes, versions of Python, hosts."""
        fields = dataclasses.asdict(self)
        fields["chunk_tokens"] = int(chunk_tokens)
        payload = msgpack.packb(fields, use_bin_type=True)  # the tenant, if any, acts as a salt
        return xxhash.xxh3_128_digest(_DOMAIN + payload)


def as_token_array(tokens: Any) -> np.ndarray:
    """Validate tokens and return them as a contiguous 1-D int64 array.

    Rejects floats, bools, negative ids and non-1-D input with a message naming the problem,
    because a silently truncated or re-typed token list would hash to someone else's prefix.
    """
    if hasattr(tokens, "detach") and hasattr(tokens, "cpu"):  # torch tensor, without importing torch
        if tokens.is_floating_point() or tokens.is_complex() or str(tokens.dtype) == "torch.bool":
            raise InvalidInputError(f"tokens must be integers, got a tensor of {tokens.dtype}")
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.dtype == object or arr.dtype.kind not in "iu":
        if arr.size == 0 and arr.ndim == 1:
            arr = arr.astype(np.int64)
        else:
            raise InvalidInputError(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise InvalidInputError(f"tokens must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size and arr.dtype.kind == "i" and arr.min() < 0:
        raise InvalidInputError(f"tokens must be non-negative, found {int(arr.min())}")
    if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise InvalidInputError("token id does not fit in int64")
    return np.ascontiguousarray(arr, dtype="<i8")


def chunk_keys(root: bytes, tokens: np.ndarray, chunk_tokens: int, limit: Optional[int] = None) -> list[bytes]:
    """Keys of every full chunk of ``tokens`` (at most ``limit``), chained from ``root``."""
    n = len(tokens) // chunk_tokens
    if limit is not None:
        n = min(n, limit)
    keys: list[bytes] = []
    parent = root
    data = tokens[: n * chunk_tokens].tobytes()
    step = chunk_tokens * 8
    for i in range(n):
        parent = xxhash.xxh3_128_digest(parent + data[i * step : (i + 1) * step])
        keys.append(parent)
    return keys


def key_hex(key: bytes) -> str:
    return key.hex()


def keys_hex(keys: Sequence[bytes]) -> list[str]:
    return [k.hex() for k in keys]
