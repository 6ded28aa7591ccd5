"""Every query of /dashboard and of the Grafana dashboard, evaluated by the real Prometheus that `make
run`'s stack (scripts/stack.sh) starts, scraping real workers and mtail reading nginx's log; and the
front door runs those queries, by name, and nothing else on that Prometheus."""
from __future__ import annotations

import http.client
import json
import itertools
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import ADMIN_TOKEN
from qaio_testing import REPO, eventually

sys.path.insert(0, str(REPO / "deploy"))
import dashboard_nginx  # noqa: E402
import grafana  # noqa: E402

QUERIES = json.loads((REPO / "nginx" / "html" / "dashboard-queries.json").read_text())
GRAFANA = json.loads((REPO / "deploy" / "grafana" / "qaio-dashboard.json").read_text())
SECTIONS = ("instance", "stack", "keys", "charts")
NAMES = {f"{section}.{q['key']}": q for section in SECTIONS for q in QUERIES[section]}
GPU_ONLY = {name for name, q in NAMES.items() if q.get("gpu")}


def patience(expr: str) -> float:
    """Seconds to wait for a query's first data: the SLO period's rules are evaluated once a minute."""
    return 90 if "qaio:slo_" in expr else 20


def query(stack, name: str) -> list:
    """Through the front door, as the page asks: by name."""
    response = requests.get(f"{stack.url}/prometheus/api/v1/query", params={"name": name}, timeout=10)
    assert response.status_code == 200, (name, response.text)
    return response.json()["data"]["result"]


