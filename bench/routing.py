"""`make routing-bench`: what the front door's routing buys, through nginx in front of two workers on the
0.5B-shape model, in one run (docs/routing.md and .json):

- conversation affinity: CONVERSATIONS 5-turn conversations at once, each user pausing THINK_S on
  average before the next turn (every turn sends the whole history, streamed, greedy), once with
  X-Conversation-Id and once without (least_conn alone), distinct texts so neither phase finds the
  other's prefixes; time to first token p50 per turn, the turns that reached the
  worker of the conversation's first turn, and each worker's prefix-cache hit rate in each phase;
- a slow worker: one of the two sleeps QAIO_STEP_DELAY_MS after every engine step (a throttled CPU, a
  sick GPU), steady closed-loop chat load by least_conn and by round robin against the same workers;
  each worker's share of the answers and the stack's p50/p95.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import statistics
import time
import uuid
from collections import Counter
from pathlib import Path

import requests

from qaio_testing import REPO, GunicornServer, NginxServer, served_by

from .conversations import TURNS, conversations
from .run import machine
from .texts import review_texts

CONVERSATIONS = 8
# Users read a reply before they answer. Without pauses least_conn itself keeps a conversation home: its
# next turn leaves just as its last one freed a connection on that worker.
THINK_S = 2.0
UNLIMITED = {"QAIO_NGINX_CHAT_RATE": "1000r/s", "QAIO_NGINX_CHAT_BURST": "1000"}
WORKER_ENV = {"QAIO_MAX_BATCH_SIZE": "16", "QAIO_TORCH_THREADS": "1"}  # two workers share this machine's cores


def prefix_tokens(worker: GunicornServer) -> dict[str, float]:
    """The worker's prefix-cache token counters: {"hit": ..., "queried": ...}."""
    text = requests.get(worker.url + "/metrics", timeout=30).text
    found = re.findall(r'^qaio_prefix_cache_tokens_total\{kind="(\w+)"\} (\S+)$', text, re.M)
    return {kind: float(value) for kind, value in found}


def affinity_phase(proxy: NginxServer, pair: list[GunicornServer], texts: list[str], max_tokens: int,
                   name: str | None) -> dict:
    before = {w.address: prefix_tokens(w) for w in pair}
    served: list[list] = [[] for _ in range(CONVERSATIONS)]
    ttft = conversations(proxy.url, texts, max_tokens, name=name, served=served, count=CONVERSATIONS,
                         think_s=THINK_S)
    workers = [[served_by(headers) for headers in turns] for turns in served]
    hit_rate = {}
    for w in pair:
        after = prefix_tokens(w)
        queried = after.get("queried", 0) - before[w.address].get("queried", 0)
        hit_rate[w.address] = (after.get("hit", 0) - before[w.address].get("hit", 0)) / queried if queried else None
    return {"ttft_p50_ms_by_turn": [1000 * statistics.median(turn) for turn in ttft],
            "prefix_hit_rate_by_worker": hit_rate,
            "later_turns_at_first_turns_worker": sum(w.count(w[0]) - 1 for w in workers),
            "later_turns": sum(len(w) - 1 for w in workers)}


