"""`make bench-host` (bench/host_path.py) at a smoke scale on this CPU: both layouts on the null model,
every task's levels measured without an error, and the report written, so the bench is known to run.

CPU is read from /proc in clock ticks (10 ms), summed per process: a level of a few requests may read 0
in every process, so CPU is checked over the whole run (some 100 ms or more)."""
import json
import os
import subprocess
import sys

import pytest

from qaio_testing import REPO

pytestmark = pytest.mark.tool


def test_the_host_path_bench_measures_every_task_in_both_layouts_and_writes_its_report(tiny_model_dir, tmp_path):
    command = [sys.executable, "-m", "bench.host_path", "--model", tiny_model_dir, "--levels", "4", "--scale", "4",
               "--steps", "5", "--max-tokens", "8", "--out", str(tmp_path), "--note", "smoke test"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "worker"), str(REPO)])}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "benchmarks-host.json").read_text())
    run, = report["runs"]
    assert set(run["http"]) == {"engine process", "one process"}
    for layout, rows in run["http"].items():
        assert [row["kind"] for row in rows] == ["chat", "sentiment", "healthz", "bulk_sentiment"], layout
        assert all(row["errors"] == 0 and row["requests"] > 0 for row in rows), rows
        chat, sentiment, healthz, bulk = rows
        assert chat["tokens"] == 8 * chat["requests"] and chat["server_cpu_us_per_token"] >= 0
        assert sentiment["server_cpu_us_per_request"] >= 0 and healthz["server_cpu_us_per_request"] >= 0
        assert bulk["texts_per_s"] > 0 and bulk["server_cpu_us_per_text"] >= 0
    http_rows = [row for rows in run["http"].values() for row in rows]
    assert sum(sum(v for k, v in row["cpu_s"].items() if k != "clients") for row in http_rows) > 0
    assert "engine" in run["http"]["engine process"][0]["cpu_s"]  # the engine process is counted as the server's
    assert {row["rows"] for row in run["engine_step"]} == {"greedy", "default chat"}
    assert set(report["floors"]) == {"WSGI callable", "Flask app"}  # the floor under any request, measured
    assert all(row["errors"] == 0 and row["requests"] > 0 and row["server_cpu_us_per_request"] >= 0
               and "engine" not in row["cpu_s"] for rows in report["floors"].values() for row in rows), report["floors"]
    markdown = (tmp_path / "benchmarks-host.md").read_text()
    assert "`GET /healthz`" in markdown and "smoke test" in markdown and "| Flask app | 4 |" in markdown
    assert "sentiment, 32 texts a request" in markdown