def direct(stack, expr: str) -> list:
    """Straight from Prometheus (as Grafana asks)."""
    response = requests.get(f"{stack.prometheus_url}/api/v1/query", params={"query": expr}, timeout=10)
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
            # What the front door sends with API keys on (this stack has them off): the key's name.
            keyed = s.post(f"http://{local_stack.worker_addresses[0]}/v1/chat", json={"text": "hi", "max_tokens": 4},
                           headers={"X-Qaio-Key": "dashboard-key"}, timeout=60)
            assert keyed.status_code == 200
            time.sleep(3)
        worker = local_stack.worker_addresses[0]
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        assert s.post(f"{url}/admin/{worker}/drain", headers=auth, timeout=10).status_code == 200
        refused = s.post(f"http://{worker}/v1/sentiment", json={"text": "直接"}, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        assert s.post(f"{url}/admin/{worker}/undrain", headers=auth, timeout=10).status_code == 200
    # A trickle for as long as the module runs: the 30 s rates must not age out while a query waits for
    # the SLO rules' once-a-minute evaluation.
    stopping = threading.Event()

    def trickle():
        with requests.Session() as s:
            for i in itertools.count():
                if stopping.wait(0.5):
                    return
                s.post(url + "/v1/sentiment", json={"text": f"还行 {i} {time.time()}"}, timeout=60)
                if i % 4 == 0:
                    s.post(url + "/v1/chat", json={"text": "hi", "max_tokens": 4, "stream": i % 8 == 0}, timeout=60)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    yield local_stack
    stopping.set()
    thread.join(60)


def test_the_grafana_dashboard_is_generated_from_the_page_queries():
    generated = subprocess.run([sys.executable, str(REPO / "deploy" / "grafana.py")], capture_output=True,
                               text=True, check=True).stdout
    assert json.loads(generated) == GRAFANA, "run: python deploy/grafana.py > deploy/grafana/qaio-dashboard.json"
    page_exprs = {q["expr"] for q in NAMES.values()}
    assert set(grafana.expressions(GRAFANA)) <= page_exprs
    assert set(grafana.expressions(GRAFANA)) >= page_exprs - {QUERIES["instance"][-1]["expr"]}  # all but info


def test_the_front_doors_query_table_is_generated_from_the_page_queries():
    generated = subprocess.run([sys.executable, str(REPO / "deploy" / "dashboard_nginx.py")], capture_output=True,
                               text=True, check=True).stdout
    table = REPO / "nginx" / "templates" / "qaio-dashboard-queries.inc.template"
    assert generated == table.read_text(), f"run: python deploy/dashboard_nginx.py > {table.relative_to(REPO)}"
    assert set(dashboard_nginx.named(QUERIES)) == set(NAMES)


@pytest.mark.parametrize("name", sorted(NAMES))
def test_every_query_returns_data(traffic, name):
    if name in GPU_ONLY:  # no GPU here: valid PromQL (Prometheus answered 200), nothing to show
        assert query(traffic, name) == []
        return
    result = eventually(lambda: query(traffic, name), timeout=patience(NAMES[name]["expr"]), what=f"data for {name}",
                        interval=1)
    expr = NAMES[name]["expr"]
    if "by (instance" in expr and "exported_instance" not in expr:
        assert {r["metric"]["instance"] for r in result} <= set(traffic.worker_addresses)


@pytest.mark.parametrize("expr", sorted(set(grafana.expressions(GRAFANA))))
def test_every_grafana_query_returns_data_from_prometheus(traffic, expr):
    if any(q["expr"] == expr and q.get("gpu") for q in NAMES.values()):
        assert direct(traffic, expr) == []
        return
    eventually(lambda: direct(traffic, expr), timeout=patience(expr), what=f"data for {expr}", interval=1)


def sentiment_counted(stack) -> dict:
    """The front door's sentiment requests by cache result and status (a failed assertion's message)."""
    return {(r["metric"].get("cache"), r["metric"].get("status")): r["value"][1]
            for r in direct(stack, 'qaio_nginx_requests_total{route="/v1/sentiment"}')}


def test_the_page_reads_what_it_needs(traffic):
    instance_rows = {r["metric"]["instance"] for r in query(traffic, "instance.up")}
    assert instance_rows == set(traffic.worker_addresses)
    assert {r["metric"].get("key", "") for r in query(traffic, "keys.rps")} == {""}  # keys off: no name
    used = query(traffic, "keys.completion_tokens")
    assert [r["metric"]["key"] for r in used] == ["dashboard-key"] and float(used[0]["value"][1]) > 0
    cache = query(traffic, "stack.cache")
    assert 0 < float(cache[0]["value"][1]) < 100, sentiment_counted(traffic)  # repeated texts hit, new ones missed
    # No 5xx reached a client (the drained worker's 503 was asked directly): the whole budget is left.
    budget = eventually(lambda: query(traffic, "stack.budget"), timeout=patience("qaio:slo_"),
                        what="the error budget recorded", interval=1)
    assert float(budget[0]["value"][1]) == 100
    assert float(query(traffic, "stack.availability")[0]["value"][1]) == 100
    now = time.time()
    for chart in QUERIES["charts"]:
        series = query(traffic, f"charts.{chart['key']}")
        assert series, chart["key"]
        times = [float(t) for s in series for t, _ in s["values"]]
        # The chart's window and step, fixed by the front door: at most range/step + 1 samples per series.
        assert now - QUERIES["chart_range_s"] - 30 <= min(times) and max(times) <= now + 30
        assert all(len(s["values"]) <= QUERIES["chart_range_s"] // QUERIES["chart_step_s"] + 1 for s in series)


@pytest.mark.parametrize("params", [
    {"query": 'group by (__name__) ({__name__=~".+"})'},
    {"query": "up"},
    {"name": "nope"},
    {"name": ""},
    {},
    {"name": "charts.rps[1y:1s]"},
], ids=["every series", "free-form", "unknown name", "empty name", "no name", "a name with a range"])
def test_a_query_that_is_not_the_dashboards_is_refused(local_stack, params):
    response = requests.get(local_stack.url + "/prometheus/api/v1/query", params=params, timeout=10)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_nothing_the_client_adds_reaches_prometheus(traffic):
    """A name picks the query; a `query`, a `time` or anything else beside it is not passed on."""
    extra = {"name": "instance.up", "query": 'group by (__name__) ({__name__=~".+"})', "time": "0"}
    response = requests.get(traffic.url + "/prometheus/api/v1/query", params=extra, timeout=10)
    assert response.status_code == 200
    result = response.json()["data"]["result"]
    assert result and all("instance" in r["metric"] and "__name__" not in r["metric"] for r in result)
    assert all(float(r["value"][0]) > time.time() - 60 for r in result)  # at now, not at time=0


@pytest.mark.parametrize("method,path", [
    ("GET", "/prometheus/api/v1/labels"), ("GET", "/prometheus/api/v1/series?match[]=up"),
    ("GET", "/prometheus/api/v1/query_range?query=up&start=0&end=9999999999&step=1"),
    ("GET", "/prometheus/api/v1/targets"), ("POST", "/prometheus/api/v1/admin/tsdb/delete_series?match[]=up"),
    ("POST", "/prometheus/-/reload"), ("POST", "/prometheus/-/quit"), ("GET", "/prometheus/graph"),
    ("POST", "/prometheus/api/v1/query?name=instance.up"), ("PUT", "/prometheus/api/v1/query_range?query=up"),
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


def test_a_token_differing_only_in_case_is_refused(local_stack):
    """nginx compares the token exactly (its map strings compare case-insensitively): refused at the front
    door, never passed on to the worker; the scheme's case does not matter, as for the worker."""
    worker = local_stack.worker_addresses[0]
    for token in (ADMIN_TOKEN.upper(), ADMIN_TOKEN.swapcase(), ADMIN_TOKEN + "x", ADMIN_TOKEN[:-1]):
        response = requests.get(f"{local_stack.url}/admin/{worker}/state", headers={"Authorization": f"Bearer {token}"},
                                timeout=10)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
        assert not response.headers.get("X-Served-By")  # no worker was asked
    state = requests.get(f"{local_stack.url}/admin/{worker}/state", headers={"Authorization": f"bearer {ADMIN_TOKEN}"},
                         timeout=10)
    assert state.status_code == 200 and state.headers["X-Served-By"] == worker


def test_wrong_admin_tokens_are_rate_limited(local_stack):
    """Guessing costs time: past the burst every try is a 429, wrong tokens included (from an address of
    its own, so the other tests' admin calls keep their budget)."""
    worker = local_stack.worker_addresses[1]
    port = int(local_stack.url.rsplit(":", 1)[1])
    statuses = []
    for i in range(30):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=("127.0.0.9", 0))
        conn.request("GET", f"/admin/{worker}/state", headers={"Authorization": f"Bearer guess-{i:04d}-0123456789"})
        response = conn.getresponse()
        response.read()
        statuses.append(response.status)
        conn.close()
    assert set(statuses) == {404, 429} and statuses.count(429) >= 5, statuses
    assert statuses[-1] == 429


def test_the_front_doors_counters_count_every_request_of_bursts(local_stack):
    """mtail counts each of nginx's log lines as they arrive, however fast (one before 3.0.5 read one
    datagram per 250 ms poll: past 4 requests/s its counts fell behind, then lost what the socket could
    not hold). Each burst fits the kernel's default receive queue (256 such datagrams): a longer one is
    lost in part whenever mtail is descheduled for its length, as docs/front-door.md says, which a loaded
    machine does."""
    mtail = f"http://127.0.0.1:{local_stack.env['QAIO_STACK_MTAIL_PORT']}/metrics"

    def counted() -> float:
        families = text_string_to_metric_families(requests.get(mtail, timeout=10).text)
        return sum(sample.value for family in families if family.name == "qaio_nginx_requests"
                   for sample in family.samples if sample.labels.get("route") == "/v1/models")

    before, burst, bursts = counted(), 200, 3
    deadline = time.monotonic() + 60  # the old mtail needed 50 s for each burst
    # From an address of its own, so that the rate limit it runs into is nobody else's; answered or
    # refused (429 past the limit), each request is one log line, counted.
    conn = http.client.HTTPConnection("127.0.0.1", int(local_stack.url.rsplit(":", 1)[1]), timeout=10,
                                      source_address=("127.0.0.8", 0))
    statuses = set()
    for sent in range(burst, burst * bursts + 1, burst):
        for _ in range(burst):
            conn.request("GET", "/v1/models")
            response = conn.getresponse()
            response.read()
            statuses.add(response.status)
        eventually(lambda: counted() - before >= sent, timeout=max(deadline - time.monotonic(), 0.1),
                   what=f"{sent} requests counted")
    conn.close()
    assert statuses <= {200, 429}, statuses
    assert counted() - before == burst * bursts
