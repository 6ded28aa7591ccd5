"""What runs next: which rows hold a batch slot, which prompt chunks prefill this step (as far as the
KV blocks go), which rows decode, and which row gives its blocks up when the pool runs dry."""
from __future__ import annotations

import heapq

from .block_manager import BlockManager
from .model_runner import PrefillChunk
from .sequence import GenerationRow


class SlotAllocator:
    """Hands out the lowest free slot, so live rows stay packed at the front and a decode step covers
    slots [0, n) for the smallest n."""

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
        return max(self._used, default=-1)


class Scheduler:
    """Rows take a slot on admission and KV blocks as their tokens arrive. Prompts prefill oldest row
    first, in chunks within a token budget per step; every row whose prompt is in its blocks decodes.
    When the pool runs dry the most recently admitted row gives its blocks back and is recomputed
    later (keeping its slot, its tokens and its sampling state): older rows always finish."""

    def __init__(self, slots: int, max_tokens: int, prefill_tokens_per_step: int, blocks: BlockManager):
        self.allocator = SlotAllocator(slots)
        self.max_tokens = max_tokens
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.blocks = blocks
        self.rows: dict[int, GenerationRow] = {}  # slot -> row, in admission order
        self.changed: set[int] = set()  # slots whose block list changed since the runner last saw it
        self.preemptions = 0

    def free_slots(self) -> int:
        return self.allocator.free_count()

    def live(self) -> int:
        return len(self.rows)

    def admit(self, row: GenerationRow) -> None:
        if row.total_tokens() > self.max_tokens:  # Engine.add refuses such rows first, with a code
            raise ValueError(f"a row of {row.total_tokens()} tokens exceeds the {self.max_tokens} positions")
        row.slot = self.allocator.allocate()
        row.cached = 0
        row.next_input = None
        self.rows[row.slot] = row

    def release(self, row: GenerationRow) -> None:
        if row.slot is not None and self.rows.get(row.slot) is row:
            del self.rows[row.slot]
            self.blocks.release(row)
            self.changed.add(row.slot)
            self.allocator.release(row.slot)
        row.slot = None

    def prefill_chunks(self) -> list[tuple[GenerationRow, PrefillChunk]]:
        """Prompt chunks for this step, oldest row first, as far as the token budget and the blocks go
        (blocks the decoding rows need for this step's token are kept back)."""
        chunks = []
        budget = self.prefill_tokens_per_step
        reserve = sum(1 for row in self.decoding() if row.cached % self.blocks.block_tokens == 0)
        for row in list(self.rows.values()):
            if row.prefilled:
                continue
            if not row.blocks and row.cached == 0:
                row.cached = self.blocks.attach_prefix(row)
                if not row.preemptions:
                    row.cached_prompt_tokens = row.cached
                self.changed.add(row.slot)
            known = row.known_tokens()
            size = min(known - row.cached, self.prefill_tokens_per_step)
            if chunks and size > budget:
                break  # a chunk joins a pass whole: a CPU pays for every padded token
            size = min(size, self._room(row, reserve) - row.cached)
            if size <= 0 and not chunks:  # the oldest waiting row: newer rows make room for it
                while size <= 0 and self._preempt_newer_than(row):
                    size = min(known - row.cached, self.prefill_tokens_per_step, self._room(row, reserve) - row.cached)
            if size <= 0:
                break  # first come, first served: no younger row overtakes one waiting for blocks
            self.blocks.grow(row, row.cached + size)
            self.changed.add(row.slot)
            chunks.append((row, PrefillChunk(row.slot, row.ids(row.cached, row.cached + size), row.cached)))
            budget -= size
        return chunks

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
