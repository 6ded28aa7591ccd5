"""The engine in-process on a GPU, for bench/gpu.py: one variant (kernels / attention backend /
sampling prefilter) per load, each probe timed by CUDA events or by the engine's own clock.

A variant is written `kernels[/sdpa_backend[/prefilter[/candidates]]]`, e.g. `torch`, `triton/efficient/64`,
`torch/auto/0/1024`.
"""
from __future__ import annotations

import statistics
import threading
import time

import torch

from qwen_worker.config import WorkerConfig
from qwen_worker.engine import GenerationRow
from qwen_worker.engine.model_runner import PrefillChunk
from qwen_worker.engine.teacher import reference_logits, teacher_forced_logits
from qwen_worker.model import ModelService
from qwen_worker.prompts import Message
from qwen_worker.sampling import SamplingParams

CHAT_TOKENS = 64
SAMPLED = dict(temperature=0.7, top_p=0.9)
DEFAULT_CHAT = dict(SAMPLED, repetition_penalty=1.1)  # what a chat request without settings gets


def variant_settings(spec: str) -> dict:
    parts = spec.split("/")
    settings = {"kernels": parts[0]}
    if len(parts) > 1 and parts[1]:
        settings["sdpa_backend"] = parts[1]
    if len(parts) > 2 and parts[2]:
        settings["sample_prefilter"] = int(parts[2])
    if len(parts) > 3 and parts[3]:
        settings["sample_candidates"] = int(parts[3])
    return settings


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def event_ms(fn, reps: int = 20) -> float:
    """Milliseconds per call of fn by CUDA events, after one untimed call."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    synchronize()
    return start.elapsed_time(end) / reps


def load(model_dir: str, spec: str, batch: int) -> tuple[ModelService, dict]:
    started = time.perf_counter()
    service = ModelService(WorkerConfig.from_env({}, model=model_dir, max_batch_size=batch, **variant_settings(spec)))
    service.load()
    service.warmup()
    runner, picks = service.engine.runner, service.engine.picker.graphs
    return service, {"load_s": time.perf_counter() - started, "graph_capture_s": runner.capture_seconds,
                     "graphs": len(runner.graphs), "sampling_graphs": len(picks.graphs) if picks else 0,
                     "sampling_graph_capture_s": picks.capture_seconds if picks else 0.0}


def replay_ms(runner) -> dict:
    """Each decode graph alone (no host work) at a few (batch, attend) shapes."""
    out = {}
    for (n, attend), (graph, _, _) in sorted(runner.graphs.items()):
        if n in (1, 64, 256) and attend in (min(runner.decode_attend_lengths), max(runner.decode_attend_lengths), 512):
            out[f"b{n}_L{attend}"] = event_ms(graph.replay)
    return out


def chat_rows(service, texts, batch: int, tokens: int, **sampling) -> list[GenerationRow]:
    return [GenerationRow(service.prompter.chat_ids([Message("user", t)]), tokens, SamplingParams(**sampling))
            for t in texts[:batch]]


def steps(service, texts, batch: int, tokens: int = CHAT_TOKENS, **sampling) -> dict:
    """Every row admitted at once, `tokens` each: tokens/s, the median full-batch decode step and the
    host's time per step in each phase (launch, wait on the device, bookkeeping)."""
    engine = service.engine
    seen: list[float] = []
    engine.observe_step = lambda seconds, rows, path: seen.append(seconds) if rows == batch else None
    rows = chat_rows(service, texts, batch, tokens, **sampling)
    engine.phase_seconds = {}
    synchronize()
    started = time.perf_counter()
    for row in rows:
        engine.add(row, lambda row, error: None)
    count = 0
    while engine.has_work():
        engine.step()
        count += 1
    elapsed = time.perf_counter() - started
    phases, engine.phase_seconds = engine.phase_seconds, None
    return {"tokens_per_s": sum(len(r.tokens) for r in rows) / elapsed, "steps": count, "seconds": elapsed,
            "tokens_digest": hash(tuple(tuple(r.tokens) for r in rows)),  # greedy runs compare their tokens
            "decode_step_ms_p50": statistics.median(seen) * 1000 if seen else None,
            "host_ms_per_step": {k: v * 1000 / max(1, count) for k, v in phases.items()}}


def on_a_new_thread(fn):
    """fn() on a thread that has run nothing yet, as the engine thread is: per-thread caches start cold."""
    box = {}
    thread = threading.Thread(target=lambda: box.update(result=fn()))
    thread.start()
    thread.join()
    return box["result"]


