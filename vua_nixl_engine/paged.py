"""Paged KV cache: fixed-size blocks in one preallocated tensor, block tables per sequence.

Layout: ``[num_layers, 2, num_blocks, block_size, kv_heads, head_dim]`` (index 0 = K, 1 = V),
the way production engines (vLLM, Dynamo's KVBM) hold KV: a sequence owns a list of block ids,
token position ``p`` lives in block ``table[p // block_size]`` at offset ``p % block_size``. All
movement is by *slot* (``block * block_size + offset``) with one ``index_select`` (gather) or
``index_copy_`` (scatter) per call, so no Python loop ever runs per token or per block.

Blocks are reference counted: the write-behind saver takes a reference on a sequence's blocks so
that freeing the sequence before its KV reached the store cannot hand those blocks to another
request and save someone else's KV under this prompt's keys.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np
import torch

from vua_nixl.errors import InvalidInputError
from vua_nixl_engine.errors import OutOfBlocksError


class PagedKVCache:
    """The preallocated block pool plus a thread-safe, reference-counted block allocator."""

    def __init__(
        self,
        *,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
    ) -> None:
        if block_size <= 0 or num_blocks <= 0:
            raise InvalidInputError(f"block_size and num_blocks must be positive, got {block_size}, {num_blocks}")
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.kv = torch.zeros(
            (num_layers, 2, num_blocks, block_size, kv_heads, head_dim), dtype=dtype, device=self.device
        )
        # [L, 2, slots, H, D] view: slot-addressed access without copying.
        self._slots = self.kv.view(num_layers, 2, num_blocks * block_size, kv_heads, head_dim)
        self._lock = threading.Lock()
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * num_blocks

    # ---- allocation -------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        with self._lock:
            return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, n: int, *, contiguous: bool = True) -> list[int]:
        """Take ``n`` free blocks (all or none).

        With ``contiguous`` (the default) a run of consecutive block ids is preferred: a prefix
        held in consecutive blocks is one strided canonical view of the cache, so the store can
        load straight into it (no staging copy). Falls back to any free blocks.
        """
        with self._lock:
            if n > len(self._free):
                raise OutOfBlocksError(
                    f"paged KV cache is full: need {n} blocks of {self.block_size} tokens, "
                    f"{len(self._free)} of {self.num_blocks} free (raise num_blocks or free sequences)"
                )
            start = self._find_run(n) if contiguous and n > 1 else None
            if start is None:
                blocks = [self._free.pop() for _ in range(n)]
            else:
                blocks = list(range(start, start + n))
                taken = set(blocks)
                self._free = [b for b in self._free if b not in taken]
            for b in blocks:
                self._refs[b] = 1
            return blocks

    def _find_run(self, n: int) -> int | None:
        """Lowest first id of ``n`` consecutive free blocks, or None (caller holds the lock)."""
        free = np.sort(np.fromiter(self._free, dtype=np.int64, count=len(self._free)))
        if free.size < n:
            return None
        # free[i + n - 1] - free[i] == n - 1  <=>  free[i : i + n] is a run
        ok = np.nonzero(free[n - 1 :] - free[: free.size - n + 1] == n - 1)[0]
        return int(free[ok[0]]) if ok.size else None

    def retain(self, blocks: Sequence[int]) -> None:
        with self._lock:
            for b in blocks:
                if self._refs[b] <= 0:
                    raise RuntimeError(f"retain of free block {b}")
                self._refs[b] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference per block; blocks with none left go back to the free list."""
        with self._lock:
            for b in blocks:
                if self._refs[b] <= 0:
                    raise RuntimeError(f"double free of block {b}")
                self._refs[b] -= 1
                if self._refs[b] == 0:
                    self._free.append(b)

    # ---- addressing -------------------------------------------------------------------------
    def slots(self, block_table: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Slot ids of token positions ``[start, stop)`` of a sequence with ``block_table``."""
        pos = torch.arange(start, stop, device=block_table.device)
        return block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def contiguous_view(self, blocks: Sequence[int], tokens: int) -> torch.Tensor | None:
        """Canonical ``[L, 2, tokens, H, D]`` view of the first ``tokens`` positions held in
        ``blocks``, if those blocks are consecutive ids (else None). Contiguous from the token
        dimension inward, strided across layers and K/V: exactly what ``KVStore.get(out=...)``
        accepts, so a load lands in the cache without a copy."""
        k = self.blocks_for(tokens)
        if k == 0 or len(blocks) < k:
            return None
        b0 = blocks[0]
        if any(blocks[i] != b0 + i for i in range(1, k)):
            return None
        run = self.kv[:, :, b0 : b0 + k]
        return run.view(self.num_layers, 2, k * self.block_size, self.kv_heads, self.head_dim)[:, :, :tokens]

    # ---- data movement ----------------------------------------------------------------------
    def gather(self, slots: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Canonical ``[L, 2, n, H, D]`` KV of the given slots (one vectorized gather)."""
        if out is None:
            return self._slots.index_select(2, slots)
        return torch.index_select(self._slots, 2, slots, out=out)

    def scatter(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Write canonical ``[L, 2, n, H, D]`` KV into the given slots (one vectorized scatter)."""
        expected = (self.num_layers, 2, slots.numel(), self.kv_heads, self.head_dim)
        if tuple(kv.shape) != expected:
            raise InvalidInputError(f"KV of shape {tuple(kv.shape)} does not fit {slots.numel()} slots; expected {expected}")
        if kv.dtype != self.dtype:
            raise InvalidInputError(f"KV dtype {kv.dtype} does not match the cache dtype {self.dtype}")
        self._slots.index_copy_(2, slots, kv.to(self.device, non_blocking=True))

    def layer_write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one layer's new K and V (``[n, H, D]`` each) into ``slots``."""
        self._slots[layer, 0].index_copy_(0, slots, k)
        self._slots[layer, 1].index_copy_(0, slots, v)

    def layer_read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's K and V (``[n, H, D]`` each) at ``slots``."""
        return self._slots[layer, 0].index_select(0, slots), self._slots[layer, 1].index_select(0, slots)
