"""vLLM's paged KV cache <-> the store's canonical form, by block id.

vLLM hands the connector one tensor per layer. Its shape and strides depend on the vLLM version,
the attention backend and ``VLLM_KV_CACHE_LAYOUT``; nothing here assumes them. Each layer tensor
is normalized, as *views* (no copy), into "planes" of shape ``[blocks, r, heads, n, bytes]``:
one plane for K and one for V (one for an MLA latent), ``r`` kernel blocks of ``n`` tokens per
manager block (``r * n == block_size``), each token's ``head_size`` elements as raw bytes. All
copies are byte copies (``uint8`` views), so fp8 / bf16 / fp16 caches move bit-exactly and the
same code runs on CPU tensors and on GPU tensors (one gather/scatter kernel per plane).

Supported per-layer forms:
  * ``[B*r, H, n, C]`` logical views (vLLM >= 0.31: ``allocate_kv_cache``), C = 2*head_size with
    K then V, or C = head_size for MLA; any stride order (LBNHC, LBHNC, ...);
  * ``[2, B*r, n, H, D]`` and ``[B*r, 2, n, H, D]`` (older flash-attn / flashinfer forms);
  * ``[B*r, n, D]`` (older MLA form).
"""

from __future__ import annotations

from typing import Sequence

import torch


class PagedLayoutError(ValueError):
    """A KV cache tensor whose shape does not match the KV cache spec."""


class PagedKV:
    def __init__(self, tensors: Sequence[torch.Tensor], *, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_size: int, mla: bool, names: Sequence[str] = ()) -> None:
        if not tensors:
            raise PagedLayoutError("no KV cache tensors to register")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.heads = 1 if mla else num_kv_heads
        self.head_size = head_size
        self.mla = mla
        self.device = tensors[0].device
        self.itemsize = tensors[0].element_size()
        self.head_bytes = head_size * self.itemsize
        names = list(names) or [f"layer{i}" for i in range(len(tensors))]
        self.planes: list[tuple[torch.Tensor, ...]] = [self._planes(t, n) for t, n in zip(tensors, names)]
        self.num_layers = len(self.planes)

    # ---- normalization -----------------------------------------------------------------------

    def _planes(self, t: torch.Tensor, name: str) -> tuple[torch.Tensor, ...]:
        nb, bs, h, d = self.num_blocks, self.block_size, self.heads, self.head_size
        if t.element_size() != self.itemsize or t.device != self.device:
            raise PagedLayoutError(f"{name}: all KV layers must share dtype and device")
        shape = tuple(t.shape)

        def blocks(x: torch.Tensor) -> torch.Tensor:  # split kernel blocks: [B*r, ...] -> [B, r, ...]
            if x.shape[0] % nb:
                raise PagedLayoutError(f"{name}: {x.shape[0]} pages is not a multiple of {nb} blocks (shape {shape})")
            return x.unflatten(0, (nb, x.shape[0] // nb))

        def check(p: torch.Tensor) -> torch.Tensor:
            r, hh, n, b = p.shape[1:]
            if r * n != bs or hh != h or b != self.head_bytes:
                raise PagedLayoutError(
                    f"{name}: KV tensor of shape {shape} does not hold blocks of {bs} tokens x {h} heads x "
                    f"{d} elements (read as {r} x {n} tokens, {hh} heads, {b} bytes)"
                )
            return p

        u8 = t.view(torch.uint8) if t.stride(-1) == 1 else None
        if u8 is None:
            raise PagedLayoutError(f"{name}: the innermost KV dimension must be contiguous (strides {t.stride()})")
        hb = self.head_bytes
        if self.mla:
            if t.ndim == 4:  # [B*r, 1, n, D]
                return (check(blocks(u8)),)
            if t.ndim == 3:  # [B*r, n, D]
                return (check(blocks(u8).unsqueeze(2)),)
        else:
            if t.ndim == 4 and shape[3] == 2 * d:  # [B*r, H, n, 2*D]: K then V along the last dim
                g = blocks(u8)
                return (check(g[..., :hb]), check(g[..., hb:]))
            if t.ndim == 5 and shape[0] == 2 and shape[4] == d:  # [2, B*r, n, H, D]
                return tuple(check(blocks(u8[i]).permute(0, 1, 3, 2, 4)) for i in range(2))
            if t.ndim == 5 and shape[1] == 2 and shape[4] == d:  # [B*r, 2, n, H, D]
                return tuple(check(blocks(u8[:, i]).permute(0, 1, 3, 2, 4)) for i in range(2))
        raise PagedLayoutError(
            f"{name}: unsupported KV cache tensor shape {shape} (strides {t.stride()}) for "
            f"{'MLA' if self.mla else 'attention'} with block_size={bs}, heads={h}, head_size={d}"
        )

    # ---- copies ------------------------------------------------------------------------------

    def canonical_u8(self, canon: torch.Tensor) -> torch.Tensor:
        """Byte view of a canonical tensor ([L, 2, T, H, D] or [L, T, D])."""
        u = canon.view(torch.uint8)
        return u.unsqueeze(2) if self.mla else u  # MLA: [L, T, 1, Db]

    def _ids(self, block_ids: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(list(block_ids), dtype=torch.long).to(self.device, non_blocking=True)

    def gather(self, block_ids: Sequence[int], canon: torch.Tensor, first_token: int = 0) -> None:
        """Copy ``block_ids`` (in token order) into ``canon`` starting at token ``first_token``."""
        if not block_ids:
            return
        ids = self._ids(block_ids)
        n_tok = len(block_ids) * self.block_size
        dst = self.canonical_u8(canon)
        for layer, planes in enumerate(self.planes):
            for p, plane in enumerate(planes):
                x = plane.index_select(0, ids).permute(0, 1, 3, 2, 4).reshape(n_tok, self.heads, self.head_bytes)
                if self.mla:
                    dst[layer, first_token:first_token + n_tok].copy_(x)
                else:
                    dst[layer, p, first_token:first_token + n_tok].copy_(x)

    def scatter(self, block_ids: Sequence[int], canon: torch.Tensor, first_token: int = 0) -> None:
        """Copy tokens ``first_token..`` of ``canon`` into ``block_ids`` (in token order)."""
        if not block_ids:
            return
        ids = self._ids(block_ids)
        n = len(block_ids)
        n_tok = n * self.block_size
        src = self.canonical_u8(canon)
        for layer, planes in enumerate(self.planes):
            for p, plane in enumerate(planes):
                s = src[layer, first_token:first_token + n_tok] if self.mla else src[layer, p, first_token:first_token + n_tok]
                r, n_k = plane.shape[1], plane.shape[3]
                plane.index_copy_(0, ids, s.reshape(n, r, n_k, self.heads, self.head_bytes).permute(0, 1, 3, 2, 4))

    def read_block(self, block_id: int) -> torch.Tensor:
        """One block's bytes in canonical token order (tests and debugging)."""
        out = []
        for planes in self.planes:
            for plane in planes:
                x = plane[block_id]
                out.append(x.permute(0, 2, 1, 3).reshape(self.block_size, self.heads, self.head_bytes).clone())
        return torch.stack(out)
