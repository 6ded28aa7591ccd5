"""The block tables' host side: which KV blocks hold each slot's positions. Rows change as blocks are given
(`set`) and reach the device before the next pass, the changed rows only (`upload`); the pool locations
of positions are read from them on the host (`locations`)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .flight import CopyFence
from .kv_cache import SCRATCH_BLOCK, PagedKVCache


class BlockTables:
    def __init__(self, kv: PagedKVCache, device: torch.device):
        self.kv = kv
        self.block_tokens = kv.block_tokens
        self._host = torch.zeros(kv.block_table.shape, dtype=torch.long, pin_memory=device.type == "cuda")
        self.host = self._host.numpy()
        self._stale: set[int] = set()
        # Idle unless steps overlap: a host a step ahead must not rewrite rows the device has not copied yet.
        self.fence = CopyFence()

    def set(self, slot: int, blocks: Sequence[int]) -> None:
        """Row `slot` now holds `blocks` (its first positions' keys, in order); the rest of the row points
        at the scratch block."""
        self.fence.wait()
        row = self.host[slot]
        row[:len(blocks)] = blocks
        row[len(blocks):] = SCRATCH_BLOCK
        self._stale.add(slot)

    def upload(self) -> None:
        if self._stale:
            slots = sorted(self._stale)
            self._stale.clear()
            low, high = slots[0], slots[-1] + 1  # one copy of the span covering the changed rows
            self.kv.block_table[low:high].copy_(self._host[low:high], non_blocking=True)
            self.fence.copied()

    def locations(self, slots, positions) -> np.ndarray:
        """Pool locations (block * block_tokens + offset) of the given rows' positions, one array operation
        (their blocks must be set): decode's one position per row, a prefill chunk's span."""
        slots, positions, size = np.asarray(slots), np.asarray(positions), self.block_tokens
        return self.host[slots, positions // size] * size + positions % size
