"""`make bench-host`: what the host path costs (HTTP, the protocol between processes, the scheduler and its
blocks, sampling bookkeeping, streaming, stop strings, detokenising), measured without the model's
arithmetic: a worker with QAIO_NULL_MODEL=1, whose passes answer at once from a fixed token cycle.

Per source tree (this one, and with `--before` another checkout, in the same sitting) and per layout
(`QAIO_ENGINE_PROCESS=on`: an engine process and two API processes, the GPU default; `off`: one process),
closed-loop levels of streamed chat (default sampling and penalty, 64 tokens), of sentiment (one text a
request, and 32 texts a request at a sixteenth of the level's clients), and of `GET /healthz` (no model,
no engine: the floor of any request through gunicorn and Flask) at c=64 and c=256: tokens/s or
requests/s, and the CPU seconds of every process of the instance (from /proc) per streamed token, per
request or per text, the load client's own CPU apart (it shares the machine's cores).
Beside them, `Engine.step`'s host time at batch 64 and 256 (no HTTP): the engine over the null runner.

Writes docs/benchmarks-host.md and .json.

    make bench-host
    git worktree add /tmp/before <commit> && python -m bench.host_path --before /tmp/before [/tmp/other ...]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from qaio_testing import REPO, GunicornServer

from .gpu_http import level, worker_processes
from .run import machine
from .texts import review_texts
from .trees import measure_trees, tree_conf, tree_env

LAYOUTS = {"engine process": {"QAIO_ENGINE_PROCESS": "on", "QAIO_WORKERS": "2"},
           "one process": {"QAIO_ENGINE_PROCESS": "off", "QAIO_WORKERS": "1"}}
DEFAULT_CHAT = {"temperature": 0.7, "top_p": 0.9}  # and the default repetition penalty: no field sends 1.1
BULK_TEXTS = 32  # texts per bulk sentiment request (`texts`): what gunicorn and Flask cost, shared among them


def bulk_items(texts: list[str], requests: int) -> list:
    """`requests` bulk requests of BULK_TEXTS texts each, from `texts` in turn."""
    return [[[texts[(i * BULK_TEXTS + j) % len(texts)] for j in range(BULK_TEXTS)], 1] for i in range(requests)]


def http_levels(tree: str, model: str, levels: list[int], max_tokens: int, scale: int) -> dict:
    texts = review_texts(32 * max(levels))
    out = {}
    for layout, settings in LAYOUTS.items():
        env = {"QAIO_NULL_MODEL": "1", "QAIO_MAX_BATCH_SIZE": str(max(levels)), **settings, **tree_env(tree)}
        server = GunicornServer(model, conf=tree_conf(tree), **env).wait_ready(300)
        try:
            roles = worker_processes(server.proc.pid)
            level(server, roles, "chat", texts[:32], 16, 8, **DEFAULT_CHAT)  # warm the whole path
            results = []
            for kind in ("chat", "sentiment", "healthz"):
                for c in levels:
                    # Levels of a few seconds each at least on 2 cores: shorter ones are this machine's noise.
                    count = (8 if kind == "chat" else 32) * c // scale
                    sampling = DEFAULT_CHAT if kind == "chat" else {}
                    result = level(server, roles, kind, texts[:count], c, max_tokens, **sampling)
                    results.append(summarize(kind, c, result))
                    print(f"  {layout} {kind} c={c}: {results[-1]}", flush=True)
            # Bulk clients hold BULK_TEXTS texts each: a sixteenth of the level keeps them within the
            # engine's slots and queue (QAIO_MAX_BATCH_SIZE + its default queue, 3 x the level).
            for c in levels:
                bulk_c = max(1, c // 16)
                result = level(server, roles, "bulk_sentiment", bulk_items(texts, 64 * bulk_c // scale), bulk_c, 1)
                results.append(summarize("bulk_sentiment", bulk_c, result))
                print(f"  {layout} bulk_sentiment c={bulk_c}: {results[-1]}", flush=True)
            out[layout] = results
        finally:
            server.stop()
    return out


FLOORS = {"WSGI callable": "bench.floor_apps:wsgi", "Flask app": "bench.floor_apps:flask_app()"}


def floor_levels(model: str, levels: list[int], scale: int) -> dict:
    """`GET /healthz` from apps that do nothing else (bench/floor_apps.py) under the worker's gunicorn
    settings as the engine-process layout's API processes run them (two, on gevent; without the engine
    process, bench/floor_gunicorn.conf.py): the floor under any request on this machine, whichever tree."""
    out = {}
    for name, app in FLOORS.items():
        server = GunicornServer(model, app=app, conf=str(REPO / "bench" / "floor_gunicorn.conf.py"),
                                **LAYOUTS["engine process"]).wait_ready(60)
        try:
            roles = worker_processes(server.proc.pid)
            level(server, roles, "healthz", ["-"] * 64, 16, 1)  # warm
            out[name] = [summarize("healthz", c, level(server, roles, "healthz", ["-"] * (32 * c // scale), c, 1))
                         for c in levels]
            print(f"  floor {name}: {out[name]}", flush=True)
        finally:
            server.stop()
    return out


def summarize(kind: str, c: int, result: dict) -> dict:
    server_cpu = sum(s for role, s in result["cpu_s"].items() if role != "clients")
    row = {"kind": kind, "concurrency": c, "requests": result["requests"], "errors": result["errors"],
           "wall_s": round(result["wall_s"], 2), "cpu_s": {k: round(v, 2) for k, v in result["cpu_s"].items()}}
    if kind == "chat":
        tokens = result["output_tokens_per_s"] * result["wall_s"]
        row.update(tokens=round(tokens), tokens_per_s=round(result["output_tokens_per_s"], 1),
                   server_cpu_us_per_token=round(1e6 * server_cpu / max(tokens, 1), 1),
                   client_cpu_us_per_token=round(1e6 * result["cpu_s"]["clients"] / max(tokens, 1), 1))
    elif kind == "bulk_sentiment":
        texts = BULK_TEXTS * (result["requests"] - result["errors"])
        row.update(texts_per_s=round(texts / result["wall_s"], 1),
                   server_cpu_us_per_text=round(1e6 * server_cpu / max(texts, 1), 1),
                   client_cpu_us_per_text=round(1e6 * result["cpu_s"]["clients"] / max(texts, 1), 1))
    else:
        done = result["requests"] - result["errors"]
        row.update(requests_per_s=round(result["requests_per_s"], 1),
                   server_cpu_us_per_request=round(1e6 * server_cpu / max(done, 1), 1),
                   client_cpu_us_per_request=round(1e6 * result["cpu_s"]["clients"] / max(done, 1), 1))
    return row


def engine_steps(model: str, batches: list[int], steps: int) -> list[dict]:
    """Engine.step's host time over the null runner, every slot decoding: greedy rows and default-chat rows
    (sampled, penalized). Runs in the tree's own interpreter path (see main)."""
    try:  # the engine loop steps inside torch's inference mode, entered once (trees that have it)
        from qwen_worker.engine.inference import thread_mode
    except ImportError:
        thread_mode = contextlib.nullcontext
    from qwen_worker.config import WorkerConfig
    from qwen_worker.engine import GenerationRow
    from qwen_worker.model.null import NullModelService
    from qwen_worker.sampling import SamplingParams

    out = []
    for batch in batches:
        service = NullModelService(WorkerConfig.from_env({"QAIO_MODEL": model, "QAIO_NULL_MODEL": "1",
                                                          "QAIO_MAX_BATCH_SIZE": str(batch)}))
        service.load()
        engine = service.engine
        for name, sampling in (("greedy", SamplingParams()),
                               ("default chat", SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.1))):
            prompt = service.prompter.chat_ids([])
            rows = [GenerationRow(prompt + [100 + i], steps + 10, sampling=sampling) for i in range(batch)]
            for row in rows:
                engine.add(row, lambda row, error: None)
            while any(not row.prefilled or not row.tokens for row in rows):
                engine.step()
            with thread_mode():
                started = time.perf_counter()
                for _ in range(steps):
                    engine.step()
                per_step = (time.perf_counter() - started) / steps
            engine.fail_all(RuntimeError("measured"))
            out.append({"batch": batch, "rows": name, "step_ms": round(1000 * per_step, 3),
                        "us_per_row": round(1e6 * per_step / batch, 2)})
            print(f"  Engine.step batch {batch} {name}: {out[-1]['step_ms']} ms", flush=True)
    return out


