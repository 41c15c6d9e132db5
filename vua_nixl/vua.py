"""Drop-in facade for code written against VAST's original VUA.

    from vua_nixl import VUA, VUAConfig, ClosestKV
    vua = VUA(VUAConfig, "/mnt/kv")
    vua.put(tokens, kvcache)                 # tokens [seq] or [batch, seq]; kvcache: layers of [K, V]
    hit = vua.get_closest(tokens, "cuda:0")  # ClosestKV(data, tokens) or None; a list in, a list out

Same signatures and return types as VUA, but underneath it is the vua-nixl store: chained
linear-time keys, checksummed atomic block files, strict contiguous prefixes (VUA could return
non-contiguous groups when a middle group was missing), a namespace per KV layout and dtype (VUA
had none), and NIXL as the data path. VUA carried no model identity, so the facade's namespace
is ``VUAConfig.model_id`` (default "vua") plus the layout and dtype learned from the KV itself;
a reader discovers the layouts stored under the root from their namespace descriptions.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import xxhash

from vua_nixl.agent import NixlAgent
from vua_nixl.dtypes import dtype_name
from vua_nixl.errors import InvalidInputError, SplitFactorError
from vua_nixl.keys import KVLayout, Namespace, as_token_array, chunk_keys
from vua_nixl.kvlayout import from_canonical_layers
from vua_nixl.paths import StorePaths
from vua_nixl.store import KVStore

log = logging.getLogger(__name__)


class VUAConfig:
    """VUA's configuration class. Subclass it to change ``split_factor`` (tokens per group)."""

    split_factor: int = 200
    model_id: str = "vua"
    tenant: Optional[str] = None
    backend: str = "auto"

    @classmethod
    def trim_to_split_factor(cls, tokens: torch.Tensor) -> torch.Tensor:
        """Trim tokens ([n] or [1, n]) to a multiple of split_factor."""
        tokens = tokens.squeeze()
        return tokens[: len(tokens) - (len(tokens) % cls.split_factor)]

    @classmethod
    def tokens_to_paths(cls, tokens: Any) -> List[str]:
        """One path component per token group: the group's chained prefix key (hex).

        Unlike VUA's SHA-1 over a growing hex string (quadratic), each component hashes only its
        parent's key and its own tokens. The chain is rooted in the facade's model id, so the same
        tokens under another model id give other paths.
        """
        toks = as_token_array(tokens.squeeze() if isinstance(tokens, torch.Tensor) else tokens)
        if len(toks) % cls.split_factor:
            raise SplitFactorError(len(toks), cls.split_factor)
        root = xxhash.xxh3_128_digest(f"vua-facade/{cls.model_id}/{cls.split_factor}".encode())
        return [k.hex() for k in chunk_keys(root, toks, cls.split_factor)]

    # VUA spelled it in the singular; keep both so either caller works.
    tokens_to_path = tokens_to_paths


class ClosestKV(NamedTuple):
    """A hit: ``data`` is a list over layers of (K, V), each [1, heads, seq, head_dim]; ``tokens`` 1-D."""

    data: List[Tuple[torch.Tensor, torch.Tensor]]
    tokens: torch.Tensor


