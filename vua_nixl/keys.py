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
import hashlib
import logging
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import msgpack
import numpy as np
import xxhash

from vua_nixl.dtypes import dtype_name
from vua_nixl.errors import InvalidInputError

log = logging.getLogger(__name__)

KEY_BYTES = 16
_I64_MAX = (1 << 63) - 1
_DOMAIN = b"vua-nixl/namespace/v1"
_ROOT_DOMAIN = b"vua-nixl/tenant-root/v1"
_TOKENS_DOMAIN = b"vua-nixl/tenant-tokens/v1"
_MAC_DOMAIN = b"vua-nixl/tenant-mac/v1"


def _whole(owner: str, name: str, value: Any, minimum: int) -> int:
    """An integer field: ints (and whole integral numbers such as 2.0) are normalized to int;
    anything else (a string, a bool, 1.5) is an error naming the field."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidInputError(f"{owner}.{name} must be an integer, got {value!r}")
    if not isinstance(value, numbers.Integral):
        if not float(value).is_integer():
            raise InvalidInputError(f"{owner}.{name} must be an integer, got {value!r}")
    v = int(float(value)) if not isinstance(value, numbers.Integral) else int(value)  # type: ignore[call-overload]
    if v < minimum:
        raise InvalidInputError(f"{owner}.{name} must be >= {minimum}, got {value!r}")
    return v


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
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise InvalidInputError(f"KVLayout.{name} must be a positive int, got {value!r}")
            object.__setattr__(self, name, _whole("KVLayout", name, value, 1))
        if not isinstance(self.mla, bool):
            raise InvalidInputError(f"KVLayout.mla must be a bool, got {self.mla!r}")
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
    #: The engine's KV block size in tokens, where it changes what a chunk's bytes mean to the
    #: engine (vLLM, SGLang pages). 0: not part of the namespace (keys stay as before).
    block_size: int = 0
    #: The engine's own name for the KV cache dtype (e.g. vLLM's "fp8_e4m3"), when it says more
    #: than ``dtype``; "" otherwise.
    cache_dtype: str = ""
    #: The tenant's secret (bytes or str; e.g. from a Kubernetes secret). Never stored, never in a
    #: path or header. Without it, a tenant namespace uses ``tenant`` itself as the secret: then
    #: the tenant id must be a random token, not a guessable name (docs/SECURITY.md).
    tenant_key: Optional[bytes | str] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise InvalidInputError("Namespace.model must be a non-empty string")
        if not isinstance(self.revision, str):
            raise InvalidInputError(f"Namespace.revision must be a string, got {self.revision!r}")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if not isinstance(self.layout, KVLayout):
            raise InvalidInputError(f"Namespace.layout must be a KVLayout, got {type(self.layout).__name__}")
        for size, rank in (("tp_size", "tp_rank"), ("pp_size", "pp_rank")):
            s = _whole("Namespace", size, getattr(self, size), 1)
            r = _whole("Namespace", rank, getattr(self, rank), 0)
            object.__setattr__(self, size, s)
            object.__setattr__(self, rank, r)
            if not 0 <= r < s:
                raise InvalidInputError(f"Namespace.{rank}={r} is outside 0..{size}-1 ({size}={s})")
        object.__setattr__(self, "block_size", _whole("Namespace", "block_size", self.block_size, 0))
        if not isinstance(self.cache_dtype, str):
            raise InvalidInputError(f"Namespace.cache_dtype must be a string, got {self.cache_dtype!r}")
        if self.tenant is not None and (not isinstance(self.tenant, str) or not self.tenant):
            raise InvalidInputError(f"Namespace.tenant must be a non-empty string or None, got {self.tenant!r}")
        if self.tenant_key is not None:
            if self.tenant is None:
                raise InvalidInputError("Namespace.tenant_key needs a tenant")
            if not isinstance(self.tenant_key, (bytes, str)) or len(self.tenant_key) < 16:
                raise InvalidInputError("Namespace.tenant_key must be bytes or str of at least 16 characters")

    def describe(self) -> dict[str, Any]:
        """Plain description (tenant redacted) written next to a namespace's blocks for `ls`."""
        d = dataclasses.asdict(self)
        d.pop("tenant_key", None)
        d["tenant"] = None if self.tenant is None else "<salted>"
        return d

    def fingerprint(self, chunk_tokens: int) -> bytes:
        """16-byte public identity of the namespace (its directory name); stable across
        processes, versions of Python, hosts. For a tenant it is *not* the key chain's root."""
        fields = dataclasses.asdict(self)
        fields.pop("tenant_key", None)
        for name in ("block_size", "cache_dtype"):  # in the fingerprint only when set: older keys stay valid
            if not fields[name]:
                del fields[name]
        fields["chunk_tokens"] = int(chunk_tokens)
        payload = msgpack.packb(fields, use_bin_type=True)  # the tenant, if any, acts as a salt
        return xxhash.xxh3_128_digest(_DOMAIN + payload)

    def secret(self) -> Optional[bytes]:
        """The tenant's secret, or None for a namespace without a tenant."""
        if self.tenant is None:
            return None
        key = self.tenant_key if self.tenant_key is not None else self.tenant
        raw = key.encode() if isinstance(key, str) else key
        return hashlib.blake2b(raw, digest_size=32, person=b"vua-nixl-tenant").digest()

    def chain(self, chunk_tokens: int) -> "KeyChain":
        """How this namespace's chunk keys are made (see :class:`KeyChain`)."""
        return KeyChain(self.fingerprint(chunk_tokens), self.secret())


