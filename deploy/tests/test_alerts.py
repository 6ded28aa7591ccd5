"""The objectives' rules with the real promtool: they load, they are the renderer's output, and every
alert fires on a history that must fire it and stays quiet on one that must not (`promtool test rules`)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
import yaml

from qaio_testing import REPO

sys.path.insert(0, str(REPO / "deploy" / "alerts"))
import render  # noqa: E402
import slo  # noqa: E402

pytestmark = pytest.mark.tool

PROMTOOL = shutil.which("promtool") or "promtool (Debian's prometheus: scripts/install-system-deps.sh installs it)"
RULES = yaml.safe_load(render.RULES.read_text())
ALERTS = {r["alert"]: r for g in RULES["groups"] for r in g["rules"] if "alert" in r}
W = 'job="qaio-worker",instance="w0:8001"'
NGINX = 'job="qaio-nginx-log",route="/v1/sentiment",cache=""'


def burn(name, severity, rate, long, short, **labels):
    return {"severity": severity, "long_window": long, "short_window": short, "burn_rate": str(rate), **labels}


def cause(**labels):
    return {"instance": "w0:8001", **labels}


# (case id, alert, interval, input series {series: values}, eval time, expected alerts' labels less severity)
CASES = [
    ("no-instance fires", "QaioNoInstance", "15s", {f"up{{{W}}}": "0x20"}, "3m", [{}]),
    ("no-instance quiet while one is up", "QaioNoInstance", "15s",
     {f"up{{{W}}}": "0x20", 'up{job="qaio-worker",instance="w1:8001"}': "1x20"}, "3m", []),
    ("instance-down fires", "QaioInstanceDown", "15s", {f"up{{{W}}}": "1 1 0x20"}, "3m", [cause(job="qaio-worker")]),
    ("instance-down quiet on one missed scrape", "QaioInstanceDown", "15s", {f"up{{{W}}}": "1 1 0 1x20"}, "3m", []),
    ("not-ready fires", "QaioInstanceNotReady", "1m", {f"qaio_ready{{{W},pid=\"7\"}}": "0x20"}, "10m", [cause()]),
    ("not-ready quiet while a model loads", "QaioInstanceNotReady", "1m",
     {f"qaio_ready{{{W},pid=\"7\"}}": "0 0 0 1x20"}, "10m", []),
    ("rejecting fires", "QaioRejecting", "1m",
     {f'qaio_rejections_total{{{W},reason="queue_full"}}': "0+10x30",
      f'qaio_request_duration_seconds_count{{{W},task="sentiment",code="200"}}': "0+100x30"}, "25m", [cause()]),
    ("rejecting quiet on drains", "QaioRejecting", "1m",
     {f'qaio_rejections_total{{{W},reason="draining"}}': "0+10x30",
      f'qaio_request_duration_seconds_count{{{W},task="sentiment",code="200"}}': "0+100x30"}, "25m", []),
    ("queue-saturated fires", "QaioQueueSaturated", "1m",
     {f"qaio_queue_depth{{{W}}}": "20x20", f"qaio_slots{{{W}}}": "8x20"}, "10m", [cause()]),
    ("queue-saturated quiet within the slots", "QaioQueueSaturated", "1m",
     {f"qaio_queue_depth{{{W}}}": "5x20", f"qaio_slots{{{W}}}": "8x20"}, "10m", []),
    ("device-error fires", "QaioDeviceError", "1m",
     {f'qaio_model_failures_total{{{W},reason="device_error"}}': "0 0 1x10"}, "5m", [cause()]),
    ("device-error quiet on a model error", "QaioDeviceError", "1m",
     {f'qaio_model_failures_total{{{W},reason="model_error"}}': "0 0 1x10",
      f'qaio_model_failures_total{{{W},reason="device_error"}}': "0x12"}, "5m", []),
    ("out-of-memory fires", "QaioOutOfMemory", "1m",
     {f'qaio_model_failures_total{{{W},reason="out_of_memory"}}': "0 0 2x10"}, "5m", [cause()]),
    ("out-of-memory quiet when it passed", "QaioOutOfMemory", "1m",
     {f'qaio_model_failures_total{{{W},reason="out_of_memory"}}': "0 0 2x40"}, "40m", []),
    ("gpu-memory fires", "QaioGpuMemoryNearFull", "1m",
     {f'qaio_gpu_memory_used_bytes{{{W},gpu="0"}}': "97x20", f'qaio_gpu_memory_total_bytes{{{W},gpu="0"}}': "100x20"},
     "15m", [cause()]),
    ("gpu-memory quiet at 80 %", "QaioGpuMemoryNearFull", "1m",
     {f'qaio_gpu_memory_used_bytes{{{W},gpu="0"}}': "80x20", f'qaio_gpu_memory_total_bytes{{{W},gpu="0"}}': "100x20"},
     "15m", []),
    # 4 MiB a minute is 240 MiB an hour; 0.1 MiB a minute (6 MiB an hour) is a cache warming up.
    ("heap-growing fires", "QaioHeapGrowing", "1m",
     {f'qaio_heap_bytes{{{W},kind="in_use",pid="7"}}': f"100000000+{4 * 2**20}x240"}, "200m", [cause()]),
    ("heap-growing quiet on slow growth", "QaioHeapGrowing", "1m",
     {f'qaio_heap_bytes{{{W},kind="in_use",pid="7"}}': f"100000000+{2**20 // 10}x240"}, "200m", []),
    # 3 % errors: 14.4x the 0.1 % budget pages within minutes (the 6x pair waits 15 m, the tickets longer).
    ("availability fast burn pages", "QaioAvailabilityBudgetBurn", "1m",
     {f'qaio_nginx_requests_total{{{NGINX},status="200"}}': "0+100x20",
      f'qaio_nginx_requests_total{{{NGINX},status="500"}}': "0+3x20"}, "10m", [burn("", "page", 14.4, "1h", "5m")]),
    # 0.2 %: twice the budget: only the 1x ticket pair, after its 3 h.
    ("availability slow burn opens a ticket", "QaioAvailabilityBudgetBurn", "1m",
     {f'qaio_nginx_requests_total{{{NGINX},status="200"}}': "0+1000x260",
      f'qaio_nginx_requests_total{{{NGINX},status="503"}}': "0+2x260"}, "250m", [burn("", "ticket", 1, "3d", "6h")]),
    ("availability quiet: 429s are no errors", "QaioAvailabilityBudgetBurn", "1m",
     {f'qaio_nginx_requests_total{{{NGINX},status="200"}}': "0+100x20",
      f'qaio_nginx_requests_total{{{NGINX},status="429"}}': "0+50x20"}, "10m", []),
    # Six quiet hours, then three minutes of 10 % errors: under every pair's long window's rate.
    ("availability quiet after a short spike", "QaioAvailabilityBudgetBurn", "1m",
     {f'qaio_nginx_requests_total{{{NGINX},status="200"}}': "0+100x400",
      f'qaio_nginx_requests_total{{{NGINX},status="500"}}': "0x360 0+10x3 30x37"}, "385m", []),
    ("latency fast burn pages per task", "QaioLatencyBudgetBurn", "1m",
     {f'qaio_request_duration_seconds_bucket{{{W},task="sentiment",code="200",le="0.8"}}': "0+20x20",
      f'qaio_request_duration_seconds_count{{{W},task="sentiment",code="200"}}': "0+100x20"}, "10m",
     [burn("", "page", 14.4, "1h", "5m", task="sentiment")]),
    ("latency of chat is held to its own bound", "QaioLatencyBudgetBurn", "1m",
     {f'qaio_request_duration_seconds_bucket{{{W},task="chat",code="200",le="0.8"}}': "0+99x20",
      f'qaio_request_duration_seconds_bucket{{{W},task="chat",code="200",le="1.5"}}': "0+20x20",
      f'qaio_request_duration_seconds_count{{{W},task="chat",code="200"}}': "0+100x20"}, "10m",
     [burn("", "page", 14.4, "1h", "5m", task="chat")]),
    ("latency quiet when chat meets its bound", "QaioLatencyBudgetBurn", "1m",
     {f'qaio_request_duration_seconds_bucket{{{W},task="chat",code="200",le="0.8"}}': "0+10x20",
      f'qaio_request_duration_seconds_bucket{{{W},task="chat",code="200",le="1.5"}}': "0+99x20",
      f'qaio_request_duration_seconds_count{{{W},task="chat",code="200"}}': "0+100x20"}, "10m", []),
]


def expected(alert: str, labels: dict) -> dict:
    rule = ALERTS[alert]
    labels = {"severity": rule["labels"]["severity"], **{k: v for k, v in labels.items() if v != ""}}
    if "burn_rate" in labels:  # the burn pair's own rule: its annotations name its windows
        rule = next(r for g in RULES["groups"] for r in g["rules"] if r.get("alert") == alert
                    and r["labels"]["long_window"] == labels["long_window"])
    annotations = {k: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), v)
                   for k, v in rule["annotations"].items()}
    return {"exp_labels": labels, "exp_annotations": annotations}


def promtool_test(tmp_path, tests: list[dict]):
    spec = tmp_path / "test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(render.RULES)], "evaluation_interval": "1m", "tests": tests}))
    return subprocess.run([PROMTOOL, "test", "rules", str(spec)], capture_output=True, text=True, timeout=120)


def test_the_rule_files_pass_promtool_check():
    for path in (render.RULES,):
        checked = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    operator = yaml.safe_load(render.OPERATOR_RULE.read_text())
    assert operator["kind"] == "PrometheusRule" and operator["spec"]["groups"] == RULES["groups"]
    built = subprocess.run(["kubectl", "kustomize", str(REPO / "k8s" / "monitoring")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    assert operator in list(yaml.safe_load_all(built.stdout))  # kubectl apply -k k8s/monitoring applies it


def test_the_written_files_are_the_renderers_output():
    checked = subprocess.run([sys.executable, str(render.RULES.parent / "render.py"), "--check"],
                             capture_output=True, text=True, cwd=REPO)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_alert_has_a_runbook_and_a_case_that_fires_it_and_one_that_does_not():
    assert all(rule["annotations"].get("runbook") and rule["labels"]["severity"] in ("page", "ticket")
               for rule in ALERTS.values())
    assert {alert for _, alert, *_, want in CASES if want} == set(ALERTS)
    assert {alert for _, alert, *_, want in CASES if not want} == set(ALERTS)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_alert(tmp_path, case):
    _, alert, interval, series, at, want = case
    test = {"interval": interval, "input_series": [{"series": s, "values": v} for s, v in series.items()],
            "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": [expected(alert, w) for w in want]}]}
    result = promtool_test(tmp_path, [test])
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_expectation_that_is_wrong_fails(tmp_path):
    """The cases can fail: the fast burn's history with no alert expected is refused by promtool."""
    _, alert, interval, series, at, _ = CASES[[c[0] for c in CASES].index("availability fast burn pages")]
    test = {"interval": interval, "input_series": [{"series": s, "values": v} for s, v in series.items()],
            "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": []}]}
    assert promtool_test(tmp_path, [test]).returncode != 0


