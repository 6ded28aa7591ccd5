"""docs/benchmarks-gpu.md from the results of bench/gpu.py: the latest run in full, earlier runs listed."""
from __future__ import annotations

from pathlib import Path

TARGETS = [  # issue 19's targets on one H200 (chat tok/s over HTTP, 64-token streamed replies)
    ("chat c=1 tok/s", 400), ("chat c=64 tok/s", 12_000), ("chat c=256 tok/s", 25_000),
    ("sentiment c=256 prompts/s", 5_000), ("decode step b64 ms (graph alone)", 1.0)]


def _fmt(value, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:,.{digits}f}"


def _get(d: dict, *path):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _replay(engine: dict, batch: int):
    replay = engine.get("replay_ms") or {}
    shapes = sorted((int(k.split("_L")[1]), v) for k, v in replay.items() if k.startswith(f"b{batch}_"))
    return shapes[0][1] if shapes else None


ENGINE_ROWS = [
    ("load + warm-up s", lambda e: e.get("load_s"), 1), ("graph capture s", lambda e: e.get("graph_capture_s"), 1),
    ("decode graphs", lambda e: e.get("graphs"), 0),
    *[(f"graph replay alone b{b}, shortest length, ms", lambda e, b=b: _replay(e, b), 3) for b in (1, 64, 256)],
    *[(f"greedy b{b} tok/s", lambda e, b=b: _get(e, f"greedy_b{b}", "tokens_per_s"), 0) for b in (1, 4, 64, 256)],
    *[(f"decode step b{b} p50 ms (host + device)", lambda e, b=b: _get(e, f"greedy_b{b}", "decode_step_ms_p50"), 2)
      for b in (64, 256)],
    *[(f"host ms/step b64: {p}", lambda e, p=p: _get(e, "greedy_b64", "host_ms_per_step", p), 3)
      for p in ("launch", "wait", "book")],
    *[(f"sampled b{b} tok/s (t=0.7, top_p=0.9)", lambda e, b=b: _get(e, f"sampled_b{b}", "tokens_per_s"), 0)
      for b in (4, 64, 256)],
    ("sampling graphs (capture s)", lambda e: f"{e.get('sampling_graphs', 0)} ({_fmt(e.get('sampling_graph_capture_s'), 1)})", None),
    *[(f"default chat b{b} tok/s (penalty 1.1, t=0.7, top_p=0.9): sampling graphs / eager picks",
       lambda e, b=b: f"{_fmt(_get(e, f'default_b{b}', 'tokens_per_s'), 0)} / "
                      f"{_fmt(_get(e, f'default_b{b}_eager_picks', 'tokens_per_s'), 0)}", None) for b in (64, 256)],
    *[(f"default chat b256 host ms/step: {p}, graphs / eager",
       lambda e, p=p: f"{_fmt(_get(e, 'default_b256', 'host_ms_per_step', p), 3)} / "
                      f"{_fmt(_get(e, 'default_b256_eager_picks', 'host_ms_per_step', p), 3)}", None)
      for p in ("launch", "wait", "book")],
    *[(f"overlapped steps b{b} tok/s: greedy (same tokens) / default chat",
       lambda e, b=b: f"{_fmt(_get(e, f'greedy_b{b}_overlapped', 'tokens_per_s'), 0)} "
                      f"({_get(e, f'greedy_b{b}_overlapped', 'same_tokens')}) / "
                      f"{_fmt(_get(e, f'default_b{b}_overlapped', 'tokens_per_s'), 0)}", None) for b in (64, 256)],
    *[(f"overlapped greedy b256 host ms/step: {p}", lambda e, p=p: _get(e, "greedy_b256_overlapped", "host_ms_per_step", p), 3)
      for p in ("launch", "wait", "book")],
    ("sentiment b256 prompts/s", lambda e: e.get("sentiment_b256_per_s"), 0),
    ("prefill 3x300 first / second ms (new thread)",
     lambda e: f"{_fmt(_get(e, 'prefill_3x300_ms', 'first'), 1)} / {_fmt(_get(e, 'prefill_3x300_ms', 'second'), 1)}", None),
    ("sentiment b256 first / second ms (new thread)",
     lambda e: f"{_fmt(_get(e, 'sentiment_b256_ms', 'first'), 1)} / {_fmt(_get(e, 'sentiment_b256_ms', 'second'), 1)}", None),
    ("bf16 logit error vs fp32, mean: engine / transformers",
     lambda e: f"{_fmt(_get(e, 'logit_error', 'engine_mean'), 4)} / {_fmt(_get(e, 'logit_error', 'transformers_mean'), 4)}", None),
    ("engine's error within transformers' own", lambda e: _get(e, "logit_error", "engine_within_transformers"), 0),
]


