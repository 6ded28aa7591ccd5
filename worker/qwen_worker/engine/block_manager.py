"""Which KV blocks each row holds, and the prefix cache: full blocks keyed by a hash of their tokens and
of everything before them, kept after their last row ends until the pool needs them (least recently
used first). A row whose prompt starts with cached blocks attaches them and prefills only the rest;
where its prompt then goes on like the head of a cached block (the sentiment instruction's tail, before
each text), that head's keys are copied into a fresh block of its own (copy on attach) rather than
computed again."""
from __future__ import annotations

import hashlib
import heapq
import itertools
from collections import OrderedDict
from typing import Iterator, Sequence

import numpy as np

from .kv_cache import SCRATCH_BLOCK
from .sequence import GenerationRow


# How many of the most recently cached blocks after a prefix copy_on_attach compares a prompt with.
RECENT_SIBLINGS = 8


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


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
        # Cached blocks by the hash of what precedes them, newest last, with their tokens: where a
        # prompt's next tokens begin like one of them, copy_on_attach finds it.
        self._children: dict[bytes, OrderedDict[int, tuple[int, ...]]] = {}
        self._parent_of: dict[int, bytes] = {}
        # The hashes of cached blocks by what precedes them and their tokens: a prompt's blocks that are
        # cached are keyed by a lookup, not hashed again (thousands of prompts share a system or sentiment
        # prompt). A hash, not a block: a block may be evicted and refilled under another thread's read.
        self._hash_by_content: dict[tuple[bytes, tuple[int, ...]], bytes] = {}
        self.copies: list[tuple[int, int]] = []  # (source, destination) blocks to copy before the next pass
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
        tokens = row.known_ids()
        self.query_tokens += len(tokens)
        for digest, block in self._cached_chain(row):
            self._take(block)
            row.blocks.append(block)
            row.block_hashes.append(digest)
        attached = len(row.blocks) * self.block_tokens + self._copy_on_attach(row, tokens)
        self.hit_tokens += attached
        return attached

    def _copy_on_attach(self, row: GenerationRow, tokens: Sequence[int]) -> int:
        """Tokens after the row's full cached blocks that begin one of the recent cached blocks following
        them (its last token excepted): a fresh block for the row gets that block's keys (self.copies)."""
        if not self.caching:
            return 0
        best, source = self._best_sibling(row.block_hashes[-1] if row.block_hashes else b"", tokens,
                                          len(row.blocks) * self.block_tokens)
        # The source is held until copied (no allocation may evict it first); a source no row holds
        # leaves the available blocks as it is taken, so then two must be available.
        if source is None or self.available() < (2 if self._refs[source] == 0 else 1):
            return 0
        self._take(source)
        destination = self._allocate()
        row.blocks.append(destination)
        self.copies.append((source, destination))
        return best

    def _best_sibling(self, parent: bytes, tokens: Sequence[int], start: int) -> tuple[int, int | None]:
        """(tokens shared, block): the recent cached block after `parent` whose head is the longest run of
        tokens[start:] (the last token excepted); (0, None) when none shares a token."""
        wanted = tuple(tokens[start:min(start + self.block_tokens, len(tokens) - 1)])
        siblings = self._children.get(parent)
        best, source = 0, None
        if wanted and siblings:
            # The newest first, never a walk of all of them: thousands of prompts share one system prompt.
            for block in itertools.islice(reversed(siblings), RECENT_SIBLINGS):
                shared = _common_prefix(siblings.get(block, ()), wanted)  # .get: evicted meanwhile
                if shared > best:
                    best, source = shared, block
        return best, source

    def copied(self) -> list[tuple[int, int]]:
        """The copies to run now (before any pass that reads their destinations); their sources are let
        go: a copy is ordered before any later write to them (one device stream)."""
        copies, self.copies = self.copies, []
        for source, _ in copies:
            self._let_go(source)
        return copies

    def cached_tokens(self, row: GenerationRow) -> int:
        """How many of a row's tokens attach_prefix would find cached now, copies included (reads the
        cache only: an estimate another thread may ask for while the engine thread leaves the row alone)."""
        parent, full = b"", 0
        try:
            for parent, _ in self._cached_chain(row):
                full += self.block_tokens
            return full + self._best_sibling(parent, row.known_ids(), full)[0]
        except RuntimeError:  # the engine thread changed the cache under this read: what was found
            return full

    def _cached_chain(self, row: GenerationRow) -> Iterator[tuple[bytes, int]]:
        """(hash, block) of the cached full blocks the row's tokens start with, before its last token."""
        if not self.caching:
            return
        for i in range((row.known_tokens() - 1) // self.block_tokens):
            digest = self._digest(row, i)
            block = self._cached.get(digest)
            if block is None:
                return
            yield digest, block

    def _digest(self, row: GenerationRow, i: int) -> bytes:
        """The content hash of the row's block i (and those before it), computed once per row: the cache
        is asked before the row is admitted and again as it attaches, and its prompt's blocks are keyed
        after they are computed."""
        chain, size = row.digests, self.block_tokens
        while len(chain) <= i:
            n = len(chain)
            parent, tokens = chain[-1] if n else b"", tuple(row.ids(n * size, (n + 1) * size))
            digest = self._hash_by_content.get((parent, tokens))
            chain.append(digest or block_hash(parent, tokens))
        return chain[i]

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
            digest = self._digest(row, i)
            hashes.append(digest)
            if digest not in self._cached:  # a twin computed at the same time stays private
                self._cached[digest] = blocks[i]
                self._hash_of[blocks[i]] = digest
                parent, tokens = hashes[-2] if i else b"", tuple(row.ids(i * size, (i + 1) * size))
                self._parent_of[blocks[i]] = parent
                self._children.setdefault(parent, OrderedDict())[blocks[i]] = tokens
                self._hash_by_content[parent, tokens] = digest

    def release(self, row: GenerationRow) -> None:
        """A row lets go of its blocks (newest first, so a prefix's tail is evicted before its head)."""
        for block in reversed(row.blocks):
            self._let_go(block)
        row.blocks.clear()
        row.block_hashes.clear()

    # ---- blocks ----------------------------------------------------------------------------------
    def _let_go(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block]:
            return
        if block in self._hash_of:
            self._unused[block] = None
        else:
            heapq.heappush(self._free, block)

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
            parent = self._parent_of.pop(block)
            siblings = self._children[parent]
            del self._hash_by_content[parent, siblings.pop(block)]
            if not siblings:
                del self._children[parent]
            self.evictions += 1
        self._refs[block] = 1
        return block
