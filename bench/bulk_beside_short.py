"""`make bulk-bench`: short sentiment requests beside a bulk one. One worker straight on the stand-in
(SmolLM2-135M, real weights), per source tree (this one, and with `--before` another checkout, run the
same way in the same sitting): a client sends one bulk request of 64 long texts (as long as the body
limit allows: 330 characters each), and once the worker holds them, another sends 8 one-line
sentiment requests at once. Reports each short request's status and latency, and the bulk request's
with what became of its texts (scored, or the error each answered).

Writes docs/bulk-beside-short.md and .json.

    git worktree add /tmp/before <commit> && python -m bench.bulk_beside_short --before /tmp/before
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import requests

from qaio_testing import REPO, GunicornServer, eventually

from .run import machine
from .trees import measure_trees, tree_conf, tree_env
from .texts import review_texts

BULK_TEXTS = 64
TEXT_CHARS = 330  # 64 of these (waimai reviews joined, UTF-8) stay under the 64 KiB body limit
SHORTS = 8


def long_texts(texts: list[str]) -> list[str]:
    joined = "，".join(texts)
    joined *= -(-BULK_TEXTS * TEXT_CHARS // len(joined))
    return [joined[i * TEXT_CHARS:(i + 1) * TEXT_CHARS] for i in range(BULK_TEXTS)]


def timed_post(url: str, body: dict, outcomes: dict | None = None) -> tuple[int, float]:
    """UTF-8 as browsers send it (requests' json= escapes every Chinese character to 6 bytes). With
    `outcomes`, a bulk answer's texts are counted into it: `scored`, or their error code."""
    started = time.perf_counter()
    response = requests.post(url + "/v1/sentiment", data=json.dumps(body, ensure_ascii=False).encode(),
                             headers={"Content-Type": "application/json"}, timeout=600)
    seconds = time.perf_counter() - started
    if outcomes is not None and response.status_code == 200:
        for result in response.json().get("results", []):
            outcome = "scored" if "sentiment" in result else result.get("error", {}).get("code", "?")
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return response.status_code, seconds


def measure(tree: str, model: str, texts: list[str]) -> dict:
    server = GunicornServer(model, conf=tree_conf(tree), **tree_env(tree)).wait_ready(900)
    try:
        timed_post(server.url, {"text": "预热"})
        bulk: dict = {}
        outcomes: dict[str, int] = {}
        worker = threading.Thread(target=lambda: bulk.update(zip(("status", "seconds"), timed_post(
            server.url, {"texts": long_texts(texts)}, outcomes))))
        worker.start()
        eventually(lambda: bulk or requests.get(server.url + "/readyz", timeout=30).json()["requests_held"] >= 8,
                   timeout=300, what="the bulk request held by the worker")
        if bulk:
            raise RuntimeError(f"the bulk request ended before the short ones were sent: {bulk}")
        shorts: list[tuple[int, float]] = [(0, 0.0)] * SHORTS

        def short(i: int) -> None:
            shorts[i] = timed_post(server.url, {"text": texts[200 + i][:30]})

        threads = [threading.Thread(target=short, args=(i,)) for i in range(SHORTS)]
        for thread in threads:
            thread.start()
        for thread in threads + [worker]:
            thread.join()
        seconds = [s for _, s in shorts]
        return {"short_statuses": [s for s, _ in shorts],
                "short_seconds": seconds, "short_p50_s": statistics.median(seconds), "short_max_s": max(seconds),
                "bulk_status": bulk.get("status"), "bulk_seconds": bulk.get("seconds"), "bulk_texts": outcomes}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(REPO / "models" / "smollm2-135m-instruct"))
    parser.add_argument("--before", help="another checkout of the project, measured the same way first")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    texts = review_texts(400)
    runs = measure_trees(args.before, lambda tree: measure(tree, args.model, texts))
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "model": Path(args.model).name, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bulk-beside-short.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Short requests beside a bulk one", "",
             f"`make bulk-bench`, {report['date']}, model `{report['model']}`, one worker straight, default "
             f"settings: one bulk sentiment request of {BULK_TEXTS} texts of {TEXT_CHARS} characters, and once "
             f"the worker holds it, {SHORTS} one-line sentiment requests from another client at once.", "",
             "| tree | short requests: statuses | p50 s | max s | bulk: status | s | its texts |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        statuses = ", ".join(f"{n} x {s}" for s, n in sorted({s: run["short_statuses"].count(s)
                                                               for s in run["short_statuses"]}.items()))
        lines.append(f"| {run['name']} ({run['commit']}) | {statuses} | {run['short_p50_s']:.2f} | "
                     f"{run['short_max_s']:.2f} | {run['bulk_status']} | {run['bulk_seconds']:.1f} | "
                     + ", ".join(f"{n} {outcome}" for outcome, n in sorted(run["bulk_texts"].items())) + " |")
    (args.out / "bulk-beside-short.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
