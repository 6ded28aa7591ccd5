"""The serving layer's own ceiling: one worker on the tiny model (whose forward passes cost next to
nothing), loaded over HTTP at high concurrency, in both layouts: model and HTTP in one process, and
HTTP in API processes beside an engine process. What it reaches is what HTTP, the GIL and the
engine's host-side bookkeeping carry; a bigger model only lowers it."""
from __future__ import annotations

from qaio_testing import GunicornServer

from .load import run_level_processes

CONCURRENCY = 64
CHAT_TOKENS = 32
LAYOUTS = {"one process": {"QAIO_ENGINE_PROCESS": "off"},
           "engine process + API processes": {"QAIO_ENGINE_PROCESS": "on"}}


def measure_layout(tiny_model: str, texts: list[str], requests: int, env: dict) -> dict:
    server = GunicornServer(tiny_model, **env).wait_ready(300)
    try:
        run_level_processes("sentiment", server.url, texts[:64], 8, CHAT_TOKENS)  # warm up
        sentiment = run_level_processes("sentiment", server.url, texts[:requests], CONCURRENCY, CHAT_TOKENS)
        chat = run_level_processes("chat", server.url, texts[:requests // 4], CONCURRENCY, CHAT_TOKENS)
    finally:
        server.stop()
    return {"env": env, "sentiment": sentiment, "chat": chat}


def measure(tiny_model: str, texts: list[str], requests: int = 2000) -> dict:
    layouts = {name: measure_layout(tiny_model, texts, requests, env) for name, env in LAYOUTS.items()}
    return {"concurrency": CONCURRENCY, "chat_max_tokens": CHAT_TOKENS, "layouts": layouts}


def report_lines(serving: dict | None) -> list[str]:
    """The section's text for either benchmark report."""
    if not serving or "layouts" not in serving:
        return ["Not measured in this run."]
    lines = [f"One worker on the tiny model (its passes cost next to nothing), c={serving['concurrency']}, "
             f"{serving['chat_max_tokens']}-token streamed replies: what HTTP, the GIL and the engine's host-side "
             "work carry on this machine (load clients included), in both process layouts (`QAIO_ENGINE_PROCESS`).",
             "", "| layout | sentiment requests/s | p50 ms | chat streamed tok/s | TTFT p50 ms | errors |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, result in serving["layouts"].items():
        sent, chat = result["sentiment"], result["chat"]
        lines.append(f"| {name} | {sent['requests_per_s']:,.0f} | {sent['latency_ms']['p50']:,.0f} | "
                     f"{chat['output_tokens_per_s']:,.0f} | {chat['ttft_ms']['p50']:,.0f} | "
                     f"{sent['errors'] + chat['errors']} |")
    return lines