def steady_load(url: str, total: int, clients: int, max_tokens: int) -> dict:
    def one(i: int) -> tuple[str, float]:
        started = time.perf_counter()
        response = requests.post(url + "/v1/chat", json={"text": f"你好，介绍一下你自己 {i} {uuid.uuid4()}",
                                                         "max_tokens": max_tokens, "temperature": 0}, timeout=600)
        response.raise_for_status()
        return served_by(response.headers), time.perf_counter() - started

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(one, range(total)))
    seconds = sorted(s for _, s in answers)
    return {"share_by_worker": {w: n / total for w, n in Counter(w for w, _ in answers).items()},
            "p50_ms": 1000 * seconds[len(seconds) // 2], "p95_ms": 1000 * seconds[int(0.95 * (len(seconds) - 1))],
            "requests_per_s": total / (time.perf_counter() - started)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(REPO / "models" / "qwen2.5-0.5b-shape"))
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per conversation reply")
    parser.add_argument("--delay-ms", type=float, default=250, help="the slow worker's sleep after every step "
                                                                   "(about one 16-row decode step of this model here)")
    parser.add_argument("--requests", type=int, default=64, help="chats per strategy under steady load")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    texts = review_texts(6 * TURNS * CONVERSATIONS)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "model": Path(args.model).name,
              "max_tokens": args.max_tokens, "worker_env": WORKER_ENV}

    pair = [GunicornServer(args.model, **WORKER_ENV) for _ in range(2)]
    try:
        for w in pair:
            w.wait_ready(900)
        proxy = NginxServer([w.address for w in pair], QAIO_MODEL=args.model, **UNLIMITED)
        try:
            half = 3 * TURNS * CONVERSATIONS
            report["with_affinity"] = affinity_phase(proxy, pair, texts[:half], args.max_tokens,
                                                     name=f"bench-{uuid.uuid4().hex[:8]}")
            report["without_affinity"] = affinity_phase(proxy, pair, texts[half:], args.max_tokens, name=None)
        finally:
            proxy.stop()
    finally:
        for w in pair:
            w.stop()

    fast = GunicornServer(args.model, **WORKER_ENV)
    slow = GunicornServer(args.model, QAIO_STEP_DELAY_MS=str(args.delay_ms), **WORKER_ENV)
    report["slow_worker"] = {"delay_ms": args.delay_ms, "clients": args.clients, "requests": args.requests,
                             "max_tokens": 16, "fast": fast.address, "slow": slow.address}
    try:
        fast.wait_ready(900), slow.wait_ready(900)
        for strategy in ("least_conn", "round_robin", "least_conn"):  # least_conn twice: before and after
            proxy = NginxServer([fast.address, slow.address], QAIO_MODEL=args.model, QAIO_NGINX_STRATEGY=strategy,
                                **UNLIMITED)
            try:
                result = steady_load(proxy.url, args.requests, args.clients, 16)
            finally:
                proxy.stop()
            report["slow_worker"].setdefault(strategy, []).append(result)
    finally:
        fast.stop(), slow.stop()
    write(args.out, report)
    return 0


def write(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Routing: conversation affinity and a slow worker", "",
             f"`make routing-bench`, {report['date']}, {report['machine']['cpu']} ({report['machine']['cores']} cores), "
             f"model `{report['model']}` (random weights, the real tokenizer), nginx in front of two workers "
             f"({', '.join(f'{k}={v}' for k, v in report['worker_env'].items())}).", "",
             f"## Conversations: {CONVERSATIONS} at once, {TURNS} turns, {THINK_S:.0f} s between turns on "
             f"average, greedy, {report['max_tokens']} tokens per reply",
             "", "| routing | TTFT p50 by turn, ms | turn 5 / turn 1 | prefix hit rate by worker | later turns on turn 1's worker |",
             "|---|---|---|---|---|"]
    for key, title in (("with_affinity", "X-Conversation-Id (affinity)"), ("without_affinity", "no key (least_conn)")):
        run = report[key]
        ttft = run["ttft_p50_ms_by_turn"]
        rates = ", ".join(f"{rate:.2f}" if rate is not None else "-" for rate in run["prefix_hit_rate_by_worker"].values())
        turns = f"{run['later_turns_at_first_turns_worker']} of {run['later_turns']}"
        lines.append(f"| {title} | {' → '.join(f'{t:.0f}' for t in ttft)} | {ttft[-1] / ttft[0]:.2f} | {rates} | {turns} |")
    slow = report["slow_worker"]
    lines += ["", f"## A slow worker: it sleeps {slow['delay_ms']:.0f} ms after every engine step", "",
              f"{slow['clients']} clients, each sending its next chat ({slow['max_tokens']} tokens, greedy) when its "
              f"last is answered, {slow['requests']} chats per run; the runs in the order listed, same workers.", "",
              "| strategy | slow worker's share | fast worker's share | p50 ms | p95 ms | requests/s |",
              "|---|---|---|---|---|---|"]
    for strategy in ("least_conn", "round_robin"):
        for run in slow[strategy]:
            share = run["share_by_worker"]
            lines.append(f"| {strategy} | {share.get(slow['slow'], 0):.2f} | {share.get(slow['fast'], 0):.2f} | "
                         f"{run['p50_ms']:.0f} | {run['p95_ms']:.0f} | {run['requests_per_s']:.2f} |")
    (out / "routing.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
