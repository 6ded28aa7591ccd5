"""A closed-loop HTTP load: c clients, each sending its next request when the last one is answered."""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from .stats import summary_ms

ROOT = Path(__file__).resolve().parents[1]  # the repository: `bench` is importable from it


@dataclass
class Outcome:
    latency: float
    ttft: float | None = None
    tokens: int = 0
    ok: bool = True


@dataclass
class LevelResult:
    concurrency: int
    wall_s: float
    outcomes: list[Outcome] = field(default_factory=list)

    def summary(self) -> dict:
        ok = [o for o in self.outcomes if o.ok]
        result = {"concurrency": self.concurrency, "requests": len(self.outcomes), "errors": len(self.outcomes) - len(ok),
                  "wall_s": self.wall_s, "requests_per_s": len(ok) / self.wall_s, "latency_ms": summary_ms(
                      [o.latency for o in ok])}
        if any(o.ttft is not None for o in ok):
            result["ttft_ms"] = summary_ms([o.ttft for o in ok if o.ttft is not None])
            result["output_tokens_per_s"] = sum(o.tokens for o in ok) / self.wall_s
        return result


def sentiment_call(session: requests.Session, url: str, text: str) -> Outcome:
    started = time.perf_counter()
    response = session.post(url + "/v1/sentiment", json={"text": text}, timeout=600)
    return Outcome(time.perf_counter() - started, ok=response.status_code == 200)


def healthz_call(session: requests.Session, url: str, text: str) -> Outcome:
    """The cheapest request a worker answers (no model, no engine): what HTTP alone costs it."""
    started = time.perf_counter()
    response = session.get(url + "/healthz", timeout=600)
    return Outcome(time.perf_counter() - started, ok=response.status_code == 200)


def chat_call(session: requests.Session, url: str, text: str, max_tokens: int, **sampling) -> Outcome:
    """A streamed chat (greedy unless sampling says otherwise): time to the first delta, total time,
    tokens from the final event."""
    started = time.perf_counter()
    ttft, tokens, ok = None, 0, False
    body = {"text": text, "max_tokens": max_tokens, "temperature": 0, "stream": True, **sampling}
    with session.post(url + "/v1/chat", json=body, stream=True, timeout=600) as response:
        for line in response.iter_lines(decode_unicode=True):
            if not line.startswith("data: "):
                continue
            event = json.loads(line[len("data: "):])
            if "delta" in event and ttft is None:
                ttft = time.perf_counter() - started
            if event.get("done"):
                tokens, ok = event["usage"]["completion_tokens"], response.status_code == 200
    return Outcome(time.perf_counter() - started, ttft, tokens, ok)


def openai_chat_call(session: requests.Session, url: str, text: str, max_tokens: int, **sampling) -> Outcome:
    """The same streamed greedy chat through /v1/chat/completions, which any OpenAI-compatible server
    answers (ours, llama.cpp's): time to the first content, tokens from the usage of the last chunk."""
    started = time.perf_counter()
    ttft, tokens, ok = None, 0, False
    body = {"model": "any", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **sampling}
    with session.post(url + "/v1/chat/completions", json=body, stream=True, timeout=600) as response:
        # Bytes: decoded lines would also split at U+2028 and U+0085, which llama.cpp sends unescaped.
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[len(b"data: "):])
            if ttft is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - started
            if chunk.get("usage"):
                tokens, ok = chunk["usage"]["completion_tokens"], response.status_code == 200
    return Outcome(time.perf_counter() - started, ttft, tokens, ok)


def run_level(call, texts: list[str], concurrency: int) -> LevelResult:
    """Send every text once with `concurrency` clients; texts are taken in order."""
    pending = list(reversed(texts))
    lock = threading.Lock()
    outcomes: list[Outcome] = []

    def client():
        with requests.Session() as session:
            while True:
                with lock:
                    if not pending:
                        return
                    text = pending.pop()
                try:
                    outcome = call(session, text)
                except requests.RequestException:
                    outcome = Outcome(0.0, ok=False)
                with lock:
                    outcomes.append(outcome)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return LevelResult(concurrency, time.perf_counter() - started, outcomes)


def _client_main() -> None:
    """One load client process (`python -m bench.load`): its level's job as a JSON line on stdin, `ready`
    on stdout, then `go` on stdin starts it; its outcomes and CPU seconds as a JSON line on stdout. It
    imports neither torch nor the worker: what it costs is a client's, not a model's start-up."""
    job = json.loads(sys.stdin.readline())
    url, max_tokens, sampling = job["url"], job["max_tokens"], job["sampling"]
    chat = openai_chat_call if job["kind"] == "openai_chat" else chat_call
    call = (lambda s, t: sentiment_call(s, url, t)) if job["kind"] == "sentiment" else \
        (lambda s, t: healthz_call(s, url, t)) if job["kind"] == "healthz" else \
        (lambda s, t: chat(s, url, t, max_tokens, **sampling))
    print("ready", flush=True)
    sys.stdin.readline()
    started, cpu = time.time(), time.process_time()
    level = run_level(call, job["texts"], job["concurrency"])
    print(json.dumps([started, time.time(), [(o.latency, o.ttft, o.tokens, o.ok) for o in level.outcomes],
                      time.process_time() - cpu]), flush=True)


def _read_line(stream, timeout: float) -> str:
    if not select.select([stream], [], [], timeout)[0]:
        raise TimeoutError(f"a load client said nothing within {timeout} s")
    return stream.readline()


def run_level_processes(kind: str, url: str, texts: list[str], concurrency: int, max_tokens: int,
                        processes: int | None = None, sampling: dict | None = None, timeout: float = 1800) -> dict:
    """run_level spread over several client processes, so that at thousands of events per second the
    client's own GIL is not what is measured; all start together, each wait bounded by `timeout`.
    Returns the level's summary and the clients' CPU seconds."""
    processes = max(1, min(concurrency, processes or max(1, (os.cpu_count() or 2) // 2)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    clients = [subprocess.Popen([sys.executable, "-m", "bench.load"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env=env, cwd=ROOT) for _ in range(processes)]
    try:
        for i, client in enumerate(clients):
            job = {"kind": kind, "url": url, "texts": texts[i::processes], "max_tokens": max_tokens,
                   "sampling": sampling or {}, "concurrency": concurrency // processes + (i < concurrency % processes)}
            client.stdin.write(json.dumps(job) + "\n")
            client.stdin.flush()
        for client in clients:
            if _read_line(client.stdout, timeout).strip() != "ready":
                raise RuntimeError(f"a load client exited with {client.wait(timeout)} before it was ready")
        for client in clients:
            client.stdin.write("go\n")
            client.stdin.flush()
        parts = [json.loads(client.communicate(timeout=timeout)[0].strip().splitlines()[-1]) for client in clients]
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.wait()
    level = LevelResult(concurrency, max(p[1] for p in parts) - min(p[0] for p in parts),
                        [Outcome(*o) for p in parts for o in p[2]])
    # The clients' CPU while the level ran (not their start-up: interpreter, imports).
    return {**level.summary(), "client_cpu_s": sum(p[3] for p in parts)}


if __name__ == "__main__":
    _client_main()
