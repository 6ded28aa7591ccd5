"""The alerts on `make run`'s own stack: a worker stops, and its Prometheus (which loads the rendered
rules) turns QaioInstanceDown firing for it, and for nothing else."""
from __future__ import annotations

import os
import signal

import pytest
import requests

from qaio_testing import SHARED_CPU_WORKER_ENV, LocalStack, eventually

pytestmark = pytest.mark.stack


def alerts(stack) -> list[dict]:
    response = requests.get(f"{stack.prometheus_url}/api/v1/alerts", timeout=10)
    response.raise_for_status()
    return response.json()["data"]["alerts"]


def test_a_stopped_worker_fires_instance_down(tiny_model_dir):
    stack = LocalStack(tiny_model_dir, prefix="qaio-alerts-", QAIO_STACK_SCRAPE_INTERVAL="1s", **SHARED_CPU_WORKER_ENV)
    try:
        rules = requests.get(f"{stack.prometheus_url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        assert {"qaio-sli", "qaio-slo-budget", "qaio-slo-alerts", "qaio-cause-alerts"} <= {g["name"] for g in rules}
        stopped = stack.worker_addresses[1]
        eventually(lambda: requests.get(f"{stack.prometheus_url}/api/v1/query", params={
            "query": f'up{{job="qaio-worker",instance="{stopped}"}} == 1'}, timeout=10).json()["data"]["result"],
            120, "the worker's first scrape", interval=1)
        pid = int((stack.dir / "worker-1.pid").read_text())
        os.killpg(pid, signal.SIGKILL)  # as a crashed process: no drain, no goodbye

        # A scrape that times out on a loaded machine can make an alert pending for a while: only
        # firing ones count, and QaioInstanceDown waits its 1 m `for` before it fires.
        def firing():
            return [a for a in alerts(stack) if a["state"] == "firing"]
        fired = eventually(lambda: [a for a in firing() if a["labels"]["alertname"] == "QaioInstanceDown"], 240,
                           "QaioInstanceDown to fire", interval=1)
        assert [a["labels"]["instance"] for a in fired] == [stopped]
        assert fired[0]["labels"]["severity"] == "ticket" and fired[0]["annotations"]["runbook"]
        assert not [a for a in firing() if a["labels"]["alertname"] == "QaioNoInstance"]  # the other is up
    finally:
        stack.stop()
