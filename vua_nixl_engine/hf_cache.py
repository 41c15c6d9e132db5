"""Let a stock transformers model attend over the paged KV cache.

transformers' attention modules call ``past_key_values.update(k, v, layer_idx)`` with the new
tokens' K/V (after RoPE) and attend over whatever it returns. This adapter implements that call
on top of :class:`PagedKVCache`: it scatters the new K/V into the sequence's blocks and returns
the sequence's whole K/V gathered from its blocks. The model code, weights, RoPE, GQA and
attention kernel are transformers' own; only where KV lives changes.

One view is built per forward pass (prefill chunk or decode step) of one sequence.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from vua_nixl_engine.paged import PagedKVCache


class PagedLayer(CacheLayerMixin):
    """One layer's window onto the paged cache for one forward pass."""

    is_sliding = False
    is_compileable = False

    def __init__(self, paged: PagedKVCache, layer: int, past: int, new_slots: torch.Tensor, all_slots: torch.Tensor) -> None:
        super().__init__()
        self.paged = paged
        self.layer = layer
        self.past = past
        self.new_slots = new_slots
        self.all_slots = all_slots
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:  # noqa: D102
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' K/V ([1, H, q, D]) and return the sequence's full K/V ([1, H, T, D])."""
        if key_states.shape[0] != 1:
            raise ValueError("the paged engine runs one sequence per forward pass (batch size 1)")
        k_new = key_states[0].transpose(0, 1)
        v_new = value_states[0].transpose(0, 1)
        self.paged.layer_write(self.layer, self.new_slots, k_new, v_new)
        if self.past == 0:
            # Nothing before these tokens: the new K/V *are* the whole sequence (same values as a gather).
            return key_states, value_states
        k, v = self.paged.layer_read(self.layer, self.all_slots)
        return k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.past + query_length, 0

    def get_seq_length(self) -> int:
        return self.past

    def get_max_length(self) -> int:
        return -1


def paged_cache_view(paged: PagedKVCache, block_table: torch.Tensor, past: int, new: int) -> Cache:
    """A transformers ``Cache`` over positions ``[0, past + new)`` of one sequence, whose forward
    pass computes positions ``[past, past + new)``."""
    all_slots = paged.slots(block_table, 0, past + new)
    new_slots = all_slots[past:]
    layers = [PagedLayer(paged, i, past, new_slots, all_slots) for i in range(paged.num_layers)]
    return Cache(layers=layers)


class BatchedDecodeLayer(CacheLayerMixin):
    """One layer's window onto the paged cache for one *batched decode* step: ``B`` sequences of
    different lengths, one new token each.

    ``update`` writes each sequence's new K/V into its own slot and returns the batch's K/V
    gathered from the blocks, right-padded to the longest sequence (``[B, H, T_max, D]``); the
    engine passes a 4-D additive mask that hides the padding, and each sequence's own position
    ids, so every row attends over exactly its own tokens."""

    is_sliding = False
    is_compileable = False

    def __init__(self, paged: PagedKVCache, layer: int, new_slots: torch.Tensor, all_slots: torch.Tensor) -> None:
        super().__init__()
        self.paged = paged
        self.layer = layer
        self.new_slots = new_slots  # [B]
        self.all_slots = all_slots  # [B, T_max] (padding points at any valid slot; masked)
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:  # noqa: D102
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' K/V ([B, H, 1, D]) and return the padded batch K/V ([B, H, T_max, D])."""
        b, t = self.all_slots.shape
        self.paged.layer_write(self.layer, self.new_slots, key_states[:, :, 0], value_states[:, :, 0])
        k, v = self.paged.layer_read(self.layer, self.all_slots.reshape(-1))
        h, d = k.shape[1], k.shape[2]
        return k.view(b, t, h, d).transpose(1, 2), v.view(b, t, h, d).transpose(1, 2)

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return int(self.all_slots.shape[1]), 0

    def get_seq_length(self) -> int:
        return int(self.all_slots.shape[1]) - 1

    def get_max_length(self) -> int:
        return -1


def batched_decode_view(paged: PagedKVCache, new_slots: torch.Tensor, all_slots: torch.Tensor) -> Cache:
    """A transformers ``Cache`` for one decode step over a batch of sequences (see
    :class:`BatchedDecodeLayer`)."""
    layers = [BatchedDecodeLayer(paged, i, new_slots, all_slots) for i in range(paged.num_layers)]
    return Cache(layers=layers)
