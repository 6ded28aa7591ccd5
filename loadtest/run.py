"""`make loadtest`: a stepped k6 load test against the running stack, with a report.

At each level (default 2, 8, 16, 20 concurrent users, 30 s each) it runs loadtest/qaio.js and records
P50/P90/P99, error rate, requests per second and cache hit ratio, each worker's resident memory before
and after, and the level's SLA verdict (loadtest/sla.py, with the alerts' objectives). Then the overload
step (loadtest/overload.js): 3x and 10x the stack's capacity (the sum of its workers' KV slots + queue,
from their /readyz) in concurrent clients, each on its own loopback address, recording status counts,
Retry-After, latency of admitted and of refused requests, and the tokens the workers generated that no
client received. Writes docs/loadtest.md, .json and .png (loadtest/report.py); exits non-zero when a
level broke a threshold (a missed SLA is a finding, not a failure). Loopback only: it refuses a URL
that is not.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from qaio_testing import REPO, http_status

from . import sla
from .report import write_report

SCRIPT = REPO / "loadtest" / "qaio.js"
OVERLOAD_SCRIPT = REPO / "loadtest" / "overload.js"
REVIEWS = REPO.parent / "shared" / "data" / "waimai_10k.csv"


def worker_rss_mb(run_dir: Path) -> dict[str, float]:
    """Resident memory of each worker instance (gunicorn master and its processes) from the stack's pid files."""
    result = {}
    for pid_file in sorted(run_dir.glob("worker-*.pid")):
        master = pid_file.read_text().strip()
        pids = [master] + subprocess.run(["pgrep", "-P", master], capture_output=True, text=True).stdout.split()
        total = 0.0
        for pid in pids:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0) / 1024
        result[pid_file.stem] = round(total, 1)
    return result


def worker_urls(run_dir: Path, base_port: int) -> list[str]:
    """The stack's workers (scripts/stack.sh: worker i listens on base + i), reached directly on loopback."""
    count = len(list(run_dir.glob("worker-*.pid")))
    return [f"http://127.0.0.1:{base_port + i}" for i in range(count)]


def stack_capacity(workers: list[str]) -> int:
    """Requests the stack holds at once: every worker's KV slots + queue."""
    total = 0
    for url in workers:
        with urllib.request.urlopen(url + "/readyz", timeout=10) as response:
            ready = json.loads(response.read())
        total += ready["slots"] + ready["queue_capacity"]
    return total


def generated_tokens(workers: list[str]) -> float:
    """qaio_generated_tokens_total summed over the workers' tasks and processes."""
    total = 0.0
    for url in workers:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("qaio_generated_tokens_total{"):
                    total += float(line.rsplit(" ", 1)[1])
    return total


def local_ip_range(count: int) -> str:
    """`count` loopback addresses for k6's --local-ips, from 127.0.1.1 on (250 per /24)."""
    blocks = (count + 249) // 250
    return f"127.0.1.1-127.0.{blocks}.250"


def run_overload(url: str, users: int, duration: str, work: Path, workers: list[str], extra_env: dict) -> dict:
    env = {**os.environ, "QAIO_URL": url, "QAIO_VUS": str(users), "QAIO_DURATION": duration, **extra_env}
    before = generated_tokens(workers)
    metrics, outcome = run_k6(OVERLOAD_SCRIPT, ["--local-ips", local_ip_range(users)], env,
                              work / f"k6-overload-{users}.json")
    time.sleep(2)  # let the workers finish (or drop) what the last clients left behind
    generated = generated_tokens(workers) - before

    def count(name: str) -> int:
        return int(metrics.get(name, {}).get("values", {}).get("count", 0))

    def trend(name: str) -> dict:
        values = metrics.get(name, {}).get("values", {})
        return {k: values.get(f"p({k})") for k in (50, 99)}

    delivered = count("delivered_tokens")
    retry_after = metrics.get("checks{check:a refusal carries Retry-After}", {}).get("values", {}).get("rate")
    return {"users": users, "requests": count("http_reqs"),
            "status": {s: count(f"status_{s}") for s in ("200", "429", "503", "other", "abandoned")},
            "refusals_with_retry_after": retry_after,  # share of 429/503 answers that carried it
            "admitted_ms": trend("admitted_duration"), "shed_ms": trend("shed_duration"),
            "generated_tokens": round(generated), "delivered_tokens": delivered,
            "undelivered_tokens": max(0, round(generated) - delivered), **outcome}


