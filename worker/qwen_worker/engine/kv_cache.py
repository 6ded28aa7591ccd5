"""KV memory: one pool of fixed-size blocks shared by every row, reached through a block table per row."""
from __future__ import annotations

import mmap

import numpy as np
import torch

SCRATCH_BLOCK = 0  # never handed out: padding tokens write their keys here, unused table entries point here


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled tensor. On a CPU its pages are an anonymous map's, so they cost resident memory
    only once written, page by page: an idle pool holds no RSS, and RSS follows the blocks ever used.
    (numpy's zeros, used before, advise transparent huge pages for large arrays: the first block
    written in each layer's part of the pool then cost 2 MiB, 92 MB of RSS after warm-up on the 0.5B.)"""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    size = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    pages = mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # also where the system makes every large map huge-paged
        pages.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(pages, dtype=torch.uint8).view(dtype).view(shape)


class PagedKVCache:
    """Keys and values of every layer as [layers, blocks, kv_heads, block_tokens, head_dim], and a
    device block table [slots, max_blocks]: row `slot`'s token at position p lives in block
    table[slot, p // block_tokens] at offset p % block_tokens, i.e. at location block * block_tokens + offset.

    The memory is zeroed: a masked-out key must still hold a finite value (0 * NaN is NaN).
    """

    def __init__(self, layers: int, blocks: int, kv_heads: int, block_tokens: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, slots: int, max_tokens: int):
        if blocks < 2:
            raise ValueError("a KV pool needs the scratch block and at least one more")
        shape = (layers, blocks, kv_heads, block_tokens, head_dim)
        self.keys = zeroed(shape, dtype, device)
        self.values = zeroed(shape, dtype, device)
        self.blocks = blocks
        self.block_tokens = block_tokens
        self.max_blocks = -(-max_tokens // block_tokens)  # per row
        self.block_table = torch.full((slots, self.max_blocks), SCRATCH_BLOCK, dtype=torch.long, device=device)
        self.scratch = SCRATCH_BLOCK * block_tokens  # the location padding tokens write to
        self.block_bytes = self.bytes_per_block(layers, kv_heads, block_tokens, head_dim, dtype)

    @staticmethod
    def bytes_per_block(layers: int, kv_heads: int, block_tokens: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * layers * kv_heads * block_tokens * head_dim * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, locations: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values [..., kv_heads, head_dim] to token locations [...] (block * block_tokens + offset)."""
        block, offset = locations // self.block_tokens, locations % self.block_tokens
        self.keys[layer][block, :, offset] = keys
        self.values[layer][block, :, offset] = values

    def gather(self, layer: int, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, kv_heads, blocks * block_tokens, head_dim] of the blocks in table [B, blocks]."""
        batch, blocks = table.shape

        def rows(pool: torch.Tensor) -> torch.Tensor:
            picked = pool[layer][table]  # [B, blocks, kv_heads, block_tokens, head_dim]
            return picked.transpose(1, 2).reshape(batch, pool.shape[2], blocks * self.block_tokens, pool.shape[4])

        return rows(self.keys), rows(self.values)
