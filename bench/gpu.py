"""The GPU set of `make bench` (run when a GPU is present): docs/benchmarks-gpu.md, .json and .png.

On the Qwen2.5-0.5B-shape model in bf16, in one run: (a) this worker over HTTP, chat (64-token greedy
streamed replies) and sentiment at c=1/16/64/256; (b) the design it replaces (bench/baseline_app.py)
over HTTP; (c) transformers' own static-cache compiled `generate`, in-process, as the reference for
what this model does on this GPU; (d) the engine in-process; (e) a roofline from this GPU's measured
copy bandwidth and bf16 matmul rate.
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
from qwen_worker.testing import REPO, GunicornServer

from . import report_gpu, serving
from .load import chat_call, run_level_processes, sentiment_call
from .texts import review_texts

CHAT_TOKENS = 64
LEVELS = (1, 16, 64, 256)


def machine() -> dict:
    import transformers

    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2 ** 30, 1), "cores": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _event_time(fn, reps: int) -> float:
    """Seconds per call of fn, by CUDA events, after a warm-up."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / reps


def measure_hardware() -> dict:
    """Device copy bandwidth (bytes read + written) and the bf16 matmul rate, measured here."""
    src = torch.randn(256 * 2 ** 20, device="cuda")  # 1 GiB of float32, far beyond the caches
    dst = torch.empty_like(src)
    copy_s = _event_time(lambda: dst.copy_(src), 20)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_s = _event_time(lambda: a @ b, 20)
    del src, dst, a, b
    torch.cuda.empty_cache()
    return {"bandwidth_gbs": 2 * 2 ** 30 / copy_s / 1e9, "bf16_tflops": 2 * 8192 ** 3 / mm_s / 1e12}


def chat_prompts(service: ModelService, texts: list[str], count: int) -> list[list[int]]:
    return [service.prompter.chat_ids([Message("user", t)]) for t in texts[:count]]


