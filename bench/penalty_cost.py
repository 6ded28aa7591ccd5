"""`make penalty-cost`: what the default repetition penalty costs a served greedy chat. One worker, streamed
greedy chat at c=16, levels with the default penalty and without it (`repetition_penalty: 1`)
interleaved; the worker's CPU seconds (all its processes, from /proc) per streamed token, and tokens/s.
Writes docs/penalty-cost.md and .json.

    make penalty-cost                                     # the tiny model (its passes cost next to nothing)
    python -m bench.penalty_cost --model models/smollm2-135m-instruct --out /tmp
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from qaio_testing import REPO, GunicornServer

from .gpu_http import level, worker_processes
from .run import machine
from .texts import review_texts

VARIANTS = {"default penalty": {}, "no penalty": {"repetition_penalty": 1}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(REPO / "models" / "tiny"))
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--baseline", type=Path, help="an earlier run's penalty-cost.json (another commit), shown beside")
    args = parser.parse_args(argv)
    texts = review_texts(args.requests)
    server = GunicornServer(args.model, QAIO_MAX_BATCH_SIZE=str(args.concurrency)).wait_ready(600)
    runs = []
    try:
        roles = worker_processes(server.proc.pid)
        level(server, roles, "chat", texts[:args.concurrency], args.concurrency, 8, temperature=0)  # warm-up
        for round_ in range(args.rounds):
            for name, sampling in VARIANTS.items():
                result = level(server, roles, "chat", texts, args.concurrency, args.max_tokens, temperature=0, **sampling)
                tokens = result["output_tokens_per_s"] * result["wall_s"]
                server_cpu = sum(s for role, s in result["cpu_s"].items() if role != "clients")
                runs.append({"variant": name, "round": round_, "errors": result["errors"],
                             "tokens_per_s": result["output_tokens_per_s"],
                             "server_cpu_ms_per_token": 1000 * server_cpu / max(tokens, 1)})
                print(f"{name}: {runs[-1]['tokens_per_s']:.1f} tok/s, "
                      f"{runs[-1]['server_cpu_ms_per_token']:.2f} ms server CPU per token", flush=True)
    finally:
        server.stop()
    write(args, runs)
    return 0


def cpu_ratio(runs: list[dict]) -> float:
    """Median server CPU per token with the default penalty over the median without it."""
    def median(name):
        return statistics.median(r["server_cpu_ms_per_token"] for r in runs if r["variant"] == name)

    return median("default penalty") / median("no penalty")


def table(runs: list[dict]) -> list[str]:
    return ["| variant | round | streamed tok/s | server CPU ms per token | errors |", "|---|---|---|---|---|",
            *[f"| {r['variant']} | {r['round']} | {r['tokens_per_s']:.1f} | {r['server_cpu_ms_per_token']:.2f} | "
              f"{r['errors']} |" for r in runs]]


def write(args, runs: list[dict]) -> None:
    ratio = cpu_ratio(runs)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "model": Path(args.model).name,
              "concurrency": args.concurrency, "max_tokens": args.max_tokens, "requests": args.requests,
              "runs": runs, "cpu_ratio_default_over_none": ratio}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "penalty-cost.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# The default repetition penalty's cost", "",
             f"`make penalty-cost`, {report['date']}, model `{report['model']}`: one worker, streamed greedy chat, "
             f"c={args.concurrency}, {args.requests} requests of {args.max_tokens} tokens per level, levels interleaved. "
             "Server CPU: every process of the instance, from /proc; the load clients are not counted.", "",
             *table(runs), "",
             f"Server CPU per token with the default penalty over without it (median of each): **{ratio:.2f}x**. "
             "The tiny model's step costs next to nothing, so what is left is the host's work per token, and "
             "this shared machine's noise between levels is as large as the penalty's cost.", ""]
    if args.baseline:
        before = json.loads(args.baseline.read_text())
        report["baseline"] = before
        lines += [f"## Before: {args.baseline.name}, {before['date']}", "", *table(before["runs"]), "",
                  f"Median ratio then: **{cpu_ratio(before['runs']):.2f}x**.", ""]
    (args.out / "penalty-cost.md").write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
