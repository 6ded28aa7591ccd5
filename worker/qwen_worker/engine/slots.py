"""Batch slots: each live row holds one, the lowest free, so a decode step covers the fewest."""
from __future__ import annotations

import heapq


class SlotAllocator:
    """Hands out the lowest free slot of [first, first + slots), so live rows stay packed at the front
    and a decode step covers slots [0, n) for the smallest n."""

    def __init__(self, slots: int, first: int = 0):
        self.total = slots
        self._free = list(range(first, first + slots))
        heapq.heapify(self._free)
        self._used: set[int] = set()

    def free_count(self) -> int:
        return len(self._free)

    def used_count(self) -> int:
        return len(self._used)

    def allocate(self) -> int:
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        return slot

    def release(self, slot: int) -> None:
        self._used.remove(slot)  # a KeyError here is a double free: a bug worth failing loudly on
        heapq.heappush(self._free, slot)

    def highest_used(self) -> int:
        return max(self._used, default=-1)
