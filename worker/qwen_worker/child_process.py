"""A Python module run in a child process, for trying what could take a worker down (a CPU that reports
an instruction set and faults on it): QAIO_DTYPE=auto's probes and the int8 kernel's trial."""
from __future__ import annotations

import subprocess
import sys


def run_module(args: list[str], timeout_s: float, env: dict | None = None) -> tuple[str, str | None]:
    """`python -m args...`: (its stdout, None), or ("", why not: past the timeout, or the exit code with
    the last line of its stderr)."""
    try:
        done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout_s,
                              env=env)
    except subprocess.TimeoutExpired:
        return "", f"took over {timeout_s} s"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [""])[-1][:200]
        return "", f"exited with {done.returncode}" + (f": {last}" if last else "")
    return done.stdout, None
