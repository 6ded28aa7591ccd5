"""docs/benchmarks.md and docs/benchmarks.png from one run's results."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file backend)

from . import llama_cpp, serving  # noqa: E402


def _row(level: dict, kind: str) -> list[str]:
    lat = level["latency_ms"]
    if kind == "sentiment":
        return [f"{level['requests_per_s']:.2f} prompts/s", f"{lat['p50']:.0f}", f"{lat['p95']:.0f}"]
    ttft = level["ttft_ms"]
    return [f"{level['output_tokens_per_s']:.1f} tok/s", f"{ttft['p50']:.0f}", f"{lat['p50']:.0f}", f"{lat['p95']:.0f}"]


def _rate(level: dict, kind: str) -> float:
    return level["requests_per_s"] if kind == "sentiment" else level["output_tokens_per_s"]


def _paired_row(label, left: dict, right: dict, kind: str, ratio: str) -> str:
    """One table row: a level measured two ways, side by side, then their throughput ratio."""
    return f"| {label} | " + " | ".join(_row(left, kind)) + " | " + " | ".join(_row(right, kind)) + f" | {ratio} |"


def _comparison(results: dict, kind: str) -> list[str]:
    """Table rows: this worker against the old design at each concurrency, with the throughput ratio."""
    return [_paired_row(ours["concurrency"], ours, old, kind, f"{_rate(ours, kind) / _rate(old, kind):.1f}×")
            for ours, old in zip(results["worker"][kind], results["baseline"][kind])]


def _mixed_lengths(results: dict) -> list[str]:
    mixed = results["worker"]["chat_mixed"]
    lengths = "/".join(map(str, results["mixed_max_tokens"]))
    return ["| load | this worker | TTFT p50 ms | p50 ms | p95 ms |", "| --- | --- | --- | --- | --- |",
            f"| c={mixed['concurrency']}, {mixed['requests']} requests of {lengths} tokens | "
            + " | ".join(_row(mixed, "chat")) + " |",
            "", "Every request joins the running batch at the next decode step and leaves it the step it "
            "ends (continuous batching over KV slots), so a short reply never waits for a long one."]


def write(results: dict, out: Path) -> None:
    m, hw, raw, roof = results["machine"], results["hardware"], results["raw"], results["roofline"]
    worker = results["worker"]
    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench` on {m['date']}, one run. Machine: {m['cpu']}, {m['cores']} cores, no GPU; "
        f"torch {m['torch']} ({m['torch_threads']} threads), transformers {m['transformers']}, Python {m['python']}. "
        f"Model: random weights of the exact Qwen2.5-0.5B-Instruct shape ({raw['parameters'] / 1e6:.0f} M "
        "parameters), float32: the real cost profile. Requests go over HTTP to one gunicorn instance, "
        "closed loop (each client sends its next request when the last is answered); sentiment texts are "
        "reviews from waimai_10k.csv; chat is greedy, streamed, "
        f"{results['chat_max_tokens']} output tokens. These machines are shared and noisy: compare ratios "
        "within this run, not with other runs." + (" **Quick run: too few requests to quote.**" if results["quick"] else ""),
        "",
        "- **this worker**: the engine (continuous batching over preallocated KV slots, attention over "
        "length buckets), sentiment by one pass over the label tokens with the fixed prompt prefix's keys "
        "and values reused, oneDNN prepacked linears, sampling for the whole batch at once.",
        "- **old design** (`bench/baseline_app.py`): one request at a time, sentiment by generating text "
        "(2 tokens: the least a real model needs) and parsing it, stock `generate`, default kernels.",
        "- **raw model**: this worker's model code in-process, batch 16, no HTTP, no queue.",
        f"- **roofline**: measured here: fp32 GEMM {hw['gemm_gflops']:.0f} GFLOP/s at the prefill shape, "
        f"memory read {hw['bandwidth_gbs']:.1f} GB/s. Sentiment is compute bound: "
        f"{raw['mean_prompt_tokens'] - raw['prefix_tokens']:.0f} own tokens per prompt on top of the "
        f"{raw['prefix_tokens']}-token cached prefix (mean prompt {raw['mean_prompt_tokens']:.0f} tokens). "
        "A decode step takes the longer of reading all weights and computing on them: memory bound at "
        "batch 1, compute bound at batch 16 on this CPU.",
        "",
        "## Sentiment",
        "",
        "| concurrency | this worker | p50 ms | p95 ms | old design | p50 ms | p95 ms | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *_comparison(results, "sentiment"),
    ]
    top = worker["sentiment"][-1]["requests_per_s"]
    lines += [
        "",
        f"Raw model, batch 16: {raw['sentiment_prompts_per_s_b16']:.2f} prompts/s. Roofline: "
        f"{roof['sentiment_prompts_per_s']:.1f} prompts/s with prefix reuse "
        f"({roof['sentiment_prompts_per_s_without_prefix_reuse']:.1f} without). This worker at c=16 reaches "
        f"{top / roof['sentiment_prompts_per_s']:.0%} of the roofline and "
        f"{top / raw['sentiment_prompts_per_s_b16']:.0%} of the raw model.",
        "",
        "## Chat (greedy, streamed)",
        "",
        "| concurrency | this worker | TTFT p50 ms | p50 ms | p95 ms | old design | TTFT p50 ms | p50 ms | p95 ms | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *_comparison(results, "chat"),
    ]
    top = worker["chat"][-1]["output_tokens_per_s"]
    lines += [
        "",
        f"Raw model: {raw['chat_tokens_per_s_b1']:.1f} tok/s at batch 1, {raw['chat_tokens_per_s_b16']:.1f} tok/s "
        f"at batch 16. Roofline: {roof['chat_tokens_per_s_b1']:.1f} tok/s at batch 1 (memory), "
        f"{roof['chat_tokens_per_s_b16']:.0f} tok/s at batch 16 (compute; attention and sampling not counted). "
        f"This worker at c=16: {top / roof['chat_tokens_per_s_b16']:.0%} of that roofline, "
        f"{top / raw['chat_tokens_per_s_b16']:.0%} of the raw model.",
        "",
        "## Chat: replies of mixed lengths",
        "",
        *_mixed_lengths(results),
        "",
        "## The serving layer's own ceiling",
        "",
        *serving.report_lines(results.get("serving")),
        "",
        "## Front door",
        "",
    ]
    fd = results["front_door"]
    lines += [
        f"Same sentiment requests (tiny model, distinct texts, interleaved), p50: direct to the worker "
        f"{fd['direct']['p50']:.2f} ms, through nginx {fd['nginx']['p50']:.2f} ms: nginx adds "
        f"**{fd['added_p50_ms']:.2f} ms**. A cache hit answers in {fd['cache_hit']['p50']:.2f} ms p50 "
        f"(p95 {fd['cache_hit']['p95']:.2f} ms) without reaching a worker.",
        "",
        "![throughput by concurrency](benchmarks.png)",
        "",
        "Raw numbers: `benchmarks.json`.",
        "",
    ]
    if results.get("llama_cpp"):
        lines += llama_cpp.section(results["llama_cpp"]) + [""]
    (out / "benchmarks.md").write_text("\n".join(lines), encoding="utf-8")
    _chart(results, out / "benchmarks.png")


def _chart(results: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, kind, unit, raw_key, roof_key in (
            (axes[0], "sentiment", "prompts/s", "sentiment_prompts_per_s_b16", "sentiment_prompts_per_s"),
            (axes[1], "chat", "output tokens/s", "chat_tokens_per_s_b16", "chat_tokens_per_s_b16")):
        levels = [lvl["concurrency"] for lvl in results["worker"][kind]]
        x = range(len(levels))
        ours = [_rate(lvl, kind) for lvl in results["worker"][kind]]
        old = [_rate(lvl, kind) for lvl in results["baseline"][kind]]
        ax.bar([i - 0.2 for i in x], ours, 0.4, label="this worker", color="#3a7")
        ax.bar([i + 0.2 for i in x], old, 0.4, label="old design", color="#bbb")
        ax.axhline(results["raw"][raw_key], color="#37a", linestyle="--", label="raw model, batch 16")
        ax.axhline(results["roofline"][roof_key], color="#a33", linestyle=":", label="roofline")
        ax.set_xticks(list(x), [f"c={c}" for c in levels])
        ax.set_ylabel(unit)
        ax.set_title(f"{kind} over HTTP, Qwen2.5-0.5B shape, CPU")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
