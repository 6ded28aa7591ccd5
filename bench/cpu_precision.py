"""`make cpu-precision`: one worker on the 0.5B-shape model, straight, once per weight precision
(QAIO_DTYPE float32, int8, bfloat16 and auto, the default, unless left out), in one run: idle RSS of the instance's
processes, streamed greedy chat at c=1/4/16 (tok/s, TTFT p50), sentiment at c=16, RSS after the
load, and the teacher-forced logits of the stand-in model against float32 (the quality guard; make
eval gives the accuracy). Writes docs/cpu-precision.md and .json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import requests

from qaio_testing import REPO, GunicornServer

from .gpu_http import level, rss_mb, worker_processes
from .llama_cpp import cpu_flags
from .run import machine
from .texts import review_texts

CHAT_LEVELS = (1, 4, 16)


def serve(model: str, dtype: str, texts: list[str], max_tokens: int, requests_per_level: int) -> dict:
    server = GunicornServer(model, QAIO_DTYPE=dtype, QAIO_MAX_BATCH_SIZE="16").wait_ready(900)
    try:
        roles = worker_processes(server.proc.pid)
        ready = requests.get(server.url + "/readyz", timeout=30).json()
        out = {"dtype": dtype, "served_dtype": ready["dtype"], "dtype_measured": ready.get("dtype_measured"),
               "idle_rss_mb": rss_mb(roles)}
        for c in CHAT_LEVELS:
            chat = level(server, roles, "chat", texts[:max(c, requests_per_level * c // 4)], c, max_tokens, temperature=0)
            out[f"chat_c{c}"] = {"tokens_per_s": chat["output_tokens_per_s"], "ttft_p50_ms": chat["ttft_ms"]["p50"],
                                 "errors": chat["errors"]}
        sentiment = level(server, roles, "sentiment", texts[:4 * requests_per_level], 16, max_tokens)
        out["sentiment_c16"] = {"requests_per_s": sentiment["requests_per_s"], "errors": sentiment["errors"]}
        out["rss_after_load_mb"] = rss_mb(roles)
        return out
    finally:
        server.stop()


def logit_distance(model: str, dtype: str) -> dict:
    """The stand-in's teacher-forced logits in `dtype` against float32, over float32's greedy reply."""
    from qwen_worker.config import WorkerConfig
    from qwen_worker.engine.teacher import against_reference
    from qwen_worker.model import ModelService
    from qwen_worker.prompts import Message

    services = {d: ModelService(WorkerConfig.from_env({}, model=model, dtype=d)) for d in ("float32", dtype)}
    for service in services.values():
        service.load()
    fp32 = services["float32"]
    errors, agree, positions = [], 0, 0
    for text in ("Tell me about the weather in spring.", "给我讲讲这家外卖的优缺点。", "How do I cook rice?"):
        prompt = fp32.prompter.chat_ids([Message("user", text)])
        error, agreeing, count = against_reference(fp32.engine, services[dtype].engine, prompt, 48)
        errors.append(error)
        agree += agreeing
        positions += count
    return {"mean_abs_error_over_std": max(errors), "top1_agreement": agree / positions}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(REPO / "models" / "qwen2.5-0.5b-shape"))
    parser.add_argument("--stand-in", default=str(REPO / "models" / "smollm2-135m-instruct"))
    parser.add_argument("--dtypes", default="float32,int8,bfloat16,auto")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=16, help="chat requests at c=4 (scaled by concurrency)")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    texts = review_texts(4 * args.requests)
    dtypes = args.dtypes.split(",")
    report = {"date": time.strftime("%Y-%m-%d"), "machine": {**machine(), "cpu_flags": cpu_flags()},
              "model": Path(args.model).name, "max_tokens": args.max_tokens,
              "runs": [serve(args.model, d, texts, args.max_tokens, args.requests) for d in dtypes],
              "stand_in_logits": {d: logit_distance(args.stand_in, d) for d in dtypes if d not in ("float32", "auto")}}
    write(args.out, report)
    return 0


def write(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu-precision.json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    lines = ["# Weight precision on a CPU", "",
             f"`make cpu-precision`, {report['date']}, {m['cpu']} ({m['cores']} cores; {' '.join(m['cpu_flags'])}), "
             f"torch {m['torch']}, model `{report['model']}` (random weights, the real tokenizer), one worker "
             f"straight, QAIO_MAX_BATCH_SIZE=16, streamed greedy chat of {report['max_tokens']} tokens; the "
             "precisions one after another in one run. RSS: every process of the instance, from /proc.", "",
             "| QAIO_DTYPE | idle RSS MB | " + " | ".join(f"chat c={c} tok/s (TTFT p50 ms)" for c in CHAT_LEVELS)
             + " | sentiment c=16 req/s | RSS after load MB | errors |",
             "|---" * (5 + len(CHAT_LEVELS)) + "|"]
    for run in report["runs"]:
        chats = " | ".join(f"{run[f'chat_c{c}']['tokens_per_s']:.1f} ({run[f'chat_c{c}']['ttft_p50_ms']:.0f})"
                           for c in CHAT_LEVELS)
        errors = sum(run[f"chat_c{c}"]["errors"] for c in CHAT_LEVELS) + run["sentiment_c16"]["errors"]
        name = run["dtype"] if run["dtype"] != "auto" else f"auto (served {run['served_dtype']})"
        lines.append(f"| {name} | {run['idle_rss_mb']:.0f} | {chats} | {run['sentiment_c16']['requests_per_s']:.1f} "
                     f"| {run['rss_after_load_mb']:.0f} | {errors} |")
    lines += ["", "The stand-in (SmolLM2-135M-Instruct, real weights), teacher-forced over float32's greedy replies "
              "to three prompts (48 tokens each): the mean absolute logit error over the logits' standard "
              "deviation (the worst prompt), and how often the top token is float32's.", "",
              "| QAIO_DTYPE | logit error / std | top-1 agreement |", "|---|---|---|"]
    for dtype, d in report["stand_in_logits"].items():
        lines.append(f"| {dtype} | {d['mean_abs_error_over_std']:.4f} | {d['top1_agreement']:.1%} |")
    for run in report["runs"]:
        if run.get("dtype_measured"):
            measured = run["dtype_measured"]
            lines += ["", f"`auto`'s measurement at load ({measured['seconds']} s, each precision in a child process; "
                      "speed-up over float32, geometric mean over 1, 16 and 128 rows): "
                      + ", ".join(f"{d} {s}" for d, s in measured["speedup_over_float32"].items())
                      + f"; chose {measured['chosen']}."]
    (out / "cpu-precision.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
