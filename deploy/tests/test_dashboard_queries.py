"""Every query of /dashboard and of the Grafana dashboard, evaluated by the real Prometheus that `make
run`'s stack (scripts/stack.sh) starts, scraping real workers and mtail reading nginx's log; and the
front door exposes nothing of Prometheus but its two query endpoints."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse

import pytest
import requests

from conftest import ADMIN_TOKEN
from qwen_worker.testing import REPO

sys.path.insert(0, str(REPO / "deploy"))
import grafana  # noqa: E402

QUERIES = json.loads((REPO / "nginx" / "html" / "dashboard-queries.json").read_text())
GRAFANA = json.loads((REPO / "deploy" / "grafana" / "qaio-dashboard.json").read_text())
PAGE_QUERIES = {q["expr"]: q for section in ("instance", "stack", "charts") for q in QUERIES[section]}
GPU_ONLY = {expr for expr, q in PAGE_QUERIES.items() if q.get("gpu")}


def query(stack, expr: str) -> list:
    """Through the front door, as the page asks."""
    response = requests.get(f"{stack.url}/prometheus/api/v1/query", params={"query": expr}, timeout=10)
    assert response.status_code == 200, (expr, response.text)
    return response.json()["data"]["result"]


@pytest.fixture(scope="module")
def traffic(local_stack):
    """Every kind of request, a cache hit, a 429-free rejection (drain), so every series exists."""
    url = local_stack.url
    with requests.Session() as s:
        # Two rounds a few scrapes apart: a rate needs a counter seen before and after it grew.
        for round_ in range(2):
            for i in range(6):
                text = f"味道不错 {i % 3} {round_}"
                assert s.post(url + "/v1/sentiment", json={"text": text}, timeout=60).status_code == 200
            assert s.post(url + "/v1/chat", json={"text": "hi", "max_tokens": 8}, timeout=60).status_code == 200
            assert s.post(url + "/v1/analyze", json={"text": "太慢了", "max_tokens": 8}, timeout=60).status_code == 200
            stream = s.post(url + "/v1/chat", json={"text": "hi", "max_tokens": 8, "stream": True}, timeout=60)
            assert stream.status_code == 200 and '"done": true' in stream.text
            time.sleep(3)
        worker = local_stack.worker_addresses[0]
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        assert s.post(f"{url}/admin/{worker}/drain", headers=auth, timeout=10).status_code == 200
        refused = s.post(f"http://{worker}/v1/sentiment", json={"text": "直接"}, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        assert s.post(f"{url}/admin/{worker}/undrain", headers=auth, timeout=10).status_code == 200
    time.sleep(3)  # a few scrapes (every second here)
    return local_stack


def test_the_grafana_dashboard_is_generated_from_the_page_queries():
    generated = subprocess.run([sys.executable, str(REPO / "deploy" / "grafana.py")], capture_output=True,
                               text=True, check=True).stdout
    assert json.loads(generated) == GRAFANA, "run: python deploy/grafana.py > deploy/grafana/qaio-dashboard.json"
    assert set(grafana.expressions(GRAFANA)) <= set(PAGE_QUERIES)
    assert set(grafana.expressions(GRAFANA)) >= set(PAGE_QUERIES) - {QUERIES["instance"][-1]["expr"]}  # all but info


@pytest.mark.parametrize("expr", sorted(set(PAGE_QUERIES) | set(grafana.expressions(GRAFANA))))
def test_every_query_returns_data(traffic, expr):
    deadline = time.monotonic() + 20
    while not (result := query(traffic, expr)) and time.monotonic() < deadline and expr not in GPU_ONLY:
        time.sleep(1)
    if expr in GPU_ONLY:  # no GPU here: valid PromQL (Prometheus answered 200), nothing to show
        assert result == []
        return
    assert result, f"no data for {expr}"
    if "by (instance" in expr and "exported_instance" not in expr:
        assert {r["metric"]["instance"] for r in result} <= set(traffic.worker_addresses)


def test_the_page_reads_what_it_needs(traffic):
    instance_rows = {r["metric"]["instance"] for r in query(traffic, PAGE_QUERIES[QUERIES["instance"][0]["expr"]]["expr"])}
    assert instance_rows == set(traffic.worker_addresses)
    cache = query(traffic, next(q["expr"] for q in QUERIES["stack"] if q["key"] == "cache"))
    assert 0 < float(cache[0]["value"][1]) < 100  # repeated texts hit, new ones missed
    end = time.time()
    for chart in QUERIES["charts"]:
        response = requests.get(f"{traffic.url}/prometheus/api/v1/query_range", timeout=10,
                                params={"query": chart["expr"], "start": end - 900, "end": end, "step": 15})
        assert response.status_code == 200 and response.json()["data"]["result"], chart["key"]


@pytest.mark.parametrize("method,path", [
    ("GET", "/prometheus/api/v1/labels"), ("GET", "/prometheus/api/v1/series?match[]=up"),
    ("GET", "/prometheus/api/v1/targets"), ("POST", "/prometheus/api/v1/admin/tsdb/delete_series?match[]=up"),
    ("POST", "/prometheus/-/reload"), ("POST", "/prometheus/-/quit"), ("GET", "/prometheus/graph"),
    ("POST", "/prometheus/api/v1/query?query=up"), ("PUT", "/prometheus/api/v1/query_range?query=up"),
])
def test_nothing_else_of_prometheus_is_reachable(local_stack, method, path):
    response = requests.request(method, local_stack.url + path, timeout=10)
    assert response.status_code in (404, 405) and response.json()["error"]["code"] in ("not_found", "method_not_allowed")
    assert requests.get(local_stack.prometheus_url + "/-/ready", timeout=5).status_code == 200  # still up


def test_admin_endpoints_need_the_token_and_a_known_worker(local_stack):
    worker = local_stack.worker_addresses[0]
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": ADMIN_TOKEN}):
        response = requests.post(f"{local_stack.url}/admin/{worker}/drain", headers=headers, timeout=10)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for target in ("127.0.0.1:22", "example.com:80", urllib.parse.quote("127.0.0.1:1/../x", safe="")):
        assert requests.post(f"{local_stack.url}/admin/{target}/drain", headers=auth, timeout=10).status_code == 404
    assert requests.post(f"{local_stack.url}/admin/drain", headers=auth, timeout=10).status_code == 404
    state = requests.get(f"{local_stack.url}/admin/{worker}/state", headers=auth, timeout=10)
    assert state.status_code == 200 and state.json()["status"] == "ready"