def engine_in_process(model_dir: str, texts: list[str], compile: str = "off") -> dict:
    """The engine alone, no HTTP: every row admitted at once, 64 tokens each (the random-weight model
    rarely ends a reply early). Also the median decode step alone, by the engine's own clock."""
    service = ModelService(WorkerConfig.from_env({}, model=model_dir, max_batch_size=256, compile=compile))
    service.load()
    service.warmup()
    engine = service.engine
    steps_seen: list[tuple[float, int]] = []
    engine.observe_step = lambda seconds, rows, path: steps_seen.append((seconds, rows))
    result = {"graph_capture_s": engine.runner.capture_seconds, "graphs": len(engine.runner.graphs),
              "load_s": service.load_seconds, "compiled": engine.runner.compiled}
    for batch in (1, 64, 256):
        steps_seen.clear()
        rows = [GenerationRow(ids, CHAT_TOKENS) for ids in chat_prompts(service, texts, batch)]
        torch.cuda.synchronize()
        started = time.perf_counter()
        for row in rows:
            engine.add(row, lambda row, error: None)
        steps = 0
        while engine.has_work():
            engine.step()
            steps += 1
        elapsed = time.perf_counter() - started
        full = sorted(seconds for seconds, rows_in_step in steps_seen if rows_in_step == batch)
        result[f"chat_b{batch}"] = {"tokens_per_s": sum(len(r.tokens) for r in rows) / elapsed, "steps": steps,
                                    "seconds": elapsed, "decode_step_ms_p50": full[len(full) // 2] * 1000 if full else None}
        print(f"  batch {batch}: {result[f'chat_b{batch}']}", flush=True)
    prompts = [service.prompter.sentiment_ids(t, "zh") for t in texts[:256]]
    service.score_sentiment(prompts)
    torch.cuda.synchronize()
    reps = 10
    started = time.perf_counter()
    for _ in range(reps):
        service.score_sentiment(prompts)
    result["sentiment_b256_prompts_per_s"] = 256 * reps / (time.perf_counter() - started)
    print(f"  sentiment batch 256: {result['sentiment_b256_prompts_per_s']:.0f}/s", flush=True)
    result["prefix_tokens"] = len(service.prompter.sentiment_prefix_ids["zh"])
    result["mean_sentiment_prompt_tokens"] = sum(map(len, prompts)) / len(prompts)
    result["parameters"] = service.parameter_count
    config = service.model.config
    result["kv_bytes_per_token"] = (2 * config.num_hidden_layers * config.num_key_value_heads
                                    * (config.hidden_size // config.num_attention_heads) * 2)
    del service, engine
    torch.cuda.empty_cache()
    return result


def transformers_reference(model_dir: str, texts: list[str]) -> dict:
    """transformers' fastest path for this model: generate with a static cache, which it compiles
    (torch.compile, CUDA graphs), batch 1 and 64, 64 new tokens; the second call is timed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    result = {}
    for batch in (1, 64):
        messages = [[{"role": "user", "content": t}] for t in texts[:batch]]
        prompts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True).to("cuda")
        kwargs = dict(max_new_tokens=CHAT_TOKENS, min_new_tokens=CHAT_TOKENS, do_sample=False,
                      cache_implementation="static", pad_token_id=tokenizer.pad_token_id)
        for _ in range(2):  # the first call compiles
            torch.cuda.synchronize()
            started = time.perf_counter()
            model.generate(**inputs, **kwargs)
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
        result[f"chat_b{batch}_tokens_per_s"] = batch * CHAT_TOKENS / elapsed
    del model
    torch.cuda.empty_cache()
    return result


def roofline(hw: dict, engine: dict) -> dict:
    """A decode step must read every weight once and each row's keys and values: at batch b and
    context ~ (prompt + half the reply) tokens, b tokens per that time. Sentiment: FLOPs per text."""
    weight_bytes = engine["parameters"] * 2
    context = 40 + CHAT_TOKENS // 2
    rates = {}
    for batch in (1, 64, 256):
        seconds = max((weight_bytes + batch * context * engine["kv_bytes_per_token"]) / (hw["bandwidth_gbs"] * 1e9),
                      2 * engine["parameters"] * batch / (hw["bf16_tflops"] * 1e12))
        rates[f"chat_tokens_per_s_b{batch}"] = batch / seconds
    suffix = engine["mean_sentiment_prompt_tokens"] - engine["prefix_tokens"]
    rates["sentiment_prompts_per_s"] = hw["bf16_tflops"] * 1e12 / (2 * engine["parameters"] * suffix)
    return rates


def http_levels(model_dir: str, app: str, texts: list[str], levels, env: dict, chat_count, sentiment_count) -> dict:
    server = GunicornServer(model_dir, app=app, **env).wait_ready(900)
    name = app.split(":")[0]
    try:
        results = {"sentiment": [], "chat": []}
        run_level_processes("sentiment", server.url, texts[:64], 16, CHAT_TOKENS)  # warm the HTTP path
        for c in levels:
            level = run_level_processes("sentiment", server.url, texts[:sentiment_count(c)], c, CHAT_TOKENS)
            results["sentiment"].append(level)
            print(f"  {name} sentiment c={c}: {level['requests_per_s']:.1f}/s (errors {level['errors']})", flush=True)
        for c in levels:
            level = run_level_processes("chat", server.url, texts[100:100 + chat_count(c)], c, CHAT_TOKENS)
            results["chat"].append(level)
            print(f"  {name} chat c={c}: {level['output_tokens_per_s']:.0f} tok/s, TTFT p50 "
                  f"{level['ttft_ms']['p50']:.0f} ms (errors {level['errors']})", flush=True)
        return results
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(REPO / "models" / "qwen2.5-0.5b-shape"))
    parser.add_argument("--tiny-model", default=str(REPO / "models" / "tiny"), help="for the serving-layer ceiling")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--quick", action="store_true", help="fewer requests per level (a smoke run, not a result)")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: reference,baseline,engine,serving")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    texts = review_texts(4096)
    scale = 4 if args.quick else 1
    results = {"machine": machine(), "model": args.model, "chat_max_tokens": CHAT_TOKENS, "quick": args.quick}
    print("hardware...", flush=True)
    results["hardware"] = measure_hardware()
    if "engine" not in skip:
        print("engine in-process...", flush=True)
        results["engine"] = engine_in_process(args.model, texts)
        results["roofline"] = roofline(results["hardware"], results["engine"])
    print("this worker over HTTP...", flush=True)
    results["worker"] = http_levels(
        args.model, "qwen_worker:create_app()", texts, LEVELS, {},
        chat_count=lambda c: max(8, 4 * c // scale), sentiment_count=lambda c: max(64, 32 * c // scale))
    save(results, args.out)
    if "serving" not in skip:
        print("serving layer ceiling (tiny model)...", flush=True)
        results["serving"] = serving.measure(args.tiny_model, texts, 500 if args.quick else 4000)
        save(results, args.out)
    if "baseline" not in skip:
        print("the old design over HTTP...", flush=True)
        results["baseline"] = http_levels(
            args.model, "bench.baseline_app:create_app()", texts, (16,), {"QAIO_THREADS": "32"},
            chat_count=lambda c: 16, sentiment_count=lambda c: 64)
        save(results, args.out)
    if "reference" not in skip:  # last: its compilation takes minutes
        print("transformers static-cache generate...", flush=True)
        results["reference"] = transformers_reference(args.model, texts)
        save(results, args.out)
    return 0


def save(results: dict, out: Path) -> None:
    """Written after each part, so a run cut short still leaves what it measured."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks-gpu.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    report_gpu.write(results, out)
    print(f"wrote {out / 'benchmarks-gpu.md'}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
