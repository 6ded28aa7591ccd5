"""The prepared GPU run (bench/gpu.py) in its smoke mode on this CPU, end to end: every phase this
machine allows, the Triton variant in Triton's interpreter, HTTP in the GPU's process layout; so the
script a GPU session runs unchanged is known to work before device time is spent on it."""
import json
import os
import subprocess
import sys

import pytest

from qaio_testing import REPO

pytestmark = pytest.mark.tool


@pytest.mark.timeout(1800)  # the Triton variant runs in Triton's interpreter: minutes on a busy 2-core machine
def test_the_gpu_run_measures_each_phase_and_writes_its_report(tiny_model_dir, tmp_path):
    # No time budget: the run's budget guards a GPU's lent minutes; here every phase must run, however
    # slow the machine is today.
    command = [sys.executable, "-m", "bench.gpu", "--smoke", "--model", tiny_model_dir, "--out", str(tmp_path),
               "--engine-variants", "torch,triton/math/8/16", "--http-variants", "torch", "--note", "smoke test",
               "--budget-s", "86400"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "worker"), str(REPO)])}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1700)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "benchmarks-gpu.json").read_text())
    assert not results.get("failed") and not results["skipped"], (results.get("failed"), results["skipped"])
    for spec in ("torch", "triton/math/8/16"):
        engine = results["engine"][spec]
        assert engine["greedy_b4"]["tokens_per_s"] > 0 and engine["sampled_b4"]["tokens_per_s"] > 0
        assert engine["default_b4"]["tokens_per_s"] > 0 and engine["default_b4_eager_picks"]["tokens_per_s"] > 0
        assert engine["greedy_b4_overlapped"]["same_tokens"] is True and engine["default_b4_overlapped"]["tokens_per_s"] > 0
        assert set(engine["greedy_b4"]["host_ms_per_step"]) == {"launch", "wait", "book"}
        assert engine["sentiment_b256_per_s"] > 0 and engine["prefill_3x300_ms"]["second"] > 0
    http = results["http"]["torch"]
    assert sorted(set(http["processes"])) == ["api", "engine", "master"]
    levels = http["chat"] + http["chat_sampled"] + http["sentiment"]
    assert len(levels) == 4 and all(level["errors"] == 0 for level in levels)
    assert all(level["cpu_s"]["engine"] > 0 and level["cpu_s"]["clients"] > 0 for level in levels)
    report = (tmp_path / "benchmarks-gpu.md").read_text()
    assert "Smoke run" in report and "smoke test" in report and "`triton/math/8/16`" in report
    assert len(list((tmp_path / "gpu-runs").glob("*.json"))) == 1
    # What comes back from a device run: its own output and each worker's log beside the results.
    assert "engine torch..." in (tmp_path / "run.log").read_text()
    assert "model ready" in (tmp_path / "worker-torch.log").read_text()
    assert engine["decode_attention"] == "triton kernel" and results["engine"]["torch"]["decode_attention"] == \
        "torch sdpa (auto)"


def test_a_load_client_imports_neither_torch_nor_the_worker():
    """Load clients are processes of their own (`python -m bench.load`); one importing torch would spend
    seconds and memory of a GPU run's slot on something no client uses."""
    code = "import runpy, sys; sys.argv = ['x']; import bench.load; print(sorted(m for m in sys.modules " \
           "if m.split('.')[0] in ('torch', 'qwen_worker', 'transformers')))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
