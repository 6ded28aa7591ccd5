"""docs/benchmarks-gpu.md and .png from the results of bench/gpu.py."""
from __future__ import annotations

from pathlib import Path

from . import serving


def _level(levels: list[dict], c: int) -> dict | None:
    return next((level for level in levels if level["concurrency"] == c), None)


def _fmt(value, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def write(results: dict, out: Path) -> None:
    m, hw = results["machine"], results["hardware"]
    worker = results["worker"]
    lines = [
        "# GPU benchmark",
        "",
        f"One run of `make bench` (bench/gpu.py) on {m['gpu']} ({m['gpu_memory_gib']} GiB), {m['cores']} CPU cores, "
        f"torch {m['torch']} (CUDA {m['cuda']}), transformers {m['transformers']}, Python {m['python']}, {m['date']}. "
        f"Model: the Qwen2.5-0.5B shape (random weights, real tokenizer) in bfloat16. Chat: {results['chat_max_tokens']}"
        "-token greedy streamed replies; sentiment: waimai reviews. Every HTTP figure is one gunicorn worker "
        "process, measured by closed-loop clients in several processes on the same machine."
        + (" **Quick run: too few requests per level to quote.**" if results.get("quick") else ""),
        "",
        f"Measured on this GPU: copy bandwidth {hw['bandwidth_gbs']:,.0f} GB/s (read + write), bf16 matmul "
        f"{hw['bf16_tflops']:,.0f} TFLOP/s.",
        "",
        "## This worker over HTTP",
        "",
        "| concurrency | chat tok/s | chat TTFT p50 ms | chat TTFT p95 ms | chat latency p50 ms | sentiment /s | "
        "sentiment p50 ms | sentiment p95 ms | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for chat in worker["chat"]:
        c = chat["concurrency"]
        sent = _level(worker["sentiment"], c) or {}
        lines.append(
            f"| {c} | {_fmt(chat['output_tokens_per_s'])} | {_fmt(chat['ttft_ms']['p50'])} | "
            f"{_fmt(chat['ttft_ms']['p95'])} | {_fmt(chat['latency_ms']['p50'])} | "
            f"{_fmt(sent.get('requests_per_s'))} | {_fmt(sent.get('latency_ms', {}).get('p50'))} | "
            f"{_fmt(sent.get('latency_ms', {}).get('p95'))} | {chat['errors'] + sent.get('errors', 0)} |")
    if results.get("serving"):
        lines += ["", "## The serving layer's own ceiling", "", *serving.report_lines(results["serving"])]
    if results.get("baseline"):
        base = results["baseline"]
        b_chat, b_sent = _level(base["chat"], 16), _level(base["sentiment"], 16)
        w_chat, w_sent = _level(worker["chat"], 16), _level(worker["sentiment"], 16)
        lines += ["", "## Against the design it replaces (c=16, same GPU)", "",
                  "| | old design | this worker | ratio |", "| --- | --- | --- | --- |",
                  f"| chat tok/s | {_fmt(b_chat['output_tokens_per_s'], 1)} | {_fmt(w_chat['output_tokens_per_s'])} | "
                  f"{w_chat['output_tokens_per_s'] / max(b_chat['output_tokens_per_s'], 1e-9):,.0f}x |",
                  f"| sentiment /s | {_fmt(b_sent['requests_per_s'], 1)} | {_fmt(w_sent['requests_per_s'])} | "
                  f"{w_sent['requests_per_s'] / max(b_sent['requests_per_s'], 1e-9):,.0f}x |"]
    if "engine" in results:
        e, roof = results["engine"], results["roofline"]
        ref = results.get("reference", {})
        lines += ["", "## In-process: the engine, transformers' best path, the roofline", "",
                  f"The engine captured {e['graphs']} decode graphs in {e['graph_capture_s']:.1f} s at start-up "
                  f"(model load + capture {e['load_s']:.1f} s).", "",
                  "| | engine in-process | transformers `generate(cache_implementation=\"static\")` | roofline |",
                  "| --- | --- | --- | --- |"]
        for b in (1, 64, 256):
            lines.append(f"| chat batch {b}, tok/s | {_fmt(e[f'chat_b{b}']['tokens_per_s'])} | "
                         f"{_fmt(ref.get(f'chat_b{b}_tokens_per_s'))} | {_fmt(roof[f'chat_tokens_per_s_b{b}'])} |")
        lines.append(f"| sentiment batch 256, prompts/s | {_fmt(e['sentiment_b256_prompts_per_s'])} | – | "
                     f"{_fmt(roof['sentiment_prompts_per_s'])} |")
        lines += ["", "Roofline: a decode step reads every weight once plus each row's keys and values at this "
                  "GPU's copy bandwidth, or computes 2 x parameters FLOPs per row at its matmul rate, whichever "
                  "is slower; sentiment is FLOPs per text (its own tokens, the prefix is cached) at the matmul rate."]
    (out / "benchmarks-gpu.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plot(results, out / "benchmarks-gpu.png")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worker = results["worker"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    cs = [level["concurrency"] for level in worker["chat"]]
    left.plot(cs, [level["output_tokens_per_s"] for level in worker["chat"]], "o-", label="this worker (HTTP)")
    left.set(xscale="log", xlabel="concurrent streams", ylabel="output tokens/s", title="chat, 64-token replies")
    left.set_xticks(cs, [str(c) for c in cs])
    right.plot([level["concurrency"] for level in worker["sentiment"]],
               [level["requests_per_s"] for level in worker["sentiment"]], "o-", label="this worker (HTTP)")
    right.set(xscale="log", xlabel="concurrent clients", ylabel="texts/s", title="sentiment")
    right.set_xticks(cs, [str(c) for c in cs])
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
