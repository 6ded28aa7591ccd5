"""KV memory: one preallocated slot per running request, each as long as the longest request."""
from __future__ import annotations

import heapq

import torch


class SlotKVCache:
    """Keys and values of every layer as [layers, slots, kv_heads, max_tokens + 1, head_dim].

    Position `max_tokens` of every slot is scratch: padding tokens write their keys there, so a padded
    batch never overwrites a real token. Attention never reads it (lengths stop at max_tokens).
    The memory is zeroed: a masked-out key must still hold a finite value (0 * NaN is NaN).
    """

    def __init__(self, layers: int, slots: int, kv_heads: int, max_tokens: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (layers, slots, kv_heads, max_tokens + 1, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_tokens = max_tokens
        self.scratch = max_tokens

    @staticmethod
    def bytes_needed(layers: int, slots: int, kv_heads: int, max_tokens: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * layers * slots * kv_heads * (max_tokens + 1) * head_dim * torch.empty((), dtype=dtype).element_size()


class SlotAllocator:
    """Hands out the lowest free slot, so live requests stay packed at the front and a decode step
    covers slots [0, n) for the smallest n."""

    def __init__(self, slots: int):
        self._free = list(range(slots))
        heapq.heapify(self._free)
        self._used: set[int] = set()

    def free_count(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        return slot

    def release(self, slot: int) -> None:
        self._used.remove(slot)  # a KeyError here is a double free: a bug worth failing loudly on
        heapq.heappush(self._free, slot)

    def highest_used(self) -> int:
        """The highest slot in use, -1 when none is."""
        return max(self._used, default=-1)
