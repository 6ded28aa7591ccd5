"""The GPU set of `make bench`: one prepared run of at most ~8 minutes that writes its results after
every phase (a run cut short keeps what it measured): docs/benchmarks-gpu.md and .json, and a copy of
the JSON per run under docs/gpu-runs/.

Phases: the machine (versions, copy bandwidth, bf16 matmul rate); which attention backend torch picks
for a prefill-shaped call and what each costs, first call on a new thread included; the engine
in-process per variant (`bench/gpu_engine.py`: graph capture, graph replay alone, host time per step
phase, first vs second prefill and sentiment pass on a new thread, greedy and sampled steps at 64 and
256, bf16 logit error against float32 next to transformers' own); then one worker over HTTP in the
default GPU layout per variant (`bench/gpu_http.py`), with each process's CPU seconds.
`--smoke` runs every phase the machine allows on the tiny model at toy sizes (the CPU test of this script).

A GPU slot is lent once, for minutes, so nothing here may waste it: a worker whose model fails to load
ends its phase at once (wait_ready reads /readyz's `failed`), engine variants are saved probe by probe,
the float32 reference loads inside a phase of its own, the run's output (run.log) and each worker's log
are written beside the results, the load clients are processes that import neither torch nor the
worker, and every wait has a timeout.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from qwen_worker.config import WorkerConfig
from qaio_testing import REPO

from . import gpu_engine, gpu_http, report_gpu
from .texts import review_texts

CHAT_TOKENS = gpu_engine.CHAT_TOKENS
ENGINE_VARIANTS = "torch,triton/efficient,triton/efficient/0/1024,triton/efficient/64,torch/efficient"
HTTP_VARIANTS = "torch,triton/efficient/0/1024"


def machine() -> dict:
    import transformers

    out = {"cores": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1))
    return out


def measure_hardware() -> dict:
    """Device copy bandwidth (bytes read + written) and the bf16 matmul rate, measured here."""
    src = torch.randn(256 * 2 ** 20, device="cuda")  # 1 GiB of float32, far beyond the caches
    dst = torch.empty_like(src)
    copy_ms = gpu_engine.event_ms(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = gpu_engine.event_ms(lambda: a @ b)
    del src, dst, a, b
    torch.cuda.empty_cache()
    return {"bandwidth_gbs": 2 * 2 ** 30 / copy_ms / 1e6, "bf16_tflops": 2 * 8192 ** 3 / mm_ms / 1e9}


def sdpa_probe() -> dict:
    """A prefill-shaped masked call as the engine makes it (4 rows x 300 tokens, 14 query heads folded
    onto 2 KV heads, 512 keys) under each backend: first call, first call on a new thread, steady ms."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows, kv_heads, group, tokens, keys, dim = 4, 2, 7, 300, 512, 64
    q = torch.randn(rows, kv_heads, group * tokens, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(rows, kv_heads, keys, dim, device="cuda", dtype=torch.bfloat16)
    mask = torch.zeros(rows, 1, group * tokens, keys, device="cuda", dtype=torch.bfloat16)
    mask[..., 400:] = float("-inf")
    out = {}
    for name, backend in (("auto", None), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("math", SDPBackend.MATH)):
        def call():
            with contextlib.nullcontext() if backend is None else sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, k, attn_mask=mask)

        def first_ms():
            gpu_engine.synchronize()
            started = time.perf_counter()
            call()
            gpu_engine.synchronize()
            return (time.perf_counter() - started) * 1000

        try:
            out[name] = {"first_ms": first_ms(), "new_thread_first_ms": gpu_engine.on_a_new_thread(first_ms),
                         "ms": gpu_engine.event_ms(call)}
        except RuntimeError as exc:
            out[name] = {"error": str(exc).splitlines()[0][:200]}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(q, k, k, attn_mask=mask)
        gpu_engine.synchronize()
    out["auto_kernels"] = sorted({e.key for e in prof.key_averages()})[:8]
    return out


def reference_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()


