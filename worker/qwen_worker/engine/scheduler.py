"""What runs next: which rows hold a batch slot, which prompt chunks prefill this step (short ones first,
as far as the KV blocks go), which rows decode, and which row gives its blocks up when the pool runs dry."""
from __future__ import annotations

import heapq

from .block_manager import BlockManager
from .model_runner import PrefillChunk
from .sequence import GenerationRow


class SlotAllocator:
    """Hands out the lowest free slot of [first, first + slots), so live rows stay packed at the front
    and a decode step covers slots [0, n) for the smallest n."""

    def __init__(self, slots: int, first: int = 0):
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


class Scheduler:
    """Rows take a slot on admission (generations one of `slots`, scoring rows one of `score_slots`
    above them, which no decode step covers) and KV blocks as their tokens arrive. Prompts prefill in
    chunks within a token budget per step, short ones first; every row whose prompt is in its blocks
    decodes. When the pool runs dry the most recently admitted row gives its blocks back and is
    recomputed later (keeping its slot, its tokens and its sampling state): older rows always finish."""

    def __init__(self, slots: int, max_tokens: int, prefill_tokens_per_step: int, blocks: BlockManager,
                 score_slots: int = 0):
        self.allocator = SlotAllocator(slots)
        self.score_allocator = SlotAllocator(score_slots, first=slots)
        self.max_tokens = max_tokens
        self.prefill_tokens_per_step = prefill_tokens_per_step
        # A request whose own tokens (past its cached prefix) are at most this many is short: it goes first.
        self.short_tokens = max(prefill_tokens_per_step // 4, 1)
        self.blocks = blocks
        self.rows: dict[int, GenerationRow] = {}  # slot -> row, in admission order
        self.changed: set[int] = set()  # slots whose block list changed since the runner last saw it
        self.preemptions = 0

    def free_slots(self) -> int:
        return self.allocator.free_count()

    def free_score_slots(self) -> int:
        return self.score_allocator.free_count()

    def live(self) -> int:
        """Generations holding a slot."""
        return self.allocator.used_count()

    def admit(self, row: GenerationRow) -> None:
        if row.total_tokens() > self.max_tokens:  # Engine.add refuses such rows first, with a code
            raise ValueError(f"a row of {row.total_tokens()} tokens exceeds the {self.max_tokens} positions")
        row.slot = (self.score_allocator if row.score else self.allocator).allocate()
        row.cached = 0
        row.next_input = None
        self.rows[row.slot] = row

    def release(self, row: GenerationRow) -> None:
        if row.slot is not None and self.rows.get(row.slot) is row:
            del self.rows[row.slot]
            self.blocks.release(row)
            self.changed.add(row.slot)
            (self.score_allocator if row.score else self.allocator).release(row.slot)
        row.slot = None

    def prefill_chunks(self, now: float = 0.0) -> list[tuple[GenerationRow, PrefillChunk]]:
        """Prompt chunks for this step within the token budget, as far as the blocks go (blocks the
        decoding rows need for this step's token are kept back). Short requests (their own tokens, past
        the cached prefix, fit a quarter of the budget) go first, oldest first, so that a bulk request's
        long texts never hold a one-line request for more than a step; such a step stays short: beside
        them only an urgent long prompt (half its deadline spent) advances, by an eighth of the budget.
        Without short requests the oldest long prompts take the whole budget."""
        waiting = [row for row in self.rows.values() if not row.prefilled]
        for row in waiting:
            if not row.blocks and row.cached == 0:
                row.cached = self.blocks.attach_prefix(row)
                if not row.preemptions:
                    row.cached_prompt_tokens = row.cached
                self.changed.add(row.slot)
        left = {id(row): row.known_tokens() - row.cached for row in waiting}
        short = [row for row in waiting if row.known_tokens() - row.cached_prompt_tokens <= self.short_tokens]
        short_ids = {id(row) for row in short}
        reserve = sum(1 for row in self.decoding() if row.cached % self.blocks.block_tokens == 0)
        chunks: list[tuple[GenerationRow, PrefillChunk]] = []
        budget = self.prefill_tokens_per_step
        for row in short:
            if left[id(row)] > budget:
                continue
            if not self._take(row, left[id(row)], reserve, chunks):
                return chunks  # first come, first served: no younger row overtakes one waiting for blocks
            budget -= left[id(row)]
        long = [row for row in waiting if id(row) not in short_ids]
        smallest = self.short_tokens  # no chunk of a few tokens
        if chunks:
            budget = smallest = min(budget, max(self.short_tokens // 2, 1))
            long = [row for row in long if now - row.admitted_at >= (row.deadline - row.admitted_at) / 2]
        for row in long:
            most = min(budget, left[id(row)])
            if (chunks and most < min(smallest, left[id(row)])) or not self._take(row, most, reserve, chunks):
                break
            budget -= len(chunks[-1][1].tokens)
        return chunks

    def _take(self, row: GenerationRow, most: int, reserve: int, chunks: list) -> bool:
        """Add the row's next chunk (at most `most` tokens, as far as the blocks go) to `chunks`; the
        step's first row may preempt newer rows for its blocks. False: no room for it."""
        size = min(most, self._room(row, reserve) - row.cached)
        while size <= 0 and not chunks and self._preempt_newer_than(row):
            size = min(most, self._room(row, reserve) - row.cached)
        if size <= 0:
            return False
        self.blocks.grow(row, row.cached + size)
        self.changed.add(row.slot)
        chunks.append((row, PrefillChunk(row.slot, row.ids(row.cached, row.cached + size), row.cached)))
        return True

    def _room(self, row: GenerationRow, reserve: int) -> int:
        """Positions the row could fill with the blocks it holds and those free beyond `reserve`."""
        return (len(row.blocks) + max(self.blocks.available() - reserve, 0)) * self.blocks.block_tokens

    def decoding(self) -> list[GenerationRow]:
        """Rows with a token to feed: their prompt is cached and they have sampled at least once."""
        return [row for row in self.rows.values() if row.next_input is not None]

    def make_room_to_decode(self) -> list[GenerationRow]:
        """Blocks for every decoding row's next token, oldest first, preempting the newest rows when the
        pool is dry (a row may be the one preempted); returns the rows that decode this step."""
        decoding, preempted = self.decoding(), self.preemptions
        for row in decoding:
            held = len(row.blocks)
            while row.next_input is not None and not self.blocks.grow(row, row.cached + 1):
                self._preempt(self._newest_holding())
            if len(row.blocks) != held:  # only a changed block list goes to the runner's tables
                self.changed.add(row.slot)
        return decoding if self.preemptions == preempted else self.decoding()

    def _newest_holding(self) -> GenerationRow:
        return next(row for row in reversed(self.rows.values()) if row.blocks)

    def _preempt_newer_than(self, row: GenerationRow) -> bool:
        for other in reversed(self.rows.values()):
            if other is row:
                return False
            if other.blocks:
                self._preempt(other)
                return True
        return False

    def _preempt(self, row: GenerationRow) -> None:
        """The row gives its blocks back; it keeps its slot and recomputes its tokens when blocks free up."""
        self.blocks.release(row)
        row.cached = 0
        row.next_input = None
        row.preemptions += 1
        self.preemptions += 1
        self.changed.add(row.slot)

    def decode_width(self) -> int:
        """Slots [0, width) cover every live row."""
        return self.allocator.highest_used() + 1
