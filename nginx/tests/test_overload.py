"""The stack past its capacity, as a traffic spike from many clients: nginx in front of two real
workers, each client on its own loopback address (so per-address rate limits admit them all)."""
import http.client
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from qaio_testing import SHARED_CPU_WORKER_ENV, GunicornServer

CAPACITY = {"QAIO_MAX_BATCH_SIZE": "2", "QAIO_QUEUE_CAPACITY": "2"}  # 4 requests per worker
CLIENTS = 24  # 3x the stack's capacity of 8
REQUESTS_PER_CLIENT = 3


def post_from(address: str, port: int, path: str, body: dict) -> tuple[int, dict, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120, source_address=(address, 0))
    started = time.monotonic()
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status, dict(response.getheaders()), time.monotonic() - started
    finally:
        conn.close()


class ProbeWatch:
    """Polls every worker's /healthz, /readyz and /metrics while the storm runs; keeps the slowest."""

    def __init__(self, workers):
        self.workers = workers
        self.slowest = 0.0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self):
        while not self._stop.is_set():
            for worker in self.workers:
                for path in ("/healthz", "/readyz", "/metrics"):
                    started = time.monotonic()
                    try:
                        requests.get(worker.url + path, timeout=5)
                    except requests.RequestException as exc:
                        self.failures.append(f"{path}: {exc}")
                    self.slowest = max(self.slowest, time.monotonic() - started)
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_three_times_capacity_is_shed_fast_with_503_and_the_stack_recovers(gunicorn_server, nginx):
    workers = [gunicorn_server(**SHARED_CPU_WORKER_ENV, **CAPACITY) for _ in range(2)]
    proxy = nginx(workers, **CAPACITY, QAIO_NGINX_CHAT_RATE="100r/s")
    assert "max_conns=4 " in (Path(proxy.conf).parent / "conf.d" / "qaio.conf").read_text()

    def client(i: int):
        address = f"127.0.{1 + i // 200}.{2 + i % 200}"
        return [post_from(address, proxy.port, "/v1/chat", {"text": f"client {i} turn {turn}", "max_tokens": 48})
                for turn in range(REQUESTS_PER_CLIENT)]

    with ProbeWatch(workers) as probes, ThreadPoolExecutor(CLIENTS) as pool:
        results = [r for batch in pool.map(client, range(CLIENTS)) for r in batch]

    statuses = Counter(status for status, _, _ in results)
    assert set(statuses) <= {200, 429, 503}, statuses
    assert statuses[200] >= 8 and statuses[503] > 0, statuses
    assert all(headers.get("Retry-After") for status, headers, _ in results if status in (429, 503))
    shed = sorted(seconds for status, _, seconds in results if status == 503)
    assert shed[len(shed) // 2] < 1.0, f"median time to a 503: {shed[len(shed) // 2]:.2f} s"

    assert not probes.failures, probes.failures[:3]
    assert probes.slowest < 1.0, f"a probe or scrape took {probes.slowest:.2f} s during the storm"

    for worker in workers:  # nothing left behind: empty queues, free slots
        ready = requests.get(worker.url + "/readyz", timeout=5).json()
        assert ready["queue_depth"] == 0 and ready["status"] == "ready"

    # Retries are bounded: every request reached at most two workers (QAIO_NGINX_NEXT_UPSTREAM_TRIES).
    entries = proxy.log_entries('"/v1/chat"', count=len(results))
    attempts = [len([a for a in e["upstream"].split(",") if a.strip()]) for e in entries if e["upstream"]]
    assert len(entries) == len(results) and max(attempts) <= 2
    assert sum(attempts) <= 2 * len(results)


def test_while_no_worker_is_ready_nginx_answers_503_and_a_ready_worker_gets_traffic_at_once(nginx, tiny_model_dir):
    worker = GunicornServer(tiny_model_dir, **SHARED_CPU_WORKER_ENV)  # loading: not ready yet
    try:
        proxy = nginx([worker])
        early = requests.post(proxy.url + "/v1/sentiment", json={"text": "早"}, timeout=30)
        assert early.status_code == 503 and early.headers["Retry-After"]
        assert early.json()["error"]["code"] in ("not_ready", "no_worker_available")
        worker.wait_ready()
        # No fail_timeout to sit out: the first request after readiness is served.
        assert requests.post(proxy.url + "/v1/sentiment", json={"text": "好了"}, timeout=30).status_code == 200
    finally:
        worker.stop()
