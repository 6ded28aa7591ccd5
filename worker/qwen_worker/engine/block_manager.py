"""Which KV blocks each row holds, and the prefix cache: full blocks keyed by a hash of their tokens and
of everything before them, kept after their last row ends until the pool needs them (least recently
used first). A row whose prompt starts with cached blocks attaches them and prefills only the rest."""
from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from typing import Sequence

import numpy as np

from .kv_cache import SCRATCH_BLOCK
from .sequence import GenerationRow


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """A keyed-by-content digest (not Python's hash(): a client must not be able to forge a collision
    and read another conversation's keys)."""
    return hashlib.blake2b(parent + np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, blocks: int, block_tokens: int, caching: bool = True):
        self.block_tokens = block_tokens
        self.caching = caching
        self.total = blocks - 1  # the scratch block is never handed out
        self._free = [b for b in range(blocks) if b != SCRATCH_BLOCK]  # a heap: low blocks first, so the
        heapq.heapify(self._free)  # pages ever written (and resident) stay few
        self._refs = [0] * blocks
        self._hash_of: dict[int, bytes] = {}  # block -> its content hash (full, registered blocks)
        self._cached: dict[bytes, int] = {}  # content hash -> block
        self._unused: OrderedDict[int, None] = OrderedDict()  # cached blocks no row holds, oldest first
        self.hit_tokens = 0  # prompt tokens served from the cache, and asked for (totals, for metrics)
        self.query_tokens = 0
        self.evictions = 0

    # ---- counts ----------------------------------------------------------------------------------
    def available(self) -> int:
        """Blocks a row could take now: free ones and cached ones no row holds."""
        return len(self._free) + len(self._unused)

    def used(self) -> int:
        return self.total - self.available()

    def cached(self) -> int:
        return len(self._unused)

    # ---- rows ------------------------------------------------------------------------------------
    def attach_prefix(self, row: GenerationRow) -> int:
        """Attach the cached blocks the row's tokens start with to the row (which holds none); returns
        the tokens they hold. Only blocks before the last token count: its logits must be computed."""
        assert not row.blocks
        tokens, blocks, hashes = row.known_ids(), row.blocks, row.block_hashes
        self.query_tokens += len(tokens)
        if not self.caching:
            return 0
        parent = b""
        for start in range(0, len(tokens) - self.block_tokens, self.block_tokens):
            digest = block_hash(parent, tokens[start:start + self.block_tokens])
            block = self._cached.get(digest)
            if block is None:
                break
            self._take(block)
            blocks.append(block)
            hashes.append(digest)
            parent = digest
        self.hit_tokens += len(blocks) * self.block_tokens
        return len(blocks) * self.block_tokens

    def grow(self, row: GenerationRow, tokens: int) -> bool:
        """Give a row blocks for its first `tokens` positions; False (and nothing taken) when the pool
        cannot."""
        needed = -(-tokens // self.block_tokens) - len(row.blocks)
        if needed <= 0:
            return True
        if needed > self.available():
            return False
        for _ in range(needed):
            row.blocks.append(self._allocate())
        return True

    def register(self, row: GenerationRow) -> None:
        """Key the row's blocks that its computed tokens (row.cached) have filled."""
        if not self.caching:
            return
        blocks, hashes, size = row.blocks, row.block_hashes, self.block_tokens
        while len(hashes) < row.cached // size:
            i = len(hashes)
            digest = block_hash(hashes[-1] if hashes else b"", row.ids(i * size, (i + 1) * size))
            hashes.append(digest)
            if digest not in self._cached:  # a twin computed at the same time stays private
                self._cached[digest] = blocks[i]
                self._hash_of[blocks[i]] = digest

    def release(self, row: GenerationRow) -> None:
        """A row lets go of its blocks (newest first, so a prefix's tail is evicted before its head)."""
        for block in reversed(row.blocks):
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            if block in self._hash_of:
                self._unused[block] = None
            else:
                heapq.heappush(self._free, block)
        row.blocks.clear()
        row.block_hashes.clear()

    # ---- blocks ----------------------------------------------------------------------------------
    def _take(self, block: int) -> None:
        if self._refs[block] == 0:
            self._unused.pop(block, None)
        self._refs[block] += 1

    def _allocate(self) -> int:
        if self._free:
            block = heapq.heappop(self._free)
        else:  # evict the least recently used cached block
            block, _ = self._unused.popitem(last=False)
            del self._cached[self._hash_of.pop(block)]
            self.evictions += 1
        self._refs[block] = 1
        return block
