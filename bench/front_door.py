"""Latency nginx adds in front of a worker, and the latency of a cache hit, measured in one run.

The same sequence of sentiment requests (distinct texts, so every one reaches the model) goes to a
worker directly and through nginx, interleaved so that drift on a shared machine hits both alike.
"""
from __future__ import annotations

import requests

from qaio_testing import GunicornServer, NginxServer

from .stats import summary_ms, timed


def measure(model: str, requests_per_path: int = 200) -> dict:
    worker = GunicornServer(model, QAIO_BATCH_WAIT_MS="0").wait_ready()
    proxy = NginxServer([worker.address], QAIO_NGINX_SENTIMENT_RATE="10000r/s", QAIO_NGINX_SENTIMENT_BURST="1000",
                        QAIO_MODEL=model)
    direct, through, hits = [], [], []
    try:
        with requests.Session() as session:
            def post(url, text):
                response = session.post(url + "/v1/sentiment", json={"text": text}, timeout=60)
                response.raise_for_status()
                return response

            for i in range(20):  # warm both paths and their keepalive connections
                post(worker.url, f"预热 {i}")
                post(proxy.url, f"预热 {i}")
            for i in range(requests_per_path):
                direct.append(timed(lambda: post(worker.url, f"直连 第{i}条评论")))
                through.append(timed(lambda: post(proxy.url, f"经过 nginx 第{i}条评论")))
            post(proxy.url, "缓存命中的评论")
            for _ in range(requests_per_path):
                hits.append(timed(lambda: post(proxy.url, "缓存命中的评论")))
    finally:
        proxy.stop()
        worker.stop()
    result = {"direct": summary_ms(direct), "nginx": summary_ms(through), "cache_hit": summary_ms(hits)}
    result["added_p50_ms"] = result["nginx"]["p50"] - result["direct"]["p50"]
    return result


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(measure(sys.argv[1] if len(sys.argv) > 1 else "models/tiny"), indent=2))
