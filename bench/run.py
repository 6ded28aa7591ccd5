"""`make bench`: one run, one report. On a CPU: docs/benchmarks.md, .json and .png; with a GPU present,
the GPU set instead (bench/gpu.py: docs/benchmarks-gpu.md).

Compares, on the Qwen2.5-0.5B-shape model in one run: (a) this worker over HTTP, chat also with
replies of mixed lengths, (b) the design it replaces (bench/baseline_app.py) over HTTP, (c) the raw
model in-process with this worker's engine, and (d) a roofline estimate from this machine's measured
GEMM rate and memory bandwidth.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from qwen_worker.config import WorkerConfig
from qwen_worker.engine import GenerationRow
from qwen_worker.model import ModelService
from qwen_worker.prompts import Message
from qaio_testing import REPO, GunicornServer

from . import front_door, llama_cpp, report, serving
from .load import run_level
from .texts import review_texts

CHAT_TOKENS = 32
LEVELS = (1, 4, 16)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def measure_hardware() -> dict:
    """fp32 GEMM rate at the worker's prefill shape (oneDNN prepacked) and memory bandwidth (copy)."""
    from qwen_worker.cpu_linear import PackedLinear, onednn_available

    linear = torch.nn.Linear(896, 4864, bias=False)
    x = torch.randn(512, 896)
    layer = PackedLinear(linear) if onednn_available() else linear
    with torch.inference_mode():
        layer(x)
        started, reps = time.perf_counter(), 20
        for _ in range(reps):
            layer(x)
        gflops = 2 * 512 * 896 * 4864 * reps / (time.perf_counter() - started) / 1e9
    weights = torch.ones(512 * 1024 * 1024 // 4)  # 512 MB, far beyond the caches, read like weights are
    weights.sum()
    started, reps = time.perf_counter(), 5
    for _ in range(reps):
        weights.sum()
    bandwidth = weights.numel() * 4 * reps / (time.perf_counter() - started) / 1e9
    return {"gemm_gflops": gflops, "bandwidth_gbs": bandwidth}


def raw_ceiling(model_dir: str, texts: list[str]) -> dict:
    """This worker's model code in-process, no HTTP: the most the serving layer could pass on."""
    service = ModelService(WorkerConfig.from_env({}, model=model_dir))
    service.load()
    prompts = [service.prompter.sentiment_ids(t, "zh") for t in texts[:48]]
    service.score_sentiment(prompts[:4])
    started = time.perf_counter()
    for i in range(0, 48, 16):
        service.score_sentiment(prompts[i:i + 16])
    sentiment_rate = 48 / (time.perf_counter() - started)
    result = {"sentiment_prompts_per_s_b16": sentiment_rate,
              "prefix_tokens": len(service.prompter.sentiment_prefix_ids["zh"]),
              "mean_prompt_tokens": sum(map(len, prompts)) / len(prompts),
              "parameters": service.parameter_count,
              "head_parameters": service.model.config.vocab_size * service.model.config.hidden_size}
    for batch in (1, 16):
        rows = [GenerationRow(service.prompter.chat_ids([Message("user", t)]), CHAT_TOKENS) for t in texts[:batch]]
        started = time.perf_counter()
        service.engine.run(rows)
        result[f"chat_tokens_per_s_b{batch}"] = sum(len(r.tokens) for r in rows) / (time.perf_counter() - started)
    return result


def roofline(hw: dict, raw: dict) -> dict:
    """Sentiment: FLOPs per prompt at the GEMM rate. A decode step: the slower of reading every weight
    and computing 2 x parameters FLOPs per row; at batch 16 the compute side binds on this CPU."""
    body = raw["parameters"] - raw["head_parameters"]  # embeddings are looked up, not multiplied
    suffix = raw["mean_prompt_tokens"] - raw["prefix_tokens"]
    head = 2 * raw["head_parameters"]  # the head runs for the last position only
    flops_reused = 2 * body * suffix + head
    flops_full = 2 * body * raw["mean_prompt_tokens"] + head
    weight_seconds = raw["parameters"] * 4 / (hw["bandwidth_gbs"] * 1e9)

    def step_seconds(batch: int) -> float:
        return max(weight_seconds, 2 * raw["parameters"] * batch / (hw["gemm_gflops"] * 1e9))

    return {"sentiment_prompts_per_s": hw["gemm_gflops"] * 1e9 / flops_reused,
            "sentiment_prompts_per_s_without_prefix_reuse": hw["gemm_gflops"] * 1e9 / flops_full,
            "chat_tokens_per_s_b1": 1 / step_seconds(1),
            "chat_tokens_per_s_b16": 16 / step_seconds(16)}


MIXED_TOKENS = (8, 16, 32, 64)  # replies of different lengths: where static and continuous batching differ
MIXED_REQUESTS = 32


def http_levels(model_dir: str, app: str, texts: list[str], counts: dict, env: dict,
                sentiment: bool = True, mixed: bool = False) -> dict:
    server = GunicornServer(model_dir, app=app, **env).wait_ready(600)
    name = app.split(":")[0]
    try:
        results = {"sentiment": [], "chat": []}
        run_level("sentiment", server.url, texts[:4], 2)  # warm the HTTP path
        for c in LEVELS if sentiment else ():
            level = run_level("sentiment", server.url, texts[:counts["sentiment"][c]], c)
            results["sentiment"].append(level.summary())
            print(f"  {name} sentiment c={c}: {results['sentiment'][-1]['requests_per_s']:.2f}/s", flush=True)
        for c in LEVELS:
            level = run_level("chat", server.url, texts[100:100 + counts["chat"][c]], c, CHAT_TOKENS)
            results["chat"].append(level.summary())
            print(f"  {name} chat c={c}: {results['chat'][-1]['output_tokens_per_s']:.1f} tok/s", flush=True)
        if mixed:
            work = [(texts[100 + i], MIXED_TOKENS[i % len(MIXED_TOKENS)]) for i in range(counts["mixed"])]
            level = run_level("chat", server.url, work, LEVELS[-1])
            results["chat_mixed"] = level.summary()
            print(f"  {name} chat mixed lengths c={LEVELS[-1]}: "
                  f"{results['chat_mixed']['output_tokens_per_s']:.1f} tok/s", flush=True)
        return results
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    if torch.cuda.is_available() and not os.environ.get("QAIO_BENCH_CPU"):
        from . import gpu

        return gpu.main(argv)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(REPO / "models" / "qwen2.5-0.5b-shape"))
    parser.add_argument("--tiny-model", default=str(REPO / "models" / "tiny"), help="for the nginx overhead")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--quick", action="store_true", help="few requests per level (a smoke run, not a result)")
    args = parser.parse_args(argv)
    scale = 4 if args.quick else 1
    counts = {"sentiment": {1: 8 // scale, 4: 16 // scale, 16: 48 // scale},
              "chat": {1: 2, 4: max(8 // scale, 4), 16: 16}, "mixed": MIXED_REQUESTS // scale}
    texts = review_texts(200)
    results = {"machine": machine(), "model": args.model, "chat_max_tokens": CHAT_TOKENS, "quick": args.quick,
               "mixed_max_tokens": MIXED_TOKENS}
    print("hardware...", flush=True)
    results["hardware"] = measure_hardware()
    print("raw model...", flush=True)
    results["raw"] = raw_ceiling(args.model, texts)
    results["roofline"] = roofline(results["hardware"], results["raw"])
    print("this worker over HTTP...", flush=True)
    results["worker"] = http_levels(args.model, "qwen_worker:create_app()", texts, counts, {}, mixed=True)
    print("the old design over HTTP...", flush=True)
    results["baseline"] = http_levels(args.model, "bench.baseline_app:create_app()", texts, counts, {})
    print("serving layer ceiling (tiny model)...", flush=True)
    results["serving"] = serving.measure(args.tiny_model, review_texts(2000), 400 if args.quick else 2000)
    print("nginx overhead...", flush=True)
    results["front_door"] = front_door.measure(args.tiny_model, 50 if args.quick else 200)
    if not args.quick:
        print("llama.cpp side by side...", flush=True)
        results["llama_cpp"] = llama_cpp.measure(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmarks.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    report.write(results, args.out)
    print(f"wrote {args.out / 'benchmarks.md'} and {args.out / 'benchmarks.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
