"""What runs next: which requests hold KV slots, which prompt chunks prefill this step, which rows decode."""
from __future__ import annotations

from .kv_cache import SlotAllocator
from .model_runner import PrefillChunk
from .sequence import GenerationRow


class Scheduler:
    """Admits rows into free slots (oldest first), prefills their prompts in chunks within a token
    budget per step, and decodes every row whose prompt is in its slot, all in one step."""

    def __init__(self, slots: int, max_tokens: int, prefill_tokens_per_step: int):
        self.allocator = SlotAllocator(slots)
        self.max_tokens = max_tokens
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.rows: dict[int, GenerationRow] = {}  # slot -> row, in admission order

    def free_slots(self) -> int:
        return self.allocator.free_count()

    def live(self) -> int:
        return len(self.rows)

    def admit(self, row: GenerationRow) -> None:
        if row.total_tokens() > self.max_tokens:  # Engine.add refuses such rows first, with a code
            raise ValueError(f"a row of {row.total_tokens()} tokens exceeds the slot size {self.max_tokens}")
        row.slot = self.allocator.allocate()
        row.cached = 0
        row.next_input = None
        self.rows[row.slot] = row

    def release(self, row: GenerationRow) -> None:
        if row.slot is not None and self.rows.get(row.slot) is row:
            del self.rows[row.slot]
            self.allocator.release(row.slot)
        row.slot = None

    def prefill_chunks(self) -> list[tuple[GenerationRow, PrefillChunk]]:
        """Prompt chunks for this step, oldest row first; the first always fits, whatever its size."""
        chunks = []
        budget = self.prefill_tokens_per_step
        for row in self.rows.values():
            if row.prefilled:
                continue
            size = min(len(row.prompt_ids) - row.cached, self.prefill_tokens_per_step)
            if chunks and size > budget:
                break
            chunks.append((row, PrefillChunk(row.slot, row.prompt_ids[row.cached:row.cached + size], row.cached)))
            budget -= size
        return chunks

    def decoding(self) -> list[GenerationRow]:
        """Rows with a token to feed: their prompt is cached and they have sampled at least once."""
        return [row for row in self.rows.values() if row.next_input is not None]

    def decode_width(self) -> int:
        """Slots [0, width) cover every live row."""
        return self.allocator.highest_used() + 1
