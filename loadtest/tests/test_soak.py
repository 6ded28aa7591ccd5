"""make soak's runner, shortened: it starts a stack of its own, loads it, samples memory, stops it."""
import json
import os
import subprocess
import sys

import pytest

from qaio_testing import REPO

pytestmark = [pytest.mark.stack, pytest.mark.tool]


def test_a_short_soak_writes_memory_over_time(tmp_path, tiny_model_dir):
    """A real limit (400 MB in 25 s on the tiny model is a leak, not warm-up): the verdict itself is
    test_soak_verdict.py's."""
    done = subprocess.run([sys.executable, "-m", "loadtest.soak", "--minutes", "0.4", "--warmup-minutes", "0.1",
                           "--sample-s", "2", "--clients", "2", "--chat-tokens", "4", "--model", tiny_model_dir,
                           "--max-growth-mb", "400", "--out", str(tmp_path)],
                          env={**os.environ, "QAIO_TORCH_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "soak.json").read_text())
    assert len(results["samples"]) >= 8 and set(results["growth"]) == {"worker-0", "worker-1"}
    assert all(g["after_warmup_mb"] > 50 for g in results["growth"].values())
    assert sum(results["answers"].values()) > 10 and all(k.endswith(" 200") for k in results["answers"])
    assert "| worker-0 |" in (tmp_path / "soak.md").read_text() and (tmp_path / "soak.png").stat().st_size > 1000
    # The stack it started is gone.
    assert "running" not in subprocess.run(["pgrep", "-af", "qaio-soak-"], capture_output=True, text=True).stdout
