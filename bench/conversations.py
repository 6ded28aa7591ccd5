"""`make conversation-bench`: what a worker holds and how its conversations' later turns fare. One worker
straight (no nginx) on the 0.5B-shape model, per source tree (this one, and with `--before` another
checkout, e.g. the commit before the KV blocks, run the same way in the same sitting):

- resident memory of the instance's processes at idle, and after 4 five-turn conversations;
- time to first token of each turn (4 conversations at once, each sending its whole history per turn,
  streamed, greedy), p50 per turn;
- streamed greedy chat and sentiment at c=16 (throughput must not drop).

Writes docs/conversations.md and .json.

    git worktree add /tmp/before <commit> && python -m bench.conversations --before /tmp/before
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from pathlib import Path

import requests

from qaio_testing import REPO, GunicornServer

from .gpu_http import level, rss_mb, worker_processes
from .run import machine
from .texts import review_texts
from .trees import measure_trees, tree_conf, tree_env

TURNS = 5
CONVERSATIONS = 4


def stream_turn(url: str, messages: list[dict], max_tokens: int, headers: dict | None = None,
                served: list | None = None) -> tuple[float, str]:
    """One streamed greedy chat turn: (seconds to the first content, the reply's text); the answer's
    headers go to `served` when given."""
    started = time.perf_counter()
    first, parts = None, []
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=600, headers=headers) as response:
        response.raise_for_status()
        if served is not None:
            served.append(response.headers)
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                first = first or time.perf_counter() - started
                parts.append(delta)
    return first if first is not None else time.perf_counter() - started, "".join(parts)


def conversations(url: str, texts: list[str], max_tokens: int, name: str | None = None, served: list | None = None,
                  count: int = CONVERSATIONS, think_s: float = 0.0) -> list[list[float]]:
    """TTFT seconds [turn][conversation] of `count` conversations of TURNS turns, run at once, each pausing
    think_s on average (0.5-1.5x, the same every run) before its next turn; with `name`, each sends
    X-Conversation-Id `<name>-<n>`; `served[n]`: conversation n's answers' headers."""
    ttft = [[0.0] * count for _ in range(TURNS)]

    def converse(c: int) -> None:
        pauses = random.Random(c)
        messages = [{"role": "system", "content": "You are a helpful assistant for a food delivery service."}]
        headers = {"X-Conversation-Id": f"{name}-{c}"} if name else None
        for turn in range(TURNS):
            question = " ".join(texts[(c * TURNS + turn) * 3:(c * TURNS + turn) * 3 + 3])
            messages.append({"role": "user", "content": f"What do you make of these reviews? {question}"})
            ttft[turn][c], reply = stream_turn(url, messages, max_tokens, headers,
                                               served[c] if served is not None else None)
            messages.append({"role": "assistant", "content": reply})
            time.sleep(think_s * pauses.uniform(0.5, 1.5))

    threads = [threading.Thread(target=converse, args=(c,)) for c in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return ttft


def measure(tree: str, model: str, texts: list[str], max_tokens: int, requests_per_level: int) -> dict:
    server = GunicornServer(model, conf=tree_conf(tree), QAIO_MAX_BATCH_SIZE="16", **tree_env(tree)).wait_ready(900)
    try:
        roles = worker_processes(server.proc.pid)
        out = {"idle_rss_mb": rss_mb(roles)}
        ttft = conversations(server.url, texts, max_tokens)
        out["ttft_p50_ms_by_turn"] = [1000 * statistics.median(turn) for turn in ttft]
        out["rss_after_conversations_mb"] = rss_mb(roles)
        out["readyz_kv_cache"] = requests.get(server.url + "/readyz", timeout=30).json().get("kv_cache")
        chat = level(server, roles, "chat", texts[:requests_per_level], 16, max_tokens, temperature=0)
        sentiment = level(server, roles, "sentiment", texts[:4 * requests_per_level], 16, max_tokens)
        out["chat_c16_tokens_per_s"], out["chat_c16_errors"] = chat["output_tokens_per_s"], chat["errors"]
        out["sentiment_c16_requests_per_s"], out["sentiment_c16_errors"] = sentiment["requests_per_s"], sentiment["errors"]
        out["rss_after_load_mb"] = rss_mb(roles)
        return out
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(REPO / "models" / "qwen2.5-0.5b-shape"))
    parser.add_argument("--before", help="another checkout of the project, measured the same way first")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--requests", type=int, default=32, help="chat requests per c=16 level (4x for sentiment)")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    texts = review_texts(max(4 * args.requests, 3 * TURNS * CONVERSATIONS))
    runs = measure_trees(args.before, lambda tree: measure(tree, args.model, texts, args.max_tokens, args.requests))
    write(args, runs)
    return 0


def write(args, runs: list[dict]) -> None:
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "model": Path(args.model).name,
              "max_tokens": args.max_tokens, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "conversations.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Memory and conversations", "",
             f"`make conversation-bench`, {report['date']}, model `{report['model']}` (random weights, the real "
             f"tokenizer), one worker straight, QAIO_MAX_BATCH_SIZE=16, greedy, {args.max_tokens} tokens per reply. "
             f"{CONVERSATIONS} conversations at once, {TURNS} turns each, every turn sending the whole history, "
             "streamed; RSS: every process of the instance, from /proc.", "",
             "| tree | idle RSS MB | RSS after the conversations MB | TTFT p50 by turn, ms | turn 5 / turn 1 | "
             "chat c=16 tok/s | sentiment c=16 req/s | errors |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        ttft = run["ttft_p50_ms_by_turn"]
        lines.append(f"| {run['name']} ({run.get('commit', '?')}) | {run['idle_rss_mb']:.0f} | {run['rss_after_conversations_mb']:.0f} | "
                     f"{' → '.join(f'{t:.0f}' for t in ttft)} | {ttft[-1] / ttft[0]:.2f} | "
                     f"{run['chat_c16_tokens_per_s']:.1f} | {run['sentiment_c16_requests_per_s']:.1f} | "
                     f"{run['chat_c16_errors'] + run['sentiment_c16_errors']} |")
    kv = runs[-1].get("readyz_kv_cache")
    if kv:
        lines += ["", f"This tree's KV pool after the conversations (`/readyz`): {kv['blocks_used']} of "
                  f"{kv['blocks_total']} blocks in use, {kv['blocks_cached']} cached, prefix hit rate "
                  f"{kv['prefix_hit_rate']}."]
    (args.out / "conversations.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
