"""Locust load test of the Qwen All-in-One stack: weighted tasks, named checks, thresholds that fail the run.

    locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8080 -u 8 -r 8 -t 60s
Environment: QAIO_REVIEWS (CSV of label,review), QAIO_TEXT_POOL (500), QAIO_CHAT_TOKENS (32),
QAIO_MAX_ERROR_RATE (0.01), QAIO_P95_SENTIMENT_MS (15000), QAIO_P95_CHAT_MS (120000), QAIO_API_KEY (a
stack with API keys: compose, Kubernetes).
"""
from __future__ import annotations

import csv
import os
import random
from pathlib import Path

from locust import HttpUser, events, task

REVIEWS = Path(os.environ.get("QAIO_REVIEWS", Path(__file__).resolve().parents[2] / "shared" / "data" / "waimai_10k.csv"))
POOL = int(os.environ.get("QAIO_TEXT_POOL", "500"))
CHAT_TOKENS = int(os.environ.get("QAIO_CHAT_TOKENS", "32"))
AUTH = {"Authorization": f"Bearer {os.environ['QAIO_API_KEY']}"} if os.environ.get("QAIO_API_KEY") else {}

with open(REVIEWS, encoding="utf-8") as fh:
    TEXTS = [row["review"] for row, _ in zip(csv.DictReader(fh), range(POOL)) if row["review"].strip()]


class StackUser(HttpUser):
    """One client sending its next request as soon as the last is answered (closed loop, like k6)."""

    def _post(self, task_name: str, path: str, body: dict, check) -> None:
        with self.client.post(path, json=body, headers=AUTH, name=task_name, catch_response=True,
                              timeout=180) as response:
            if response.status_code != 200:
                response.failure(f"{task_name}: status {response.status_code}")
            elif not check(response.json()):
                response.failure(f"{task_name}: unexpected body")

    @task(7)
    def sentiment(self):
        self._post("sentiment", "/v1/sentiment", {"text": random.choice(TEXTS)},
                   lambda body: body["sentiment"]["label"] in ("positive", "negative", "neutral"))

    @task(2)
    def chat(self):
        body = {"messages": [{"role": "user", "content": random.choice(TEXTS)}], "max_tokens": CHAT_TOKENS}
        self._post("chat", "/v1/chat", body, lambda reply: isinstance(reply.get("reply"), str))

    @task(1)
    def analyze(self):
        self._post("analyze", "/v1/analyze", {"text": random.choice(TEXTS), "max_tokens": CHAT_TOKENS},
                   lambda body: body["sentiment"]["label"] and isinstance(body.get("reply"), str))


@events.quitting.add_listener
def enforce_thresholds(environment, **_):
    """Fail the run (exit 1) on too many errors or a slow p95, like k6's thresholds."""
    stats = environment.stats
    limits = {"sentiment": float(os.environ.get("QAIO_P95_SENTIMENT_MS", "15000")),
              "chat": float(os.environ.get("QAIO_P95_CHAT_MS", "120000")),
              "analyze": float(os.environ.get("QAIO_P95_CHAT_MS", "120000"))}
    problems = []
    if stats.total.num_requests and stats.total.fail_ratio > float(os.environ.get("QAIO_MAX_ERROR_RATE", "0.01")):
        problems.append(f"error rate {stats.total.fail_ratio:.2%}")
    for name, limit in limits.items():
        entry = stats.get(name, "POST")
        if entry.num_requests and entry.get_response_time_percentile(0.95) > limit:
            problems.append(f"{name} p95 {entry.get_response_time_percentile(0.95):.0f} ms > {limit:.0f} ms")
    if problems:
        environment.process_exit_code = 1
        print("thresholds failed: " + "; ".join(problems))