def served_model(url: str) -> str:
    """The model the stack serves, as its answers report it (nginx does not expose /readyz)."""
    request = urllib.request.Request(url + "/v1/sentiment", data=json.dumps({"text": "模型"}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        body = json.loads(response.read())
    return body["model"] + (" (demo model: random weights)" if body.get("demo_model") else "")


def run_k6(script: Path, args: list[str], env: dict, summary_path: Path) -> tuple[dict, dict]:
    """One k6 run; returns its summary's metrics and the outcome (passed, failed thresholds, output tail)."""
    k6 = Path(sys.executable).parent / "k6"
    done = subprocess.run([str(k6), "run", "--quiet", *args, str(script)],
                          env={**env, "QAIO_SUMMARY": str(summary_path)}, capture_output=True, text=True)
    metrics = json.loads(summary_path.read_text())["metrics"]
    outcome = {"passed": done.returncode == 0,
               "thresholds_failed": sorted(name for name, metric in metrics.items()
                                           for ok in metric.get("thresholds", {}).values() if not ok["ok"]),
               "k6_output": done.stdout[-500:] + done.stderr[-1500:]}
    return metrics, outcome


def run_level(url: str, users: int, duration: str, work: Path, extra_env: dict) -> dict:
    objectives = sla.objectives()
    env = {**os.environ, "QAIO_URL": url, "QAIO_REVIEWS": str(REVIEWS),
           "QAIO_SLA_PERCENTILE": sla.percentile(objectives), **extra_env}
    # k6's full summary goes to a file; the report keeps what it needs.
    metrics, outcome = run_k6(SCRIPT, ["--vus", str(users), "--duration", duration], env, work / f"k6-{users}.json")
    duration_values = metrics["http_req_duration"]["values"]
    return {"users": users, "requests": metrics["http_reqs"]["values"]["count"],
            "rps": metrics["http_reqs"]["values"]["rate"], "error_rate": metrics["http_req_failed"]["values"]["rate"],
            "p50_ms": duration_values["p(50)"], "p90_ms": duration_values["p(90)"], "p99_ms": duration_values["p(99)"],
            "cache_hit_ratio": metrics.get("cache_hits", {}).get("values", {}).get("rate", 0.0),
            "sla": (measured := sla.measure(metrics, objectives)) | sla.verdict(measured, objectives), **outcome}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=os.environ.get("QAIO_LOADTEST_URL", "http://127.0.0.1:8080"))
    parser.add_argument("--levels", default="2,8,16,20")
    parser.add_argument("--duration", default="30s")
    parser.add_argument("--run-dir", type=Path, default=Path(os.environ.get("QAIO_STACK_DIR", REPO / "run")))
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--chat-tokens", default="32")
    parser.add_argument("--overload", default="3,10", help="multiples of the stack's capacity; empty: no overload step")
    parser.add_argument("--base-port", type=int, default=int(os.environ.get("QAIO_STACK_BASE_PORT", "8001")))
    parser.add_argument("--worker-urls", default="", help="comma-separated worker URLs (default: the stack's, "
                                                           "from --run-dir and --base-port)")
    args = parser.parse_args(argv)
    if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("load goes to loopback only")
    if http_status(args.url + "/nginx-health", timeout=5) != 200:
        print(f"no stack answers at {args.url}: start one with `make run-detached` first", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"url": args.url, "duration": args.duration, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "workers": len(list(args.run_dir.glob("worker-*.pid"))), "levels": [],
               "model": served_model(args.url)}
    with tempfile.TemporaryDirectory(prefix="qaio-k6-") as work:
        for users in (int(u) for u in args.levels.split(",") if u):
            before = worker_rss_mb(args.run_dir)
            level = run_level(args.url, users, args.duration, Path(work), {"QAIO_CHAT_TOKENS": args.chat_tokens})
            level.update(rss_before=before, rss_after=worker_rss_mb(args.run_dir))
            results["levels"].append(level)
            print(f"{users:3d} users: {level['rps']:.2f} RPS, p50 {level['p50_ms']:.0f} ms, "
                  f"p99 {level['p99_ms']:.0f} ms, errors {level['error_rate']:.2%}, "
                  f"{'pass' if level['passed'] else 'FAIL'}, SLA {'met' if level['sla']['met'] else 'missed'}",
                  flush=True)
        if args.overload:
            workers = args.worker_urls.split(",") if args.worker_urls else worker_urls(args.run_dir, args.base_port)
            capacity = stack_capacity(workers)
            results["overload"] = {"capacity": capacity, "levels": []}
            for factor in (int(f) for f in args.overload.split(",") if f):
                level = run_overload(args.url, factor * capacity, args.duration, Path(work), workers,
                                     {"QAIO_CHAT_TOKENS": args.chat_tokens})
                level["factor"] = factor
                results["overload"]["levels"].append(level)
                print(f"overload {factor}x ({level['users']} clients): {level['status']}, admitted p99 "
                      f"{level['admitted_ms'][99]} ms, undelivered tokens {level['undelivered_tokens']}, "
                      f"{'pass' if level['passed'] else 'FAIL'}", flush=True)
    (args.out / "loadtest.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    write_report(results, args.out)
    print(f"wrote {args.out / 'loadtest.md'}")
    levels = results["levels"] + results.get("overload", {}).get("levels", [])
    return 0 if all(level["passed"] for level in levels) else 1


if __name__ == "__main__":
    raise SystemExit(main())
