"""The serving layer's own ceiling: one worker on the tiny model (whose forward passes cost next to
nothing), loaded over HTTP at high concurrency. What it reaches is what HTTP, the GIL and the
engine's host-side bookkeeping of one process can carry; a bigger model only lowers it."""
from __future__ import annotations

from qwen_worker.testing import GunicornServer

from .load import run_level_processes

CONCURRENCY = 64
CHAT_TOKENS = 32


def measure(tiny_model: str, texts: list[str], requests: int = 2000) -> dict:
    server = GunicornServer(tiny_model).wait_ready(300)
    try:
        run_level_processes("sentiment", server.url, texts[:64], 8, CHAT_TOKENS)  # warm up
        sentiment = run_level_processes("sentiment", server.url, texts[:requests], CONCURRENCY, CHAT_TOKENS)
        chat = run_level_processes("chat", server.url, texts[:requests // 4], CONCURRENCY, CHAT_TOKENS)
    finally:
        server.stop()
    return {"concurrency": CONCURRENCY, "chat_max_tokens": CHAT_TOKENS, "sentiment": sentiment, "chat": chat}
