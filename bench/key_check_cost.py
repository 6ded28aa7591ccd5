"""`make key-cost`: what the front door's API key check costs per request, against the alternative
(a check in the worker, reached by auth_request). nginx as the project renders it, keys off and on (a
2-key file), in front of a static upstream (an nginx that answers 200 at once), so that only the front
door's own work differs; and a worker's `GET /healthz`, the least a Python check could cost. Each: N
requests one after another on one keep-alive connection, CPU time of the serving processes from /proc.

Writes docs/key-check-cost.md and .json.
"""
from __future__ import annotations

import argparse
import http.client
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from qaio_testing import REPO, GunicornServer, NginxServer, add_api_key, free_port

from .gpu_http import children, cpu_by_role
from .run import machine

def process_tree(root: int) -> list[int]:
    """root and its children (nginx's workers, gunicorn's processes)."""
    return [root, *children(root)]


def cpu_s(pids: list[int]) -> float:
    return sum(cpu_by_role(dict.fromkeys(pids, "all")).values())


def per_request_us(port: int, path: str, pids: list[int], n: int, headers: dict) -> float:
    connection = http.client.HTTPConnection("127.0.0.1", port)
    for _ in range(50):  # warm: the connection, nginx's and njs's first use
        connection.request("GET", path, headers=headers)
        connection.getresponse().read()
    before = cpu_s(pids)
    for _ in range(n):
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        response.read()
        assert response.status == 200, (path, response.status)
    return (cpu_s(pids) - before) / n * 1e6


def static_upstream(directory: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    conf = directory / "static.conf"
    conf.write_text(f"worker_processes 1; pid {directory}/static.pid; error_log {directory}/static.err;\n"
                    f"events {{}} http {{ access_log off; server {{ listen 127.0.0.1:{port}; "
                    f"location / {{ return 200 '{{\"ok\":true}}'; }} }} }}\n")
    proc = subprocess.Popen(["nginx", "-p", str(directory), "-c", str(conf), "-g", "daemon off;"],
                            start_new_session=True)
    return proc, port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="qaio-key-cost-"))
    work.chmod(0o755)
    keys = work / "api-keys"
    add_api_key(keys, "other")
    key = add_api_key(keys, "bench", "rate=10000r/s")
    keys.chmod(0o644)
    upstream, port = static_upstream(work)
    fronts = {"keys off": NginxServer([f"127.0.0.1:{port}"], QAIO_NGINX_CHAT_RATE="100000r/s",
                                      QAIO_NGINX_CHAT_BURST="100000", QAIO_NGINX_ACCESS_LOG="/dev/null"),
              "keys on": NginxServer([f"127.0.0.1:{port}"], QAIO_API_KEYS_FILE=str(keys),
                                     QAIO_NGINX_ACCESS_LOG="/dev/null")}
    worker = GunicornServer(str(REPO / "models" / "tiny"), QAIO_TORCH_THREADS="1")
    results: dict[str, list[float]] = {name: [] for name in (*fronts, "worker /healthz")}
    try:
        worker.wait_ready(600)
        for _ in range(args.rounds):  # interleaved, so that the machine's drift falls on all alike
            for name, front in fronts.items():
                headers = {"Authorization": f"Bearer {key}"} if name == "keys on" else {}
                results[name].append(per_request_us(front.port, "/v1/models", process_tree(front.proc.pid),
                                                    args.requests, headers))
            results["worker /healthz"].append(per_request_us(worker.port, "/healthz", process_tree(worker.proc.pid),
                                                             args.requests // 2, {}))
    finally:
        for front in fronts.values():
            front.stop()
        worker.stop()
        upstream.terminate()
        upstream.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    nginx_version = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "nginx": nginx_version,
              "requests": args.requests, "us_per_request": {k: [round(v) for v in vs] for k, vs in results.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "key-check-cost.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = [f"| {name} | {', '.join(str(round(v)) for v in values)} |" for name, values in results.items()]
    (args.out / "key-check-cost.md").write_text("\n".join([
        "# What the API key check costs", "",
        f"`make key-cost`, {report['date']}, {nginx_version}: CPU time of the serving processes per request "
        f"({args.requests} requests one after another on one keep-alive connection, {args.rounds} interleaved "
        f"rounds; the worker's `/healthz` half as many). The front door in front of a static upstream, keys off "
        f"and on (njs, a 2-key file); a worker's `/healthz` is the least a check in Python would cost.", "",
        "| what | µs of CPU per request, each round |", "|---|---|", *rows, ""]))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
