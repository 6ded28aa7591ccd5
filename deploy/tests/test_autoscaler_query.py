"""The autoscaler's metric, end to end short of a cluster: a real Prometheus (Debian's) scrapes a
running worker with the labels a PodMonitor gives (namespace, pod), and the prometheus-adapter rules
we ship are rendered the way the adapter renders them and evaluated there."""
from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from qaio_testing import eventually, free_port

pytestmark = pytest.mark.tool

REPO = Path(__file__).resolve().parents[2]
ADAPTER_VALUES = REPO / "k8s" / "monitoring" / "prometheus-adapter-values.yaml"
NAMESPACE, POD = "qaio", "qaio-worker-7d9f8-abcde"


def adapter_rules() -> dict[str, dict]:
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return {rule["name"]["as"]: rule for rule in rules}


def render(template: str, series: str) -> str:
    """The adapter's Go template for a per-pod request: GET .../namespaces/qaio/pods/*/<metric>."""
    return (template.replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"{POD}"')
            .replace("<<.GroupBy>>", "pod"))


def series_name(rule: dict) -> str:
    return rule["name"]["matches"].strip("^$")


@pytest.fixture()
def prometheus(gunicorn_server, tmp_path):
    assert shutil.which("prometheus"), "Debian's prometheus is needed (scripts/install-system-deps.sh)"
    worker = gunicorn_server()
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": "qaio-worker",
            "static_configs": [{"targets": [worker.address]}],
            # What the PodMonitor's pod discovery attaches to every series.
            "relabel_configs": [{"target_label": "namespace", "replacement": NAMESPACE},
                                {"target_label": "pod", "replacement": POD}],
        }],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def scraping() -> bool:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            return query_ok(url, 'up{job="qaio-worker"} == 1')

        eventually(scraping, timeout=60, what="Prometheus scraping the worker", interval=0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def api(url: str, path: str, **params) -> dict:
    with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(params)}", timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def query_ok(url: str, promql: str) -> bool:
    try:
        return bool(api(url, "/api/v1/query", query=promql)["result"])
    except OSError:
        return False


def test_the_queue_depth_rule_selects_a_per_pod_series_prometheus_really_has(prometheus):
    rule = adapter_rules()["qaio_queue_depth"]
    series = api(prometheus, "/api/v1/series", **{"match[]": rule["seriesQuery"]})
    assert series, f"no series match the adapter's seriesQuery {rule['seriesQuery']}"
    assert all(s["namespace"] == NAMESPACE and s["pod"] == POD for s in series)
    # The rule averages over a window: it answers once a second sample is in.
    result = eventually(lambda: api(prometheus, "/api/v1/query", query=render(rule["metricsQuery"], series_name(rule)))[
        "result"], timeout=30, what="the queue-depth rule's first answer", interval=1)
    assert [r["metric"] for r in result] == [{"pod": POD}], result
    assert float(result[0]["value"][1]) == 0.0  # an idle worker: nothing waiting


def test_the_gpu_rule_is_valid_promql_for_dcgm_exporters_series(prometheus):
    # No GPU here, so no DCGM series: Prometheus must still accept both queries the adapter sends.
    rule = adapter_rules()["qaio_gpu_utilization_percent"]
    assert series_name(rule) == "DCGM_FI_DEV_GPU_UTIL"
    assert api(prometheus, "/api/v1/series", **{"match[]": rule["seriesQuery"]}) == []
    assert api(prometheus, "/api/v1/query", query=render(rule["metricsQuery"], series_name(rule)))["result"] == []


def test_the_hpa_metrics_are_the_ones_the_adapter_serves():
    names = set(adapter_rules())
    for path in ("base/worker-hpa.yaml", "overlays/queue-depth/hpa-queue-depth.yaml"):
        hpa = yaml.safe_load((REPO / "k8s" / path).read_text())
        assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} <= names