def engine_steps_in(tree: str, model: str, batches: list[int], steps: int) -> list[dict]:
    """engine_steps with the tree's code, in a process of its own."""
    command = [sys.executable, "-m", "bench.host_path", "--engine-steps-json", "--model", model,
               "--levels", *map(str, batches), "--steps", str(steps)]
    done = subprocess.run(command, env={**os.environ, **tree_env(tree)}, cwd=tree, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(tree: str, args) -> dict:
    return {"engine_step": engine_steps_in(tree, args.model, args.levels, args.steps),
            "http": http_levels(tree, args.model, args.levels, args.max_tokens, args.scale)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "tiny"), help="whose tokenizer (no weights are read)")
    parser.add_argument("--before", nargs="+", help="other checkouts of the project, measured the same way first")
    parser.add_argument("--levels", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--scale", type=int, default=1, help="divide the requests per level (a quick look)")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--note", default="", help="a paragraph the report prints under its tables (what changed)")
    parser.add_argument("--engine-steps-json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.engine_steps_json:
        results = engine_steps(args.model, args.levels, args.steps)
        print(json.dumps(results))
        return 0
    runs = measure_trees(args.before, lambda tree: measure(tree, args))
    floors = floor_levels(args.model, args.levels, args.scale)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "tokenizer": Path(args.model).name,
              "max_tokens": args.max_tokens, "layouts": LAYOUTS, "runs": runs, "floors": floors, "note": args.note}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmarks-host.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "benchmarks-host.md").write_text(render(report))
    return 0


