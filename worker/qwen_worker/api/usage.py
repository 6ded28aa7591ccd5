"""Usage per API key. The front door names the key a request came with (X-Qaio-Key: its name from
QAIO_API_KEYS_FILE, never the key); its requests and the tokens it cost are counted under that name
when its response ends, a stream's included."""
from __future__ import annotations

import re

from flask import g, request

from ..client import RequestHandle

KEY_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")  # what nginx/njs/qaio_keys.js accepts as a name
MAX_KEY_NAMES = 1000  # label values per process; names past it count as "_other"


def key_name() -> str:
    """The request's API key name, or "" (keys off, or a header the front door would never send)."""
    name = request.headers.get("X-Qaio-Key", "")
    return name if KEY_NAME.fullmatch(name) else ""


def track(handles: list[RequestHandle]) -> None:
    """Handles of one prompt (n choices share it) that this request's usage counts."""
    g.setdefault("usage_groups", []).append(list(handles))


def tokens(groups: list[list[RequestHandle]]) -> tuple[int, int]:
    """Prompt tokens the engine took up (once per prompt) and tokens generated, so far."""
    prompt = sum(group[0].prompt_tokens for group in groups if any(h.started_at is not None for h in group))
    return prompt, sum(len(h.tokens) for group in groups for h in group)


class KeyUsage:
    """The per-key counters of WorkerMetrics, with the label values bounded."""

    def __init__(self, metrics):
        self.requests = metrics.key_requests
        self.tokens = metrics.key_tokens
        self.seen: set[str] = set()

    def observe(self, name: str, groups: list[list[RequestHandle]]) -> None:
        if name not in self.seen:
            if len(self.seen) >= MAX_KEY_NAMES:
                name = "_other"
            self.seen.add(name)
        prompt, completion = tokens(groups)
        self.requests.labels(key=name).inc()
        if prompt:
            self.tokens.labels(key=name, kind="prompt").inc(prompt)
        if completion:
            self.tokens.labels(key=name, kind="completion").inc(completion)