def http_env(spec: str, smoke: bool) -> dict:
    env = {WorkerConfig.env_name(k): str(v) for k, v in gpu_engine.variant_settings(spec).items()}
    if smoke:  # the GPU layout on a CPU: an engine process beside two API processes
        env.update(QAIO_ENGINE_PROCESS="on", QAIO_WORKERS="2", QAIO_MAX_BATCH_SIZE="4", QAIO_TORCH_THREADS="1")
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "qwen2.5-0.5b-shape"))
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--engine-variants", default=ENGINE_VARIANTS)
    parser.add_argument("--http-variants", default=HTTP_VARIANTS)
    parser.add_argument("--budget-s", type=float, default=450, help="phases that would start past this are skipped")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, every phase this machine allows")
    parser.add_argument("--note", default="", help="what this run is of (the change measured), for the report")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "run.log", "a", encoding="utf-8") as log, \
            contextlib.redirect_stdout(Tee(sys.stdout, log)), contextlib.redirect_stderr(Tee(sys.stderr, log)):
        return run(args)


class Tee:
    """Writes to a stream and a log file: the run's own output comes back under $OUT with its results."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def run(args) -> int:
    started = time.monotonic()
    cuda = torch.cuda.is_available()
    texts = review_texts(4096)
    results = {"machine": machine(), "model": args.model, "chat_max_tokens": CHAT_TOKENS, "smoke": args.smoke,
               "note": args.note, "engine": {}, "http": {}, "skipped": []}

    def phase(name: str, reserve_s: float, fn) -> None:
        """Run fn unless fewer than reserve_s of the budget are left; a failing phase is recorded, not fatal."""
        if time.monotonic() - started + reserve_s > args.budget_s:
            results["skipped"].append(name)
            print(f"skipped {name}: budget", flush=True)
            return
        print(f"{name}...", flush=True)
        try:
            fn()
        except Exception as exc:  # keep the run: the next phases may still measure
            results.setdefault("failed", {})[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(f"  {name} failed: {exc}", flush=True)
        save(results, args.out)

    if cuda:
        phase("hardware", 10, lambda: results.update(hardware=measure_hardware()))
        phase("sdpa", 10, lambda: results.update(sdpa=sdpa_probe()))
    reference = {}  # the float32 model the logit errors compare with: a failed load skips only them
    if cuda:
        phase("reference", 30, lambda: reference.update(model=reference_model(args.model)))
    batches, tokens, sentiment = ((4,), 6, (4, 2)) if args.smoke else ((64, 256), CHAT_TOKENS, (256, 10))
    for spec in filter(None, args.engine_variants.split(",")):
        phase(f"engine {spec}", 40, lambda spec=spec: gpu_engine.measure_variant(
            args.model, spec, texts, reference.get("model"), batches, tokens,
            result=results["engine"].setdefault(spec, {}), on_probe=lambda: save(results, args.out),
            sentiment=sentiment))
    reference.clear()
    levels = dict(chat_levels=(1, 4), sampled_levels=(4,), sentiment_levels=(4,), scale=8) if args.smoke else \
        dict(chat_levels=(1, 64, 256), sampled_levels=(64, 256), sentiment_levels=(16, 256))
    for spec in filter(None, args.http_variants.split(",")):
        def http(spec=spec):
            results["http"][spec] = {}
            gpu_http.measure(args.model, texts, http_env(spec, args.smoke), max_tokens=CHAT_TOKENS,
                             log_path=args.out / f"worker-{spec.replace('/', '-')}.log",
                             on_level=lambda partial: (results["http"].__setitem__(spec, partial),
                                                       save(results, args.out)), **levels)
        phase(f"http {spec}", 90, http)
    results["seconds"] = time.monotonic() - started
    save(results, args.out)
    return 0


def save(results: dict, out: Path) -> None:
    """Written after each phase: the report, its JSON, and this run's JSON kept under gpu-runs/."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2) + "\n"
    (out / "benchmarks-gpu.json").write_text(text, encoding="utf-8")
    runs = out / "gpu-runs"
    runs.mkdir(exist_ok=True)
    name = f"{results['machine']['date'][:16].replace(' ', 'T').replace(':', '')}-" \
           f"{(results['machine'].get('gpu') or 'cpu').split()[-1].lower()}.json"
    (runs / name).write_text(text, encoding="utf-8")
    report_gpu.write(results, out)


if __name__ == "__main__":
    raise SystemExit(main())
