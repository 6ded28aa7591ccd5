"""One request's state in the engine, from admission to its last token (or, scoring, its label scores)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ..sampling import GREEDY, SamplingParams


class CancelFlag:
    """Set by another thread (a cancel), read by the engine thread each step: a flag, where a
    threading.Event per row would build a lock and a condition for every request and never be waited on."""

    __slots__ = ("_set",)

    def __init__(self):
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


@dataclasses.dataclass(eq=False)
class GenerationRow:
    """One request's row: inputs, limits, and what came out. A scoring row (`score`) generates nothing:
    its prompt is prefilled like any other (in chunks, through the KV blocks and the prefix cache) and
    the label head is read at its last token."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = GREEDY
    deadline: float = float("inf")  # time.monotonic() value
    on_token: Callable[[int], None] | None = None  # streaming callback, called from the engine thread
    cancelled: CancelFlag = dataclasses.field(default_factory=CancelFlag)
    tokens: list[int] = dataclasses.field(default_factory=list)
    # Per token of `tokens` when logprobs >= 0: (log-probability, top ids, their log-probabilities).
    token_logprobs: list[tuple[float, tuple[int, ...], tuple[float, ...]]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # stop | length | deadline | cancelled | scored
    score: bool = False
    label_probs: tuple[float, ...] | None = None  # a scoring row's softmax over the label logits
    # Engine state: the batch slot it holds, its KV blocks (and the content hashes of the full ones), the
    # content hashes of its first full blocks of tokens (computed once, whatever blocks it holds), how
    # many of its tokens the blocks hold, the token the next decode step feeds (the last one sampled),
    # prompt tokens found in the prefix cache, times it lost its blocks to a fuller row, and who to tell
    # when it ends.
    slot: int | None = None
    blocks: list[int] = dataclasses.field(default_factory=list)
    block_hashes: list[bytes] = dataclasses.field(default_factory=list)
    digests: list[bytes] = dataclasses.field(default_factory=list)
    cached: int = 0
    next_input: int | None = None
    pending: int = 0  # tokens decoded but not yet read back (overlapped steps: the next step feeds the newest)
    cached_prompt_tokens: int = 0
    preemptions: int = 0
    admitted_at: float = 0.0  # the engine's clock when it entered the engine (waiting for a slot)
    own_tokens: int = -1  # a scoring row's prompt tokens past the cached prefix when counted (-1: not yet)
    on_done: Callable[["GenerationRow", Exception | None], None] | None = None
    on_start: Callable[["GenerationRow"], None] | None = None  # when it takes a slot (engine thread)
    generator: Any = None  # the seed's torch.Generator, made on the device at the row's first draw

    @classmethod
    def scoring(cls, prompt_ids: list[int], deadline: float = float("inf")) -> "GenerationRow":
        return cls(prompt_ids, 0, deadline=deadline, score=True)

    def known_tokens(self) -> int:
        """How many tokens' keys the row needs before its next step: the prompt's and, after a preemption,
        those of what it generated except the last token (the next decode step feeds that one)."""
        return len(self.prompt_ids) + max(len(self.tokens) - 1, 0)

    def known_ids(self) -> list[int]:
        """The tokens known_tokens() counts."""
        return self.ids(0, self.known_tokens())

    def ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of the sequence prompt + generated, without building all of it."""
        p = len(self.prompt_ids)
        return self.prompt_ids[start:min(end, p)] + self.tokens[max(start - p, 0):max(end - p, 0)]

    @property
    def prefilled(self) -> bool:
        return self.cached >= self.known_tokens()

    def total_tokens(self) -> int:
        """The most tokens this row may ever hold in its slot."""
        return len(self.prompt_ids) + self.max_new_tokens
