"""llama.cpp beside this worker on the same weights, prompts and client (part of `make bench`; alone:
`python -m bench.llama_cpp`, which puts its section into docs/benchmarks.md and .json).

The 0.5B-shape checkpoint converted to GGUF by llama.cpp's own converter (f32 and Q8_0), served by its
llama-server with 16 parallel slots and continuous batching on every core; this worker in float32,
int8 and bfloat16 (QAIO_DTYPE). The same streamed greedy chats through /v1/chat/completions (bench.load's
openai_chat client) at c=1/4/16: output tokens/s and TTFT p50, and each server's RSS (every process,
from /proc) at idle and after the load. ratio_c1 and ratio_c16: our best tok/s over llama.cpp Q8_0's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qaio_testing import REPO, GunicornServer, free_port, wait_for

from .gpu_http import rss_mb, worker_processes
from .load import run_level_processes
from .texts import review_texts

LLAMA_CPP = REPO / "build" / "llama.cpp"
LEVELS = {1: 4, 4: 8, 16: 32}  # concurrency: chats
MAX_TOKENS = 64
BEGIN, END = "<!-- llama.cpp side by side: begin -->", "<!-- llama.cpp side by side: end -->"


def gguf(model: str, outtype: str, out_dir: Path) -> Path:
    """The checkpoint converted by llama.cpp's convert_hf_to_gguf.py (f32, q8_0)."""
    path = out_dir / f"{Path(model).name}-{outtype}.gguf"
    if not path.exists():
        subprocess.run([sys.executable, str(LLAMA_CPP / "src" / "convert_hf_to_gguf.py"), model, "--outtype", outtype,
                        "--outfile", str(path)], check=True, capture_output=True)
    return path


class LlamaServer:
    def __init__(self, model: Path, threads: int, binary: str = "llama-server"):
        self.binary = binary
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [str(LLAMA_CPP / "bin" / binary), "-m", str(model), "-t", str(threads), "-np", "16", "-cb",
             "-c", str(16 * 1024), "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self.url + "/health", self.proc, 300, "llama-server", Path(self.log.name))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def start_llama_server(model: Path, threads: int) -> LlamaServer:
    """llama-server built for this CPU or, where that one dies on start (its AMX matmul segfaulted on
    this project's Xeons), the build without AMX (scripts/build-llama-cpp.sh makes both there)."""
    try:
        return LlamaServer(model, threads)
    except RuntimeError as exc:
        if not (LLAMA_CPP / "bin" / "llama-server-noamx").exists():
            raise
        print(f"llama-server died on start ({str(exc).splitlines()[0]}); its build without AMX instead",
              file=sys.stderr)
        return LlamaServer(model, threads, "llama-server-noamx")


def measure_server(name: str, url: str, pids, texts: list[str]) -> dict:
    out = {"name": name, "idle_rss_mb": rss_mb(pids())}
    for c, count in LEVELS.items():
        level = run_level_processes("openai_chat", url, texts[:count], c, MAX_TOKENS)
        out[f"c{c}"] = {"tokens_per_s": level.get("output_tokens_per_s", 0.0),
                        "ttft_p50_ms": level.get("ttft_ms", {}).get("p50"), "errors": level["errors"]}
    out["rss_after_load_mb"] = rss_mb(pids())
    return out


def measure(model: str, texts: list[str] | None = None) -> dict:
    subprocess.run([str(REPO / "scripts" / "build-llama-cpp.sh")], check=True)
    texts = texts or review_texts(64)
    threads = os.cpu_count() or 2
    runs = []
    with tempfile.TemporaryDirectory(prefix="qaio-gguf-") as tmp:
        for outtype in ("f32", "bf16", "q8_0"):
            server = start_llama_server(gguf(model, outtype, Path(tmp)), threads)
            try:
                runs.append(measure_server(f"llama.cpp {outtype.upper()}", server.url,
                                           lambda s=server: {s.proc.pid: "server"}, texts)
                            | {"binary": server.binary})
            finally:
                server.stop()
    for dtype in ("float32", "int8", "bfloat16"):
        worker = GunicornServer(model, QAIO_DTYPE=dtype).wait_ready(900)
        try:
            runs.append(measure_server(f"this worker, {dtype}", worker.url,
                                       lambda w=worker: worker_processes(w.proc.pid), texts))
        finally:
            worker.stop()
    by_name = {r["name"]: r for r in runs}
    q8 = by_name["llama.cpp Q8_0"]
    ours = [r for r in runs if r["name"].startswith("this worker")]
    best = {c: max(r[f"c{c}"]["tokens_per_s"] for r in ours) for c in LEVELS}
    ratio = lambda c: best[c] / q8[f"c{c}"]["tokens_per_s"] if q8[f"c{c}"]["tokens_per_s"] else None  # noqa: E731
    llama_best_c16 = max(r["c16"]["tokens_per_s"] for r in runs if r["name"].startswith("llama.cpp"))
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": threads,
            "max_tokens": MAX_TOKENS, "runs": runs, "ratio_c1": ratio(1), "ratio_c16": ratio(16),
            "ratio_c16_over_best": best[16] / llama_best_c16 if llama_best_c16 else None}


def cpu_flags() -> list[str]:
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))


def section(result: dict) -> list[str]:
    """docs/benchmarks.md's section for a measure() result."""
    head = " | ".join(f"c={c} tok/s (TTFT p50 ms)" for c in LEVELS)
    lines = [BEGIN, "## Beside llama.cpp", "",
             f"{result['date']}, the same 0.5B-shape weights (converted by llama.cpp's convert_hf_to_gguf.py), "
             f"the same streamed greedy chats of {result['max_tokens']} tokens through /v1/chat/completions from "
             f"the same client; llama-server with 16 parallel slots, continuous batching, {result['threads']} "
             f"threads. CPU flags: {' '.join(cpu_flags())}.", "",
             f"| server | idle RSS MB | {head} | RSS after load MB |", "|---" * (3 + len(LEVELS)) + "|"]
    for run in result["runs"]:
        cells = " | ".join(f"{run[f'c{c}']['tokens_per_s']:.1f} ({run[f'c{c}']['ttft_p50_ms'] or 0:.0f})" for c in LEVELS)
        name = run["name"] + (" (built without AMX)" if run.get("binary") == "llama-server-noamx" else "")
        lines.append(f"| {name} | {run['idle_rss_mb']:.0f} | {cells} | {run['rss_after_load_mb']:.0f} |")
    ratios = [f"{k} {result[k]:.2f}" for k in ("ratio_c1", "ratio_c16") if result.get(k) is not None]
    lines += ["", f"Our best over llama.cpp Q8_0 (tok/s): {', '.join(ratios)}."]
    if result.get("ratio_c16_over_best") is not None:
        lines[-1] += f" At c=16 over llama.cpp's best configuration: {result['ratio_c16_over_best']:.2f}."
    lines.append(END)
    return lines


def merge_into_docs(result: dict, out: Path) -> None:
    """Put the result into docs/benchmarks.json (`llama_cpp`) and its section into docs/benchmarks.md."""
    data = json.loads((out / "benchmarks.json").read_text())
    data["llama_cpp"] = result
    (out / "benchmarks.json").write_text(json.dumps(data, indent=2) + "\n")
    text = (out / "benchmarks.md").read_text()
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + text[text.index(END) + len(END) + 1:]
    (out / "benchmarks.md").write_text(text.rstrip("\n") + "\n\n" + "\n".join(section(result)) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(REPO / "models" / "qwen2.5-0.5b-shape"))
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    result = measure(args.model)
    merge_into_docs(result, args.out)
    print("\n".join(section(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
