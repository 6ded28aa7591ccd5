"""Stop strings found in generated text as it grows: what is safe to send, and where the text ends."""
from __future__ import annotations

from typing import Sequence


class StopStrings:
    """Text fed piece by piece comes back with every tail that could begin a stop string held back,
    so a stream never shows part of one; at the first stop string the text ends before it."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.text = ""
        self.sent = 0  # characters of text already handed out
        self.hit: int | None = None  # where the first stop string begins, once found

    def push(self, piece: str) -> str:
        """What of the text so far may be sent now (empty once stopped)."""
        if self.hit is not None:
            return ""
        self.text += piece
        found = [i for i in (self.text.find(stop, self.sent) for stop in self.stops) if i >= 0]
        if found:
            self.hit = min(found)
            return self._take(self.hit)
        return self._take(len(self.text) - self._held())

    def flush(self) -> str:
        """At the end of the generation: whatever was held back (no stop string came)."""
        return "" if self.hit is not None else self._take(len(self.text))

    def _held(self) -> int:
        """The longest tail of the unsent text that a stop string starts with."""
        pending = self.text[self.sent:]
        for size in range(min(len(pending), max(map(len, self.stops)) - 1), 0, -1):
            tail = pending[-size:]
            if any(stop.startswith(tail) for stop in self.stops):
                return size
        return 0

    def _take(self, end: int) -> str:
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out
