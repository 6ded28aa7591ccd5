"""What runs next: which waiting rows take a batch slot, which prompt chunks prefill this step (short ones
first, as far as the KV blocks go), which rows decode, and which row gives its blocks up when the pool
runs dry."""
from __future__ import annotations

import collections

from .block_manager import BlockManager
from .model_runner import PrefillChunk
from .sequence import GenerationRow
from .slots import SlotAllocator


class Scheduler:
    """The one owner of the engine's requests, waiting and running. Rows wait until a slot of their kind
    is free (generations one of `slots`, in arrival order; scoring rows one of `score_slots` above them,
    which no decode step covers: urgent ones first, then the shortest), then take KV blocks as their
    tokens arrive. Prompts prefill in chunks within a token budget per step, short ones first; every row
    whose prompt is in its blocks decodes. When the pool runs dry the most recently admitted row gives its
    blocks back and is recomputed later (keeping its slot, its tokens and its sampling state): older rows
    always finish."""

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
        # Rows without a slot yet, by kind. Other threads read only their lengths (admission estimates).
        self.waiting: collections.deque[GenerationRow] = collections.deque()
        self.waiting_to_score: collections.deque[GenerationRow] = collections.deque()
        self.changed: set[int] = set()  # slots whose block list changed since the runner last saw it
        self.preemptions = 0

    def free_slots(self) -> int:
        return self.allocator.free_count()

    def free_score_slots(self) -> int:
        return self.score_allocator.free_count()

    def live(self) -> int:
        """Generations holding a slot."""
        return self.allocator.used_count()

    def has_rows(self) -> bool:
        return bool(self.rows or self.waiting or self.waiting_to_score)

    def all_rows(self) -> list[GenerationRow]:
        """Running rows in admission order, then waiting ones."""
        return [*self.rows.values(), *self.waiting, *self.waiting_to_score]

    def add(self, row: GenerationRow) -> None:
        """The row waits for a slot of its kind. A scoring row's own tokens (past the prefix the cache
        holds now) order it among the waiting ones."""
        if not (self.score_allocator if row.score else self.allocator).total:
            raise ValueError(f"the engine has no {'scoring' if row.score else 'generation'} slots")
        if row.score:
            self.own_tokens(row)
            self.waiting_to_score.append(row)
        else:
            self.waiting.append(row)

    def own_tokens(self, row: GenerationRow) -> int:
        """A scoring row's prompt tokens past the prefix the cache holds, counted once (engine thread)."""
        if row.own_tokens < 0:
            row.own_tokens = row.known_tokens() - self.blocks.cached_tokens(row)
        return row.own_tokens

    def withdraw(self, row: GenerationRow) -> bool:
        """Take a row out of the waiting rows; False if it holds a slot (or is gone)."""
        for waiting in (self.waiting, self.waiting_to_score):
            if row in waiting:
                waiting.remove(row)
                return True
        return False

    def admit_waiting(self, now: float) -> list[GenerationRow]:
        """Waiting rows into the free slots of their kind; returns those admitted. Generations in arrival
        order. Scoring rows urgent first (half their deadline spent), then the shortest, while their own
        tokens fit a step's budget (the first always goes); long ones (more than short_tokens) hold at most
        half the scoring slots, so that a bulk request's long texts leave room for one-line ones."""
        admitted = []
        while self.waiting and self.allocator.free_count():
            admitted.append(self.waiting.popleft())
            self.admit(admitted[-1])
        free = self.score_allocator.free_count()
        if not free or not self.waiting_to_score:
            return admitted
        short = self.short_tokens
        long_room = max(self.score_allocator.total // 2, 1) - sum(
            1 for row in self.rows.values() if row.score and row.own_tokens > short)
        spent, scoring = 0, []
        for row in self.scoring_order(now):
            if len(scoring) >= free or (scoring and spent >= self.prefill_tokens_per_step):
                break
            if scoring and spent + row.own_tokens > self.prefill_tokens_per_step:
                continue
            if row.own_tokens > short:
                if long_room <= 0:
                    continue
                long_room -= 1
            scoring.append(row)
            spent += row.own_tokens
        chosen = {id(row) for row in scoring}
        self.waiting_to_score = collections.deque(row for row in self.waiting_to_score if id(row) not in chosen)
        for row in scoring:
            self.admit(row)
        return admitted + scoring

    def scoring_order(self, now: float) -> list[GenerationRow]:
        """Waiting scoring rows in the order they take slots: urgent ones (half their deadline spent
        waiting) first, in arrival order, then the shortest."""
        urgent = [row for row in self.waiting_to_score if now - row.admitted_at >= (row.deadline - row.admitted_at) / 2]
        urgent_ids = {id(row) for row in urgent}
        return urgent + sorted((row for row in self.waiting_to_score if id(row) not in urgent_ids),
                               key=lambda row: row.own_tokens)

    def scoring_tokens_left(self) -> int:
        """Prompt tokens the scoring rows in slots have yet to prefill."""
        return sum(row.known_tokens() - row.cached for row in self.rows.values() if row.score)

    def admit(self, row: GenerationRow) -> None:
        """The row takes a free slot of its kind now."""
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
        them only urgent long prompts (half their deadline spent) advance, oldest first, by a quarter of
        the budget kept back for them. Without short requests the oldest long prompts take the whole
        budget."""
        # A decoding row (a token to feed) is prefilled: only the others are asked, a cheap test first.
        waiting = [row for row in self.rows.values() if row.next_input is None and not row.prefilled]
        if not waiting:
            return []
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
        long = [row for row in waiting if id(row) not in short_ids]
        urgent = [row for row in long if now - row.admitted_at >= (row.deadline - row.admitted_at) / 2]
        eighth = max(self.short_tokens // 2, 1)
        # Urgent long prompts keep a quarter of the budget back from the short requests: a steady stream
        # of them filling every step would otherwise starve the long ones until their deadline.
        kept = self.short_tokens if urgent else 0
        chunks: list[tuple[GenerationRow, PrefillChunk]] = []
        budget = self.prefill_tokens_per_step - kept
        for row in short:
            if left[id(row)] > budget:
                continue
            if not self._take(row, left[id(row)], reserve, chunks):
                return chunks  # first come, first served: no younger row overtakes one waiting for blocks
            budget -= left[id(row)]
        smallest = self.short_tokens  # no chunk of a few tokens
        if chunks:  # the step stays short: an eighth beside the short requests, what was kept if urgent
            budget, smallest, long = max(min(budget, eighth), kept), eighth, urgent
        else:
            budget += kept
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
        decoding, preempted, size = self.decoding(), self.preemptions, self.blocks.block_tokens
        for row in decoding:
            held = len(row.blocks)
            if row.cached < held * size:  # its blocks have room for the next token: most steps
                continue
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