def render(report: dict) -> str:
    m = report["machine"]
    lines = ["# The host path, without the model", "",
             f"`make bench-host`, {report['date']}, {m['cpu']} ({m['cores']} cores), a worker with "
             f"`QAIO_NULL_MODEL=1` (the `{report['tokenizer']}` tokenizer; passes answer at once from a token "
             f"cycle; torch on one thread, its default), `QAIO_MAX_BATCH_SIZE` = the highest level, each tree's own gunicorn settings (the API processes beside an engine process on gevent in a tree with QAIO_HTTP_WORKER, on gthread before it; one process on gthread). Closed loop: streamed chat "
             f"of {report['max_tokens']} tokens with the default sampling and repetition penalty, and sentiment, one "
             f"text a request, and {BULK_TEXTS} texts a request (`texts`) at a sixteenth of the level's clients. Server CPU: every process of the instance (gunicorn's master and API processes, "
             "the engine process), from /proc; the load client (Python: one process, its clients coroutines over aiohttp) shares the "
             "machine's cores and its CPU is shown apart. `GET /healthz` touches neither the model nor the engine: "
             "what any request costs through gunicorn and Flask, the floor under a sentiment request.", "",
             "| tree | layout | task | c | rate | server CPU | client CPU | errors |", "|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        for layout, rows in run["http"].items():
            for row in rows:
                task = {"healthz": "`GET /healthz`", "bulk_sentiment": f"sentiment, {BULK_TEXTS} texts a request"}.get(
                    row["kind"], row["kind"])
                if row["kind"] == "chat":
                    rate, server, client = (f"{row['tokens_per_s']:,.0f} tok/s", f"{row['server_cpu_us_per_token']} µs/token",
                                            f"{row['client_cpu_us_per_token']} µs/token")
                elif row["kind"] == "bulk_sentiment":
                    rate, server, client = (f"{row['texts_per_s']:,.0f} texts/s", f"{row['server_cpu_us_per_text']} µs/text",
                                            f"{row['client_cpu_us_per_text']} µs/text")
                else:
                    rate, server, client = (f"{row['requests_per_s']:,.0f} req/s",
                                            f"{row['server_cpu_us_per_request']} µs/request",
                                            f"{row['client_cpu_us_per_request']} µs/request")
                lines.append(f"| {run['name']} ({run['commit']}) | {layout} | {task} | {row['concurrency']} | "
                             f"{rate} | {server} | {client} | {row['errors']} |")
    lines += ["", "`Engine.step`'s host time, every slot decoding (the engine over the null runner, no HTTP):", "",
              "| tree | batch | rows | ms per step | µs per row |", "|---|---|---|---|---|"]
    for run in report["runs"]:
        for row in run["engine_step"]:
            lines.append(f"| {run['name']} ({run['commit']}) | {row['batch']} | {row['rows']} | {row['step_ms']} | "
                         f"{row['us_per_row']} |")
    if report.get("floors"):
        lines += ["", "The floor under any request here: gunicorn with the worker's settings (two processes on gevent) "
                  "serving an app that does nothing else (`bench/floor_apps.py`), `GET /healthz`:", "",
                  "| app | c | rate | server CPU | client CPU | errors |", "|---|---|---|---|---|---|"]
        for name, rows in report["floors"].items():
            for row in rows:
                lines.append(f"| {name} | {row['concurrency']} | {row['requests_per_s']:,.0f} req/s | "
                             f"{row['server_cpu_us_per_request']} µs/request | {row['client_cpu_us_per_request']} "
                             f"µs/request | {row['errors']} |")
    if report.get("note"):
        lines += ["", report["note"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
