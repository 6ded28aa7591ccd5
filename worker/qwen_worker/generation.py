"""Per-row sampling and stopping for batched `model.generate`.

One batch mixes requests with different temperature, top_p, max_tokens and deadlines, so these
settings live in the logits processor and stopping criterion below rather than in GenerationConfig.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable, Sequence

import torch
from transformers import LogitsProcessor, StoppingCriteria


@dataclasses.dataclass
class GenerationRow:
    """One request's generation: inputs, limits, and what came out."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    deadline: float = float("inf")  # time.monotonic() value
    on_token: Callable[[int], None] | None = None  # streaming callback, called from the batcher thread
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # stop | length | deadline | cancelled


class RowSampling(LogitsProcessor):
    """Greedy rows keep only their argmax; sampled rows get their own temperature and nucleus.

    The vocabulary is 151,936 wide, so the sort behind top_p runs only for rows that need it, and an
    all-greedy batch passes through untouched (generate then takes the argmax itself).
    """

    def __init__(self, rows: Sequence[GenerationRow], device: torch.device):
        self.temperature = torch.tensor([r.temperature for r in rows], dtype=torch.float32, device=device)
        self.top_p = torch.tensor([r.top_p for r in rows], dtype=torch.float32, device=device)
        self.greedy = self.temperature <= 0
        self.all_greedy = bool(self.greedy.all())
        self.nucleus_rows = torch.nonzero(~self.greedy & (self.top_p < 1)).flatten()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.all_greedy:
            return scores
        scores = scores.float()
        greedy_mask = torch.full_like(scores, float("-inf"))
        greedy_mask.scatter_(1, scores.argmax(dim=-1, keepdim=True), 0.0)
        scaled = scores / torch.where(self.greedy, 1.0, self.temperature).unsqueeze(1)
        if len(self.nucleus_rows):
            rows = scaled[self.nucleus_rows]
            sorted_scores, sorted_idx = rows.sort(dim=-1, descending=True)
            probs = sorted_scores.softmax(dim=-1)
            # Drop a token once the mass before it already reaches top_p; the first token always stays.
            drop_sorted = (probs.cumsum(dim=-1) - probs) >= self.top_p[self.nucleus_rows].unsqueeze(1)
            drop = drop_sorted.scatter(1, sorted_idx, drop_sorted)
            scaled[self.nucleus_rows] = rows.masked_fill(drop, float("-inf"))
        return torch.where(self.greedy.unsqueeze(1), greedy_mask, scaled)


class RowStopping(StoppingCriteria):
    """Stops each row on EOS, its own max_tokens, its deadline, or cancellation; streams new tokens.

    Called by generate after every step with the sequences so far; a row it has stopped stays stopped
    (generate pads it from then on), so each row's real tokens are collected here.
    """

    def __init__(self, rows: Sequence[GenerationRow], eos_token_ids: set[int], clock=time.monotonic,
                 between_steps: Callable[[], None] | None = None):
        self.rows = rows
        self.eos = eos_token_ids
        self.clock = clock
        self.between_steps = between_steps  # other work the batcher may slip in after each step
        self.done = [False] * len(rows)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        newest = input_ids[:, -1].tolist()
        now = self.clock()
        for i, row in enumerate(self.rows):
            if self.done[i]:
                continue
            token = newest[i]
            if token in self.eos:
                row.finish_reason = "stop"
            else:
                row.tokens.append(token)
                if row.on_token is not None:
                    row.on_token(token)
                if len(row.tokens) >= row.max_new_tokens:
                    row.finish_reason = "length"
                elif row.cancelled.is_set():
                    row.finish_reason = "cancelled"
                elif now >= row.deadline:
                    row.finish_reason = "deadline"
            self.done[i] = row.finish_reason is not None
        if self.between_steps is not None and not all(self.done):
            self.between_steps()
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)
