"""Admission by estimated finish: whether a generation waiting for a KV slot can get one and generate
its reply before its deadline, by how long the slots have recently been held, and whether a sentiment
text can be scored before its deadline, by the tokens ahead of it and the recent scoring pace. One that
cannot is refused at once (503 with Retry-After, which nginx retries on another instance) instead of
waiting its deadline out for a 504."""
from __future__ import annotations

from ..protocol import RequestFailed

UNREACHABLE = "deadline_unreachable"


class SlotTurnover:
    """How long a generation holds its slot and each of its tokens: weighted means of the recent ones,
    updated by the engine thread."""

    WEIGHT = 0.2  # of the newest: the means follow a change of load within ten or so generations
    MIN_SEEN = 4  # before that, no estimate, and nothing is refused by it

    def __init__(self, slots: int):
        self.slots = max(1, slots)
        self.mean_hold_s: float | None = None
        self.mean_token_s: float | None = None
        self.seen = 0

    def observe(self, hold_s: float, tokens: int) -> None:
        hold_s = max(hold_s, 0.0)
        per_token = hold_s / max(tokens, 1)
        if self.mean_hold_s is None or self.mean_token_s is None:
            self.mean_hold_s, self.mean_token_s = hold_s, per_token
        else:
            self.mean_hold_s += self.WEIGHT * (hold_s - self.mean_hold_s)
            self.mean_token_s += self.WEIGHT * (per_token - self.mean_token_s)
        self.seen += 1

    def finish_s(self, position: int, max_tokens: int) -> tuple[float, float] | None:
        """(seconds until the `position`-th generation waiting, 1 the next, gets a slot, with the slots
        freeing at their recent pace; seconds it then generates: a recent hold, or its own max_tokens at
        the recent pace when that is shorter); None while too few were seen."""
        if self.seen < self.MIN_SEEN or self.mean_hold_s is None or self.mean_token_s is None:
            return None
        wait_s = max(position, 0) * self.mean_hold_s / self.slots
        return wait_s, min(self.mean_hold_s, max_tokens * self.mean_token_s)


class ScoringPace:
    """Prompt tokens prefilled for scoring rows per second of the engine loop's passes that prefilled
    some: a weighted mean, updated by the engine thread. A pass shared with generations counts whole, so
    the pace is what scoring gets beside them."""

    WEIGHT = 0.2
    MIN_SEEN = 4

    def __init__(self):
        self.tokens_per_s: float | None = None
        self.seen = 0

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        pace = tokens / seconds
        self.tokens_per_s = pace if self.tokens_per_s is None else self.tokens_per_s + self.WEIGHT * (pace - self.tokens_per_s)
        self.seen += 1

    def seconds(self, tokens: int) -> float | None:
        """How long `tokens` take to prefill at the recent pace; None while too few passes were seen."""
        if self.seen < self.MIN_SEEN or not self.tokens_per_s:
            return None
        return tokens / self.tokens_per_s


def unreachable_score(wait_s: float) -> RequestFailed:
    return RequestFailed(UNREACHABLE, f"this text would not be scored before its deadline (about {wait_s:.0f} s of "
                                      f"texts ahead of it); retry later or elsewhere")


def unreachable(wait_s: float, run_s: float) -> RequestFailed:
    return RequestFailed(UNREACHABLE, f"this request would not finish before its deadline (about {wait_s:.0f} s "
                                      f"waiting for a KV slot, then {run_s:.0f} s generating); retry later or "
                                      f"elsewhere")
