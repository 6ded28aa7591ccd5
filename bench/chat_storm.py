"""`make storm-bench`: 400 chats at once through the front door. Per source tree (this one, and with
`--before` another checkout, in the same sitting): two workers of the stand-in (SmolLM2-135M, real
weights) behind real nginx, its per-address limits lifted (the storm is many clients, one address
here); 16 chats warm them (so each worker has seen generations end), then 400 chats of up to 128
tokens start at once. Reports the statuses, how fast each kind came back, and the tokens delivered.
What the issue asks: only 200, 429 and 503, no 504: a chat the stack cannot start before its
deadline is refused at once, never held until it expires.

Writes docs/chat-storm.md and .json.

    git worktree add /tmp/before <commit> && python -m bench.chat_storm --before /tmp/before
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from qaio_testing import REPO, GunicornServer, NginxServer

from .run import machine
from .trees import measure_trees, tree_conf, tree_env

CHATS = 400
MAX_TOKENS = 128


def chat(url: str, i: int) -> tuple[int, float, int]:
    started = time.perf_counter()
    response = requests.post(url + "/v1/chat", json={"text": f"第{i}位顾客：讲讲你们店的招牌菜", "max_tokens": MAX_TOKENS},
                             timeout=600)
    tokens = response.json().get("usage", {}).get("completion_tokens", 0) if response.status_code == 200 else 0
    return response.status_code, time.perf_counter() - started, tokens


def measure(tree: str, model: str) -> dict:
    # Each worker its share of the cores, and its default HTTP threads (capacity + 32), as `make run`
    # starts them: every request nginx sends it is in its own queue, none waits for a thread.
    env = {"QAIO_TORCH_THREADS": "1", **tree_env(tree)}
    workers = [GunicornServer(model, conf=tree_conf(tree), **env) for _ in range(2)]
    proxy = None
    try:
        for worker in workers:
            worker.wait_ready(900)
        proxy = NginxServer([w.address for w in workers], QAIO_MODEL=model, QAIO_NGINX_CHAT_RATE="100000r/s",
                            QAIO_NGINX_CHAT_BURST="100000", QAIO_NGINX_CONN_PER_CLIENT="0")
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: chat(proxy.url, -i), range(16)))
        started = time.perf_counter()
        with ThreadPoolExecutor(CHATS) as pool:
            results = list(pool.map(lambda i: chat(proxy.url, i), range(CHATS)))
        seconds = time.perf_counter() - started
    finally:
        if proxy is not None:
            proxy.stop()
        for worker in workers:
            worker.stop()
    by_status = collections.defaultdict(list)
    for status, took, _ in results:
        by_status[status].append(took)
    return {"seconds": round(seconds, 1),
            "statuses": {str(s): len(t) for s, t in sorted(by_status.items())},
            "p50_s": {str(s): round(statistics.median(t), 2) for s, t in sorted(by_status.items())},
            "max_s": {str(s): round(max(t), 2) for s, t in sorted(by_status.items())},
            "tokens": sum(tokens for *_, tokens in results)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(REPO / "models" / "smollm2-135m-instruct"))
    parser.add_argument("--before", help="another checkout of the project, measured the same way first")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    runs = measure_trees(args.before, lambda tree: measure(tree, args.model))
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "model": Path(args.model).name, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chat-storm.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# 400 chats at once", "",
             f"`make storm-bench`, {report['date']}, model `{report['model']}`, two workers (one torch thread "
             f"each, default HTTP threads) behind nginx, default deadlines (chat 120 s), nginx's per-address limits lifted: 16 chats "
             f"warm the workers, then {CHATS} chats of up to {MAX_TOKENS} tokens start at once.", "",
             "| tree | statuses | p50 s by status | max s by status | tokens delivered | run s |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        statuses = ", ".join(f"{n} x {s}" for s, n in run["statuses"].items())
        p50 = ", ".join(f"{s}: {v}" for s, v in run["p50_s"].items())
        top = ", ".join(f"{s}: {v}" for s, v in run["max_s"].items())
        lines.append(f"| {run['name']} ({run['commit']}) | {statuses} | {p50} | {top} | {run['tokens']} | "
                     f"{run['seconds']} |")
    (args.out / "chat-storm.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
