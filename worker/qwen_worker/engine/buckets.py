"""The few fixed sizes every device tensor is padded to."""
from __future__ import annotations

from typing import Sequence


def doubling(start: int, limit: int) -> tuple[int, ...]:
    """start, 2*start, 4*start, ... up to and including `limit` (which ends the list even off the doubling)."""
    sizes = []
    size = start
    while size < limit:
        sizes.append(size)
        size *= 2
    sizes.append(limit)
    return tuple(sizes)


def bucket(n: int, sizes: Sequence[int]) -> int:
    """The smallest size that holds n."""
    for size in sizes:
        if size >= n:
            return size
    raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")
