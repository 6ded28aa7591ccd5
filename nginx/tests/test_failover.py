"""A worker killed under load: nginx retries on the other, no client sees a failure; it comes back."""
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import requests

from qaio_testing import SHARED_CPU_WORKER_ENV as WORKER_ENV, GunicornServer
from qaio_testing import eventually, served_by


def test_kill_9_under_load_loses_no_request_and_the_worker_returns(gunicorn_server, nginx, tiny_model_dir):
    """Every request is answered 200 but one the killed worker was writing at the instant it died: nginx
    had passed its headers on and cannot retry it (README: Failover), so at most one per client, served
    by the killed worker, at the kill."""
    first, second = gunicorn_server(**WORKER_ENV), gunicorn_server(**WORKER_ENV)
    proxy = nginx([first, second], QAIO_NGINX_FAIL_TIMEOUT="2s", QAIO_NGINX_SENTIMENT_RATE="1000r/s")
    stop = threading.Event()
    results = []

    def client(n):
        i = 0
        while not stop.is_set():
            i += 1
            response = requests.post(proxy.url + "/v1/sentiment", json={"text": f"客户{n} 第{i}条"}, timeout=60,
                                     stream=True)
            try:
                response.content
            except requests.exceptions.ChunkedEncodingError:  # cut mid-body: its worker died writing it
                results.append(("cut", served_by(response.headers)))
                continue
            results.append((response.status_code, served_by(response.headers) if response.ok else response.text))

    with ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(client, n) for n in range(4)]
        eventually(lambda: len(results) >= 12, what="load running on both workers")
        first.kill()
        killed_at = len(results)
        eventually(lambda: len(results) - killed_at > 24, 60, "load going on after the kill")
        stop.set()
    for finished in clients:
        finished.result()  # a client that raised (timeout, reset) is a failed request too
    cut = [i for i, r in enumerate(results) if r[0] == "cut"]
    assert len(cut) <= 4 and all(results[i][1] == first.address and abs(i - killed_at) <= 4 for i in cut), cut
    failures = [r for r in results if r[0] not in (200, "cut")]
    assert not failures, failures[:5]
    assert all(r[1] == second.address for r in results[killed_at + 8:])

    revived = GunicornServer(tiny_model_dir, port=first.port, **WORKER_ENV).wait_ready()
    try:
        time.sleep(2.5)  # past fail_timeout: nginx tries the server again
        counts = Counter(served_by(requests.post(proxy.url + "/v1/sentiment", json={"text": f"回来了 {i}"},
                                                 timeout=60).headers) for i in range(20))
        assert counts[first.address] > 0, counts
    finally:
        revived.stop()