def firsts(service, texts, sentiment_batch: int = 256) -> dict:
    """A prefill shape and a sentiment batch the warm-up did not use, first and second call, on a new thread."""
    runner = service.engine.runner
    prompt = service.prompter.chat_ids([Message("user", texts[0] * 3)])[:300]

    def timed(fn) -> float:
        synchronize()
        started = time.perf_counter()
        fn()
        synchronize()
        return (time.perf_counter() - started) * 1000

    def prefill_twice():
        chunks = [PrefillChunk(slot, prompt, 0) for slot in range(3)]
        return [timed(lambda: runner.prefill(chunks)) for _ in range(2)]

    prompts = [service.prompter.sentiment_ids(t, "zh") for t in texts[:sentiment_batch]]

    def score_twice():
        return [timed(lambda: service.score_sentiment(prompts)) for _ in range(2)]

    prefill = on_a_new_thread(prefill_twice)
    sentiment = on_a_new_thread(score_twice)
    return {"prefill_3x300_ms": {"first": prefill[0], "second": prefill[1]},
            "sentiment_b256_ms": {"first": sentiment[0], "second": sentiment[1]}}


def sentiment_rate(service, texts, reps: int = 10, batch: int = 256) -> float:
    prompts = [service.prompter.sentiment_ids(t, "zh") for t in texts[:batch]]
    service.score_sentiment(prompts)
    synchronize()
    started = time.perf_counter()
    for _ in range(reps):
        service.score_sentiment(prompts)
    return batch * reps / (time.perf_counter() - started)


def errors_against_float32(service, texts, reference_model) -> dict:
    """Teacher-forced logits of this variant and of transformers itself in the variant's dtype,
    each against transformers in float32: max and mean absolute error."""
    rows, lengths = [], []
    generator = torch.Generator().manual_seed(5)
    for text in texts[:4]:
        prompt = service.prompter.chat_ids([Message("user", text)])
        rows.append(prompt + torch.randint(0, 150000, (24,), generator=generator).tolist())
        lengths.append(len(prompt))
    engine = teacher_forced_logits(service.engine, rows, lengths)
    out = {"engine_max": 0.0, "engine_mean": 0.0, "transformers_max": 0.0, "transformers_mean": 0.0}
    for row, n, got in zip(rows, lengths, engine):
        want = reference_logits(reference_model, row, n)
        same_dtype = reference_logits(service.model, row, n)
        for name, value in (("engine", got), ("transformers", same_dtype)):
            error = (value - want).abs()
            out[f"{name}_max"] = max(out[f"{name}_max"], error.max().item())
            out[f"{name}_mean"] += error.mean().item() / len(rows)
    out["engine_within_transformers"] = out["engine_mean"] <= 1.1 * out["transformers_mean"]
    return out


def measure_variant(model_dir: str, spec: str, texts: list[str], reference_model=None, batches=(64, 256),
                    tokens: int = CHAT_TOKENS, result: dict | None = None, on_probe=None,
                    sentiment: tuple[int, int] = (256, 10)) -> dict:
    """Fills `result` probe by probe, calling on_probe() after each (a run cut short keeps them).
    `sentiment`: (batch, repetitions) of the sentiment probes (the keys keep saying b256: a smoke run's
    toy batch passes through the Triton interpreter on a CPU, where 256 prompts would take the hour)."""
    result = {} if result is None else result
    on_probe = on_probe or (lambda: None)
    service, loaded = load(model_dir, spec, max(batches))
    result.update(loaded, decode_attention="triton kernel" if spec.split("/")[0] == "triton" else
                  f"torch sdpa ({service.engine.runner.sdpa_backend})")
    on_probe()
    try:
        result["replay_ms"] = replay_ms(service.engine.runner) if torch.cuda.is_available() else {}
        result.update(firsts(service, texts, sentiment[0]))
        on_probe()
        for batch in (1, *batches):
            result[f"greedy_b{batch}"] = steps(service, texts, batch, tokens)
            on_probe()
        for batch in batches:
            result[f"sampled_b{batch}"] = steps(service, texts, batch, tokens, **SAMPLED)
            on_probe()
        picker = service.engine.picker
        for batch in batches:  # the default chat with its picks in the sampling graphs, then eager (same load)
            result[f"default_b{batch}"] = steps(service, texts, batch, tokens, **DEFAULT_CHAT)
            graphs, picker.graphs = picker.graphs, None
            try:
                result[f"default_b{batch}_eager_picks"] = steps(service, texts, batch, tokens, **DEFAULT_CHAT)
            finally:
                picker.graphs = graphs
            on_probe()
        for batch in batches:  # overlapped steps (QAIO_OVERLAP_STEPS), same load: greedy must keep its tokens
            # against a run read back at once over the same prefix cache (the first run filled it)
            read_at_once = steps(service, texts, batch, tokens)
            service.engine.decoder.set_overlap(True)
            try:
                result[f"greedy_b{batch}_overlapped"] = overlapped = steps(service, texts, batch, tokens)
                overlapped["same_tokens"] = overlapped["tokens_digest"] == read_at_once["tokens_digest"]
                result[f"default_b{batch}_overlapped"] = steps(service, texts, batch, tokens, **DEFAULT_CHAT)
            finally:
                service.engine.decoder.set_overlap(False)
            on_probe()
        result["sentiment_b256_per_s"] = sentiment_rate(service, texts, reps=sentiment[1], batch=sentiment[0])
        on_probe()
        if reference_model is not None:
            result["logit_error"] = errors_against_float32(service, texts, reference_model)
            on_probe()
        return result
    finally:
        del service
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
