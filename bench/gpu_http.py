"""One worker over HTTP in the default GPU layout (an engine process beside the API processes), for
bench/gpu.py: chat greedy and sampled, sentiment, with the CPU seconds each process spent per level."""
from __future__ import annotations

import os
from pathlib import Path

from qaio_testing import GunicornServer

from .load import run_level_processes

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(p) for p in text]
    return out


def worker_processes(master: int) -> dict[int, str]:
    """The instance's processes by role: engine (qwen_worker.engine_server), api (gunicorn's workers)."""
    roles = {master: "master"}
    for child in children(master):
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        roles[child] = "engine" if b"qwen_worker.engine_server" in cmdline else "api"
    return roles


def rss_mb(roles: dict[int, str]) -> float:
    """Resident memory of the given processes together, from /proc."""
    total = 0
    for pid in roles:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def cpu_by_role(roles: dict[int, str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for pid, role in roles.items():
        try:
            out[role] = out.get(role, 0.0) + cpu_seconds(pid)
        except OSError:
            pass
    return out


def level(server, roles, kind: str, texts, c: int, max_tokens: int, **sampling) -> dict:
    """One closed-loop level; cpu_s: each role's CPU seconds while it ran, the load clients' under `clients`."""
    before = cpu_by_role(roles)
    result = run_level_processes(kind, server.url, texts, c, max_tokens, sampling=sampling)
    after = cpu_by_role(roles)
    result["cpu_s"] = {role: after[role] - before.get(role, 0.0) for role in after}
    result["cpu_s"]["clients"] = result.pop("client_cpu_s")
    return result


def measure(model_dir: str, texts: list[str], env: dict, chat_levels, sampled_levels, sentiment_levels,
            max_tokens: int, scale: int = 1, on_level=None, log_path=None) -> dict:
    """on_level(results) after each level, so a run cut short keeps what it measured; the worker's log
    at log_path (a temporary file without one)."""
    server = GunicornServer(model_dir, log_path=str(log_path) if log_path else None, **env).wait_ready(600)
    try:
        roles = worker_processes(server.proc.pid)
        results = {"processes": sorted(roles.values()), "chat": [], "chat_sampled": [], "sentiment": []}
        run_level_processes("sentiment", server.url, texts[:64], 16, max_tokens)  # warm the HTTP path
        plan = [("sentiment", "sentiment", c, {}, max(128, 16 * c // scale)) for c in sentiment_levels]
        plan += [("chat", "chat", c, {"temperature": 0}, max(8, 2 * c // scale)) for c in chat_levels]
        plan += [("chat_sampled", "chat", c, {"temperature": 0.7, "top_p": 0.9}, max(8, 2 * c // scale))
                 for c in sampled_levels]
        for key, kind, c, sampling, count in plan:
            result = level(server, roles, kind, texts[100:100 + count], c, max_tokens, **sampling)
            result.update(sampling)
            results[key].append(result)
            rate = result.get("output_tokens_per_s") or result["requests_per_s"]
            print(f"  http {key} c={c}: {rate:,.0f}/s errors {result['errors']} cpu {result['cpu_s']}", flush=True)
            if on_level:
                on_level(results)
        return results
    finally:
        server.stop()