def engine_section(engines: dict) -> list[str]:
    if not engines:
        return ["Not measured in this run."]
    names = list(engines)
    lines = ["| | " + " | ".join(f"`{n}`" for n in names) + " |", "| --- |" + " --- |" * len(names)]
    for label, get, digits in ENGINE_ROWS:
        values = [get(engines[n]) for n in names]
        if all(v is None for v in values):
            continue
        cells = [v if isinstance(v, str) else _fmt(v, digits or 0) for v in values]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def http_section(spec: str, http: dict) -> list[str]:
    lines = [f"### `{spec}` ({', '.join(http.get('processes', []))})", "",
             "| level | rate | TTFT p50 / p95 ms | latency p50 ms | errors | CPU s: engine / API / clients |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, unit in (("chat", "tok/s"), ("chat_sampled", "tok/s"), ("sentiment", "req/s")):
        for level in http.get(key, []):
            rate = level.get("output_tokens_per_s") if key != "sentiment" else level["requests_per_s"]
            ttft = level.get("ttft_ms") or {}
            cpu = level.get("cpu_s", {})
            lines.append(f"| {key} c={level['concurrency']} | {_fmt(rate)} {unit} | {_fmt(ttft.get('p50'))} / "
                         f"{_fmt(ttft.get('p95'))} | {_fmt(level['latency_ms']['p50'])} | {level['errors']} | "
                         f"{_fmt(cpu.get('engine'), 1)} / {_fmt(cpu.get('api'), 1)} / {_fmt(cpu.get('clients'), 1)} |")
    return lines


def _best(results: dict, kind: str, c: int):
    rates = [next((lv.get("output_tokens_per_s") if kind != "sentiment" else lv["requests_per_s"]
                   for lv in h.get(kind, []) if lv["concurrency"] == c), None) for h in results.get("http", {}).values()]
    rates = [r for r in rates if r is not None]
    return max(rates) if rates else None


def targets_section(results: dict) -> list[str]:
    step = [_replay(e, 64) for e in results.get("engine", {}).values()]
    step = min((s for s in step if s is not None), default=None)
    measured = [_best(results, "chat", 1), _best(results, "chat", 64), _best(results, "chat", 256),
                _best(results, "sentiment", 256), step]
    lines = ["| target | goal | best of this run |", "| --- | --- | --- |"]
    for (label, goal), value in zip(TARGETS, measured):
        lines.append(f"| {label} | {goal:,} | {_fmt(value, 3 if goal < 10 else 0)} |")
    return lines


def write(results: dict, out: Path) -> None:
    m = results["machine"]
    where = f"{m.get('gpu', 'no GPU')} ({m.get('gpu_memory_gib', '–')} GiB)" if m.get("gpu") else "a CPU (no GPU)"
    hw = results.get("hardware")
    lines = ["# GPU benchmark", "",
             f"The latest run of `make bench`'s GPU set (`python -m bench.gpu`, at most ~8 minutes) on {where}, "
             f"{m['cores']} CPU cores, torch {m['torch']} (CUDA {m.get('cuda')}), Triton {m.get('triton')}, "
             f"transformers {m['transformers']}, Python {m['python']}, {m['date']}. Model: `{results['model']}` "
             f"(random weights, real tokenizer) in bfloat16; chat replies {results['chat_max_tokens']} tokens. "
             "Every variant is `kernels/attention backend/sampling prefilter` (docs/settings.md: `QAIO_KERNELS`, "
             "`QAIO_SDPA_BACKEND`, `QAIO_SAMPLE_PREFILTER`).",
             ""]
    if results.get("smoke"):
        lines += ["**Smoke run (toy sizes): it shows the script works, not how fast anything is.**", ""]
    if results.get("note"):
        lines += [f"This run: {results['note']}", ""]
    if results.get("skipped") or results.get("failed"):
        lines += [f"Skipped for time: {', '.join(results.get('skipped', [])) or 'none'}. Failed: "
                  + ("; ".join(f"{k}: {v}" for k, v in results.get("failed", {}).items()) or "none") + ".", ""]
    if hw:
        lines += [f"Measured on this GPU: copy {hw['bandwidth_gbs']:,.0f} GB/s (read + write), bf16 matmul "
                  f"{hw['bf16_tflops']:,.0f} TFLOP/s.", ""]
    lines += ["## Targets", ""] + targets_section(results) + ["", "## The engine in-process", ""]
    lines += engine_section(results.get("engine", {}))
    sdpa = results.get("sdpa")
    if sdpa:
        lines += ["", "## Prefill attention backends (a 4 x 300-token masked call)", "",
                  "| backend | first call ms | first on a new thread ms | steady ms |", "| --- | --- | --- | --- |"]
        for name, r in sdpa.items():
            if name != "auto_kernels":
                lines.append(f"| {name} | " + (f"refused: {r['error']} | | |" if "error" in r else
                             f"{_fmt(r['first_ms'], 2)} | {_fmt(r['new_thread_first_ms'], 2)} | {_fmt(r['ms'], 3)} |"))
        lines += ["", f"Kernels `auto` ran: {', '.join(f'`{k}`' for k in sdpa.get('auto_kernels', []))}."]
    lines += ["", "## One worker over HTTP (the default GPU layout)", ""]
    for spec, http in results.get("http", {}).items():
        lines += http_section(spec, http) + [""]
    runs = sorted(p.name for p in (out / "gpu-runs").glob("*") if p.suffix in (".json", ".md"))
    lines += ["## Every run", "", "Each run's full results: " + ", ".join(f"[{r}](gpu-runs/{r})" for r in runs)
              + " (the 2026-11-24 H100 run is of the previous script, one process, before the engine-process "
              "layout). What each run changed and predicted: [gpu-engine-notes.md](gpu-engine-notes.md).", ""]
    (out / "benchmarks-gpu.md").write_text("\n".join(lines), encoding="utf-8")