@dataclass(frozen=True)
class KeyChain:
    """Chunk keys of one namespace.

    Without a tenant: ``root = fingerprint``, ``key[i] = XXH3-128(key[i-1] || tokens_i)`` (fast,
    and the fingerprint is the public directory name, which is fine: anyone may read an
    untenanted namespace). With a tenant secret ``s``: ``root = BLAKE2b_s(fingerprint)`` and
    ``key[i] = BLAKE2b_s(key[i-1] || tokens_i)``, so the directory name, the file names and the
    headers give nothing to someone without ``s``: they cannot compute the key of a prompt,
    confirm a guessed prompt, or recover token ids (headers carry a keyed digest of them).
    """

    fingerprint: bytes
    secret: Optional[bytes] = field(default=None, repr=False)

    @property
    def sealed(self) -> bool:
        return self.secret is not None

    @property
    def root(self) -> bytes:
        if self.secret is None:
            return self.fingerprint
        return hashlib.blake2b(_ROOT_DOMAIN + self.fingerprint, key=self.secret, digest_size=KEY_BYTES).digest()

    def keys(self, tokens: np.ndarray, chunk_tokens: int, limit: Optional[int] = None) -> list[bytes]:
        if self.secret is None:
            return chunk_keys(self.fingerprint, tokens, chunk_tokens, limit)
        n = len(tokens) // chunk_tokens
        if limit is not None:
            n = min(n, limit)
        keys: list[bytes] = []
        parent = self.root
        data = tokens[: n * chunk_tokens].tobytes()
        step = chunk_tokens * 8
        for i in range(n):
            parent = hashlib.blake2b(parent + data[i * step : (i + 1) * step], key=self.secret, digest_size=KEY_BYTES).digest()
            keys.append(parent)
        return keys

    def token_field(self, toks: np.ndarray) -> bytes:
        """What a block header records of its tokens: the ids, or for a tenant a keyed digest."""
        if self.secret is None:
            return toks.tobytes()
        return hashlib.blake2b(_TOKENS_DOMAIN + toks.tobytes(), key=self.secret, digest_size=32).digest()

    def mac(self) -> "hashlib.blake2b":
        """A keyed BLAKE2b to MAC a sealed block (header fields, then payload)."""
        assert self.secret is not None
        return hashlib.blake2b(_MAC_DOMAIN, key=self.secret, digest_size=16)


def as_token_array(tokens: Any) -> np.ndarray:
    """Validate tokens and return them as a contiguous 1-D int64 array.

    Rejects floats, bools, negative ids and non-1-D input with a message naming the problem,
    because a silently truncated or re-typed token list would hash to someone else's prefix.
    """
    if hasattr(tokens, "detach") and hasattr(tokens, "cpu"):  # torch tensor, without importing torch
        if tokens.is_floating_point() or tokens.is_complex() or str(tokens.dtype) == "torch.bool":
            raise InvalidInputError(f"tokens must be integers, got a tensor of {tokens.dtype}")
        tokens = tokens.detach().cpu().numpy()
    if isinstance(tokens, (list, tuple)) and tokens and all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in tokens):
        bad = next((int(t) for t in tokens if not 0 <= int(t) <= _I64_MAX), None)
        if bad is not None:
            raise InvalidInputError(f"tokens must be non-negative ids below 2**63, found {bad}")
        return np.asarray(tokens, dtype="<i8")
    arr = np.asarray(tokens)
    if arr.dtype == object and arr.ndim == 1 and arr.size and all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in arr.tolist()):
        big = [int(t) for t in arr.tolist() if not 0 <= int(t) <= np.iinfo(np.int64).max]
        if big:
            raise InvalidInputError(f"tokens must be non-negative ids below 2**63, found {big[0]}")
        arr = arr.astype(np.int64)
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
