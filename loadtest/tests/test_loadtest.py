"""The load-test scripts parse, run a few requests against a live stack, and fail on broken thresholds."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest import sla
from qaio_testing import REPO

pytestmark = pytest.mark.tool

BIN = Path(sys.executable).parent
SCRIPT = REPO / "loadtest" / "qaio.js"
LOCUSTFILE = REPO / "loadtest" / "locustfile.py"
REVIEWS = REPO.parent / "shared" / "data" / "waimai_10k.csv"


@pytest.fixture()
def stack(workers, nginx):
    proxy = nginx(workers, QAIO_NGINX_SENTIMENT_RATE="1000r/s", QAIO_NGINX_CHAT_RATE="1000r/s")
    return {"url": proxy.url, "env": {**os.environ, "QAIO_URL": proxy.url, "QAIO_REVIEWS": str(REVIEWS),
                                      "QAIO_CHAT_TOKENS": "4", "QAIO_TEXT_POOL": "50"}}


def k6(stack, *args, **env):
    return subprocess.run([str(BIN / "k6"), "run", "--quiet", *args, str(SCRIPT)], env={**stack["env"], **env},
                          capture_output=True, text=True, timeout=300)


def test_k6_script_parses():
    done = subprocess.run([str(BIN / "k6"), "inspect", str(SCRIPT)], env={**os.environ, "QAIO_REVIEWS": str(REVIEWS)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "http_req_failed" in json.loads(done.stdout)["thresholds"]


def test_k6_runs_weighted_traffic_with_passing_checks(stack, tmp_path):
    summary = tmp_path / "summary.json"
    done = k6(stack, "--vus", "2", "--iterations", "12", QAIO_SUMMARY=str(summary), QAIO_WEIGHTS="50,30,20")
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = json.loads(summary.read_text())["metrics"]
    assert metrics["http_reqs"]["values"]["count"] == 12
    assert metrics["checks"]["values"]["rate"] == 1.0
    assert metrics["http_req_failed"]["values"]["rate"] == 0.0


def test_k6_thresholds_fail_the_run(stack, tmp_path):
    done = k6(stack, "--vus", "1", "--iterations", "3", QAIO_WEIGHTS="100,0,0", QAIO_P95_SENTIMENT_MS="0.001")
    assert done.returncode != 0


def locust(stack, *extra, **env):
    return subprocess.run([str(BIN / "locust"), "-f", str(LOCUSTFILE), "--headless", "-H", stack["url"], "-u", "2",
                           "-r", "2", "-t", "4s", "--only-summary", *extra], env={**stack["env"], **env},
                          capture_output=True, text=True, timeout=120)


def test_locust_runs_weighted_traffic(stack):
    done = locust(stack)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "sentiment" in done.stdout + done.stderr


def test_locust_thresholds_fail_the_run(stack):
    done = locust(stack, QAIO_P95_SENTIMENT_MS="0.001")
    assert done.returncode == 1 and "thresholds failed" in done.stdout + done.stderr


def test_stepped_runner_writes_the_report(stack, workers, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for i, worker in enumerate(workers):
        (run_dir / f"worker-{i}.pid").write_text(str(worker.proc.pid))
    done = subprocess.run([sys.executable, "-m", "loadtest.run", "--url", stack["url"], "--levels", "1,2",
                           "--duration", "3s", "--run-dir", str(run_dir), "--out", str(tmp_path), "--chat-tokens", "4",
                           "--overload", ""],
                          # Objectives a CPU stack of the tiny model meets: the verdict must say met.
                          env={**stack["env"], "QAIO_SLO_SENTIMENT_LATENCY_S": "120", "QAIO_SLO_CHAT_LATENCY_S": "120"},
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "loadtest.json").read_text())
    assert [level["users"] for level in results["levels"]] == [1, 2]
    for level in results["levels"]:
        assert level["requests"] > 0 and level["passed"] and level["error_rate"] == 0
        assert level["sla"]["met"] and level["sla"]["availability"] == 1.0, level["sla"]
        assert "sentiment" in level["sla"]["latency_ms"] and set(level["sla"]["latency_ms"]) <= set(sla.TASKS)
        assert all(mb > 10 for mb in level["rss_after"].values()) and len(level["rss_after"]) == 2
    report = (tmp_path / "loadtest.md").read_text()
    assert "## SLA verdict" in report and "Every level met the SLA, up to 2 users." in report
    assert "| 2 |" in report and "demo model" in report and (tmp_path / "loadtest.png").stat().st_size > 1000


def test_overload_step_reports_refusals_and_undelivered_work(gunicorn_server, nginx, tmp_path):
    """3x the capacity of two small workers: refusals are 429/503 with Retry-After, the report counts them."""
    capacity = {"QAIO_MAX_BATCH_SIZE": "2", "QAIO_QUEUE_CAPACITY": "2"}
    workers = [gunicorn_server(QAIO_TORCH_THREADS="1", QAIO_THREADS="16", **capacity) for _ in range(2)]
    proxy = nginx(workers, **capacity)
    done = subprocess.run([sys.executable, "-m", "loadtest.run", "--url", proxy.url, "--levels", "",
                           "--overload", "3", "--duration", "5s", "--out", str(tmp_path), "--chat-tokens", "8",
                           "--run-dir", str(tmp_path), "--worker-urls", ",".join(w.url for w in workers)],
                          env=os.environ, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    overload = json.loads((tmp_path / "loadtest.json").read_text())["overload"]
    assert overload["capacity"] == 8
    level = overload["levels"][0]
    assert level["users"] == 24 and level["passed"]
    assert level["status"]["200"] > 0 and level["status"]["503"] > 0 and level["status"]["other"] == 0
    assert level["refusals_with_retry_after"] == 1.0
    assert level["generated_tokens"] >= level["delivered_tokens"] > 0
    assert "## Overload" in (tmp_path / "loadtest.md").read_text()