class VUA:
    """VUA's API over a vua-nixl store root."""

    def __init__(self, config: Any, root_path: Union[str, os.PathLike[str]]):
        self._config = config
        self._root_path = os.fspath(root_path)
        self._paths = StorePaths(self._root_path)
        self._paths.ensure()
        self._agent = NixlAgent(getattr(config, "backend", "auto"), probe_dir=self._paths.tmp)
        self._stores: dict[str, KVStore] = {}
        self._lock = threading.Lock()

    def config(self) -> Any:
        return self._config

    @property
    def split_factor(self) -> int:
        return int(self._config.split_factor)

    # ---- namespaces ----------------------------------------------------------------------

    def _namespace(self, layout: KVLayout, dtype: str) -> Namespace:
        return Namespace(model=getattr(self._config, "model_id", "vua"), dtype=dtype, layout=layout,
                         tenant=getattr(self._config, "tenant", None))

    def _store(self, ns: Namespace) -> KVStore:
        fp = ns.fingerprint(self.split_factor).hex()
        with self._lock:
            store = self._stores.get(fp)
            if store is None:
                store = KVStore(self._root_path, ns, chunk_tokens=self.split_factor, agent=self._agent)
                self._stores[fp] = store
            return store

    def _discover(self) -> list[KVStore]:
        """Stores for every layout written under the root for this facade's model id."""
        model = getattr(self._config, "model_id", "vua")
        for fp, desc in self._paths.namespaces():
            if fp in self._stores or desc.get("model") != model or desc.get("chunk_tokens") != self.split_factor:
                continue
            try:
                ns = self._namespace(KVLayout(**desc["layout"]), desc["dtype"])
            except (KeyError, TypeError, InvalidInputError):
                continue
            if ns.fingerprint(self.split_factor).hex() == fp:  # tenant and every field must agree
                self._store(ns)
        return list(self._stores.values())

    # ---- put -----------------------------------------------------------------------------

    def put(self, tokens: torch.Tensor, data: Sequence[Sequence[torch.Tensor]]) -> None:
        """Store KV for ``tokens`` ([seq] or [batch, seq]); ``data`` is layers of [K, V], each [batch, heads, seq, dim]."""
        if not isinstance(tokens, torch.Tensor):
            raise InvalidInputError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dim() > 2:
            raise InvalidInputError(f"input token tensor dimension too big {tokens.dim()}")
        if not data or any(len(layer) != 2 for layer in data):
            raise InvalidInputError("kvcache must be a non-empty list over layers of [K, V]")
        k0 = data[0][0]
        if not isinstance(k0, torch.Tensor) or k0.dim() != 4:
            raise InvalidInputError("each K and V must be a tensor of [batch, heads, seq, head_dim]")
        rows = tokens.unsqueeze(0) if tokens.dim() == 1 else tokens
        if k0.shape[0] != rows.shape[0]:
            raise InvalidInputError(f"{rows.shape[0]} token sequences but KV batch size {k0.shape[0]}")
        layout = KVLayout(num_layers=len(data), kv_heads=int(k0.shape[1]), head_dim=int(k0.shape[3]))
        store = self._store(self._namespace(layout, dtype_name(k0.dtype)))
        items = []
        for b in range(rows.shape[0]):
            n = (rows.shape[1] // self.split_factor) * self.split_factor
            if n == 0:
                continue
            kv = [[layer[0][b : b + 1, :, :n], layer[1][b : b + 1, :, :n]] for layer in data]
            items.append((rows[b, :n], kv))
        if items:
            store.put_many(items)

    # ---- get -----------------------------------------------------------------------------

    def get_closest(self, tokens: Union[torch.Tensor, List[torch.Tensor]], device: Any) -> Any:
        """Longest stored prefix: ClosestKV or None; a list of tensors gives a list of results."""
        if isinstance(tokens, list):
            if not all(isinstance(t, torch.Tensor) and t.dim() == 1 for t in tokens):
                raise InvalidInputError("a batch for get_closest must be a list of 1-D token tensors")
            return self._get_many(tokens, device)
        if not isinstance(tokens, torch.Tensor):
            raise InvalidInputError(f"tokens must be a torch.Tensor or a list of them, got {type(tokens).__name__}")
        if tokens.dim() >= 2:
            raise InvalidInputError(f"input token tensor dimension too big {tokens.dim()}")
        return self._get_many([tokens], device)[0]

    def _get_many(self, tokens_list: List[torch.Tensor], device: Any) -> List[Optional[ClosestKV]]:
        best: List[Optional[ClosestKV]] = [None] * len(tokens_list)
        for store in self._discover():
            # lookup (stats only) is worth it just to skip a layout that cannot beat a match in hand
            need = [i for i, t in enumerate(tokens_list) if (b := best[i]) is None or store.lookup(t) > len(b.tokens)]
            if not need:
                continue
            results = store.get_many([tokens_list[i] for i in need], device=device)
            for i, res in zip(need, results):
                prev = best[i]
                if res.tokens and res.kv is not None and (prev is None or res.tokens > len(prev.tokens)):
                    layers = from_canonical_layers(res.kv, False)
                    data = [(k.contiguous(), v.contiguous()) for k, v in layers]
                    best[i] = ClosestKV(data=data, tokens=tokens_list[i][: res.tokens].to(device))
        return best

    def close(self) -> None:
        for store in self._stores.values():
            store.close()
        self._agent.close()

    def __enter__(self) -> "VUA":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
