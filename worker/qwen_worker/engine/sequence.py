"""One generation request's state, from admission to its last token."""
from __future__ import annotations

import dataclasses
import threading
from typing import Callable


@dataclasses.dataclass(eq=False)
class GenerationRow:
    """One request's generation: inputs, limits, and what came out."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    deadline: float = float("inf")  # time.monotonic() value
    on_token: Callable[[int], None] | None = None  # streaming callback, called from the engine thread
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # stop | length | deadline | cancelled
    # Engine state: the KV slot it holds, how many of its tokens the slot's cache holds, the token the
    # next decode step feeds (the last one sampled), and who to tell when it ends.
    slot: int | None = None
    cached: int = 0
    next_input: int | None = None
    on_done: Callable[["GenerationRow", Exception | None], None] | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def prefilled(self) -> bool:
        return self.cached >= len(self.prompt_ids)

    def total_tokens(self) -> int:
        """The most tokens this row may ever hold in its slot."""
        return len(self.prompt_ids) + self.max_new_tokens
