"""SGLang page keys -> vua-nixl block identities.

What SGLang hands a storage backend (0.5.21 and 0.5.23, ``HiCacheController``): for every page
of ``page_size`` tokens a string key, ``get_storage_hash_str(tokens, prior_hash)`` = a SHA-256
chain over the page's token ids, seeded by the previous page's key (and, for requests with an
``extra_key`` / ``cache_salt``, by a namespace seed). ``extra_info.prefix_keys`` may carry the
keys of the pages before a batch. **Token ids never reach the backend** (``StorageOperation``
holds them, but ``batch_set_v1`` / ``batch_get_v1`` / ``batch_exists`` receive only keys).

vua-nixl addresses a chunk by an XXH3-128 chain over *token ids* rooted in a namespace
fingerprint, and its public API takes token ids. An SGLang page key already identifies its whole
prefix, so each page is stored as a one-chunk "sequence" (``chunk_tokens = page_size``) whose
tokens are derived from the key:

    d         = SHA-256("vua-nixl/sglang-page/v1\\0" || key)
    tokens[i] = 2**62 | little-endian 56-bit word i of d      for i < min(page_size, 4)
    tokens[i] = 0                                             otherwise

so the store key is XXH3-128(fingerprint || tokens). Consequences:

* the strict-prefix rule is kept by the backend (``batch_exists`` counts the leading run; a
  load stops at the first page that is missing or fails validation) because SGLang's keys are
  themselves chained: page i's key commits to pages 0..i;
* pseudo tokens carry bit 62, so they can never equal a real token id: an SGLang page can never
  be mistaken for a chunk stored by the vLLM connector (or the store API) from real tokens, even
  in the same namespace;
* the key width is min(page_size, 4) x 56 bits: 224 bits from page_size 4 on, 112 bits at
  page_size 2, 56 bits at page_size 1 (a warning is logged; use page_size >= 2 with L3 storage).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

_DOMAIN = b"vua-nixl/sglang-page/v1\x00"
#: set in every pseudo token: real token ids (vocabulary indices) are far below 2**62.
PSEUDO_TOKEN_FLAG = 1 << 62
_WORD_BYTES = 7
_WORDS = 4


def page_tokens(key: str, page_size: int) -> np.ndarray:
    """The ``page_size`` pseudo tokens that stand for SGLang page ``key`` in the store."""
    digest = hashlib.sha256(_DOMAIN + key.encode("utf-8")).digest()
    toks = np.zeros(page_size, dtype=np.int64)
    for i in range(min(page_size, _WORDS)):
        toks[i] = PSEUDO_TOKEN_FLAG | int.from_bytes(digest[i * _WORD_BYTES : (i + 1) * _WORD_BYTES], "little")
    return toks


def pages_tokens(keys: Sequence[str], page_size: int) -> list[np.ndarray]:
    return [page_tokens(k, page_size) for k in keys]


def key_bits(page_size: int) -> int:
    """How many bits of an SGLang key the store identity keeps."""
    return min(page_size, _WORDS) * _WORD_BYTES * 8
