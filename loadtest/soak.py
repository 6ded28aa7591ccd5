"""`make soak`: mixed traffic for a long time against a stack of its own, and each worker's memory over time.

Starts scripts/stack.sh (two workers on the 0.5b-shape demo model by default, nginx in front, its
Prometheus and mtail beside) in a directory and on ports of its own, sends closed-loop traffic from
--clients threads (70 % sentiment, 20 % chat, 10 % analyze, reviews of waimai_10k.csv, sampled chat so
the cache cannot answer it) for --minutes, samples every worker instance's resident memory (gunicorn
master + its processes, the engine process included) every --sample-s, and writes docs/soak.md, .json
and .png. The verdict: each worker's growth from the end of the warm-up to the end, against
--max-growth-mb (50).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import requests

from qaio_testing import REPO, LocalStack

from .run import worker_rss_mb

REVIEWS = REPO.parent / "shared" / "data" / "waimai_10k.csv"
WEIGHTS = (("sentiment", 70), ("chat", 20), ("analyze", 10))


def review_texts(limit: int = 5000) -> list[str]:
    lines = REVIEWS.read_text(encoding="utf-8").splitlines()[1:limit + 1]
    texts = (line.split(",", 1)[1].strip().strip('"').strip() for line in lines if "," in line)
    return [text for text in texts if text and text.isprintable()]  # a few carry control characters: 400


class Traffic:
    """Closed-loop clients; counts answers by task and status."""

    def __init__(self, url: str, clients: int, chat_tokens: int, texts: list[str], seed: int = 0):
        self.url = url
        self.clients = clients
        self.chat_tokens = chat_tokens
        self.texts = texts
        self.random = random.Random(seed)
        self.counts: Counter = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, i: int) -> None:
        rng = random.Random(i)
        tasks, weights = zip(*WEIGHTS)
        with requests.Session() as session:
            while not self._stop.is_set():
                task = rng.choices(tasks, weights)[0]
                text = rng.choice(self.texts)
                body = {"text": text} if task == "sentiment" else {"text": text, "max_tokens": self.chat_tokens}
                try:
                    status = session.post(f"{self.url}/v1/{task}", json=body, timeout=300).status_code
                except requests.RequestException:
                    status = "error"
                with self._lock:
                    self.counts[f"{task} {status}"] += 1

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=320)


def growth(samples: list[dict], warmup_s: float) -> dict[str, dict]:
    """Per worker: RSS when the warm-up ended, at the end, the growth between, and the peak."""
    after = [s for s in samples if s["t"] >= warmup_s] or samples[-1:]
    result = {}
    for name in samples[-1]["rss_mb"]:
        start, end = after[0]["rss_mb"].get(name, 0.0), after[-1]["rss_mb"].get(name, 0.0)
        result[name] = {"after_warmup_mb": start, "end_mb": end, "growth_mb": round(end - start, 1),
                        "peak_mb": max(s["rss_mb"].get(name, 0.0) for s in samples)}
    return result


def write_report(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limit = results["max_growth_mb"]
    lines = ["# Soak", "",
             f"Written by `make soak` on {results['date']}: {results['minutes']} minutes of closed-loop traffic from "
             f"{results['clients']} clients (70 % sentiment, 20 % chat of {results['chat_tokens']} sampled tokens, "
             f"10 % analyze; reviews of waimai_10k.csv) through nginx to {results['workers']} workers serving "
             f"{results['model']}. Resident memory of each worker instance (gunicorn master and its processes) "
             f"every {results['sample_s']} s; growth counted from the end of the {results['warmup_minutes']}-minute "
             f"warm-up. Worker settings beyond the defaults: {results['settings'] or 'none'}.", "",
             "| worker | RSS after warm-up (MB) | at the end (MB) | growth (MB) | peak (MB) | target ≤ "
             f"{limit} MB |", "| --- | --- | --- | --- | --- | --- |"]
    for name, g in results["growth"].items():
        lines.append(f"| {name} | {g['after_warmup_mb']:.0f} | {g['end_mb']:.0f} | {g['growth_mb']:+.0f} | "
                     f"{g['peak_mb']:.0f} | {'met' if g['growth_mb'] <= limit else 'MISSED'} |")
    answers = ", ".join(f"{k}: {v}" for k, v in sorted(results["answers"].items()))
    lines += ["", f"Answers: {answers}.", "", "![RSS per worker over time](soak.png)", "", "Raw samples: `soak.json`.", ""]
    (out / "soak.md").write_text("\n".join(lines), encoding="utf-8")
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in results["growth"]:
        ax.plot([s["t"] / 60 for s in results["samples"]], [s["rss_mb"].get(name) for s in results["samples"]],
                label=name)
    ax.axvline(results["warmup_minutes"], color="#999", linestyle=":", label="end of warm-up")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MB)")
    ax.set_title("Worker memory under mixed traffic")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("QAIO_SOAK_MINUTES", "30")))
    parser.add_argument("--warmup-minutes", type=float, default=1.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chat-tokens", type=int, default=32)
    parser.add_argument("--model", default=str(REPO / "models" / "qwen2.5-0.5b-shape"))
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--max-growth-mb", type=float, default=50.0)
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    settings = {k: v for k, v in os.environ.items() if k.startswith("QAIO_") and not k.startswith(("QAIO_SOAK",
                                                                                                    "QAIO_STACK"))}
    texts = review_texts()  # before the stack starts: a missing file must not leave its workers running
    stack = LocalStack(args.model, args.workers, prefix="qaio-soak-", QAIO_NGINX_SENTIMENT_RATE="10000r/s",
                       QAIO_NGINX_CHAT_RATE="10000r/s")
    url, run_dir = stack.url, stack.dir
    print(f"soak: {args.minutes} min against {url} ({args.workers} workers, {args.model})", flush=True)
    traffic = Traffic(url, args.clients, args.chat_tokens, texts)
    samples = []
    started = time.monotonic()
    try:
        traffic.start()
        while True:
            elapsed = time.monotonic() - started
            samples.append({"t": round(elapsed, 1), "rss_mb": worker_rss_mb(run_dir)})
            if elapsed >= args.minutes * 60:
                break
            time.sleep(min(args.sample_s, max(0.0, args.minutes * 60 - elapsed)))
    finally:
        traffic.stop()
        stack.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "minutes": args.minutes,
               "warmup_minutes": args.warmup_minutes, "clients": args.clients, "workers": args.workers,
               "chat_tokens": args.chat_tokens, "model": Path(args.model).name, "sample_s": args.sample_s,
               "max_growth_mb": args.max_growth_mb, "settings": settings, "answers": dict(traffic.counts),
               "samples": samples, "growth": growth(samples, args.warmup_minutes * 60)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    write_report(results, args.out)
    for name, g in results["growth"].items():
        print(f"{name}: {g['after_warmup_mb']:.0f} -> {g['end_mb']:.0f} MB ({g['growth_mb']:+.0f} MB)")
    print(f"wrote {args.out / 'soak.md'}")
    problems = verdict(results)
    for problem in problems:
        print(f"FAILED: {problem}")
    return 1 if problems else 0


def verdict(results: dict) -> list[str]:
    """What fails the soak: a worker whose memory grew past max_growth_mb after the warm-up, an answer
    other than 200, or no answers at all."""
    limit = results["max_growth_mb"]
    problems = [f"{name} grew {g['growth_mb']:+.1f} MB after the warm-up (limit {limit} MB)"
                for name, g in results["growth"].items() if g["growth_mb"] > limit]
    problems += [f"{count} answers {status}" for status, count in results["answers"].items() if not status.endswith(" 200")]
    if not results["answers"]:
        problems.append("no answers")
    return problems


if __name__ == "__main__":
    sys.exit(main())
