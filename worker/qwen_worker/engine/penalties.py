"""Presence, frequency and repetition penalties for every penalized row of a step, in a few batched
device operations over per-slot token counts (never a loop over rows on the device)."""
from __future__ import annotations

from typing import Sequence

import torch

from .sequence import GenerationRow


class PenaltyState:
    """Per KV slot: how often each token was generated, and which tokens were seen (prompt included).

    Allocated on the first penalized row: [slots, vocab] of float32 counts and bools (at 256 slots and
    Qwen's 151,936 tokens, 195 MB on the device)."""

    def __init__(self, slots: int, vocab: int, device: torch.device):
        self.counts = torch.zeros((slots, vocab), dtype=torch.float32, device=device)
        self.seen = torch.zeros((slots, vocab), dtype=torch.bool, device=device)
        self.device = device

    def reset(self, row: GenerationRow) -> None:
        """A row entered its slot: nothing generated yet, its prompt seen."""
        self.counts[row.slot].zero_()
        self.seen[row.slot].zero_()
        self.seen[row.slot, torch.tensor(row.prompt_ids, device=self.device)] = True

    def apply(self, logits: torch.Tensor, rows: Sequence[GenerationRow | None]) -> torch.Tensor:
        """The logits with each penalized row's penalties applied (a new tensor; others unchanged)."""
        at = [i for i, row in enumerate(rows) if row is not None and row.penalized]
        if not at:
            return logits
        penalized = [rows[i] for i in at]
        to = dict(device=self.device, non_blocking=True)
        index = torch.tensor(at, dtype=torch.long).to(**to)
        slots = torch.tensor([row.slot for row in penalized], dtype=torch.long).to(**to)
        params = torch.tensor([[row.repetition_penalty, row.presence_penalty, row.frequency_penalty]
                               for row in penalized], dtype=torch.float32).to(**to)
        repetition, presence, frequency = (params[:, i:i + 1] for i in range(3))
        chosen = logits.index_select(0, index).float()
        counts, seen = self.counts.index_select(0, slots), self.seen.index_select(0, slots)
        # As in CTRL and transformers: a seen token's logit is divided by the penalty when positive,
        # multiplied when negative, so that it always becomes less likely.
        chosen = torch.where(seen, torch.where(chosen > 0, chosen / repetition, chosen * repetition), chosen)
        chosen = chosen - presence * (counts > 0) - frequency * counts
        out = logits.float().clone()
        out.index_copy_(0, index, chosen)
        return out

    def count(self, rows: Sequence[GenerationRow | None], tokens: torch.Tensor) -> None:
        """The step's drawn tokens (on the device, aligned with rows) join the penalized rows' counts."""
        at = [i for i, row in enumerate(rows) if row is not None and row.penalized]
        if not at:
            return
        to = dict(device=self.device, non_blocking=True)
        index = torch.tensor(at, dtype=torch.long).to(**to)
        slots = torch.tensor([rows[i].slot for i in at], dtype=torch.long).to(**to)
        drawn = tokens.index_select(0, index)
        self.counts.index_put_((slots, drawn), torch.ones_like(drawn, dtype=torch.float32), accumulate=True)
        self.seen[slots, drawn] = True
