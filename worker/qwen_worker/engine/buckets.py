"""The few fixed sizes every device tensor is padded to (a GPU's), and groups of similar lengths (a CPU's,
where every padded token costs arithmetic)."""
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


# A CPU pass group is cut when padding would exceed this share of its real tokens, once it already
# holds enough tokens to keep the matrix multiplies efficient.
MAX_PADDING_SHARE = 0.3
MIN_GROUP_TOKENS = 64


def length_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Indices grouped so that padding each group to its longest member wastes little compute."""
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        padded = (len(current) + 1) * lengths[i]  # sorted: the newcomer is the longest
        if current and real >= MIN_GROUP_TOKENS and padded > (1 + MAX_PADDING_SHARE) * (real + lengths[i]):
            groups.append(current)
            current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        groups.append(current)
    return groups