def test_the_error_budget_left_is_recorded(tmp_path):
    """0.05 % errors over the period leave half of a 0.1 % budget; 97 % fast sentiment, 40 % of 5 %."""
    series = {f'qaio_nginx_requests_total{{{NGINX},status="200"}}': "0+2000x120",
              f'qaio_nginx_requests_total{{{NGINX},status="500"}}': "0+1x120",
              f'qaio_request_duration_seconds_bucket{{{W},task="sentiment",code="200",le="0.8"}}': "0+97x120",
              f'qaio_request_duration_seconds_count{{{W},task="sentiment",code="200"}}': "0+100x120"}
    test = {"interval": "1m", "input_series": [{"series": s, "values": v} for s, v in series.items()],
            "promql_expr_test": [
                {"eval_time": "100m", "expr": 'round(qaio:slo_error_budget_remaining:ratio{slo="availability"}, 0.01)',
                 "exp_samples": [{"labels": '{slo="availability", period="30d"}', "value": 0.5}]},
                {"eval_time": "100m", "expr": 'round(qaio:slo_error_budget_remaining:ratio{slo="latency"}, 0.01)',
                 "exp_samples": [{"labels": '{slo="latency", period="30d", task="sentiment"}', "value": 0.4}]},
            ]}
    result = promtool_test(tmp_path, [test])
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_objective_off_the_histograms_bounds_is_refused():
    with pytest.raises(ValueError, match="QAIO_SLO_CHAT_LATENCY_S"):
        slo.Objectives.from_env({"QAIO_SLO_CHAT_LATENCY_S": "1.2"})
    with pytest.raises(ValueError, match="QAIO_SLO_AVAILABILITY"):
        slo.Objectives.from_env({"QAIO_SLO_AVAILABILITY": "99.9"})
    assert slo.Objectives.from_env({"QAIO_SLO_AVAILABILITY": "0.995"}).availability == 0.995
