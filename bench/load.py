"""A closed-loop HTTP load: c clients, each sending its next request when the last one is answered.

The clients are coroutines on one asyncio loop per process, over aiohttp (a well-kept client whose HTTP
parser is C): the load shares the machine's cores with the server it measures, so what a client costs per
request is taken from the server's share. One thread per client with `requests` cost 27 µs of CPU per
streamed token and 1,300 µs per sentiment request on issue 30's 2-core bench, more than half of what the
server it measured cost; these clients cost a quarter of that."""
from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

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


async def sentiment_call(session: aiohttp.ClientSession, url: str, text: str, max_tokens: int, **_) -> Outcome:
    started = time.perf_counter()
    async with session.post(url + "/v1/sentiment", json={"text": text}) as response:
        await response.read()
    return Outcome(time.perf_counter() - started, ok=response.status == 200)


async def bulk_sentiment_call(session: aiohttp.ClientSession, url: str, texts: list[str], max_tokens: int,
                              **_) -> Outcome:
    """Several texts in one request (`texts`): what HTTP costs shared among them; ok when every text was
    scored (a bulk answer is a 200 while any was)."""
    started = time.perf_counter()
    async with session.post(url + "/v1/sentiment", json={"texts": texts}) as response:
        body = await response.read()
    ok = response.status == 200 and json.loads(body)["failed"] == 0
    return Outcome(time.perf_counter() - started, ok=ok)


async def healthz_call(session: aiohttp.ClientSession, url: str, text: str, max_tokens: int, **_) -> Outcome:
    """The cheapest request a worker answers (no model, no engine): what HTTP alone costs it."""
    started = time.perf_counter()
    async with session.get(url + "/healthz") as response:
        await response.read()
    return Outcome(time.perf_counter() - started, ok=response.status == 200)


async def chat_call(session: aiohttp.ClientSession, url: str, text: str, max_tokens: int, **sampling) -> Outcome:
    """A streamed chat (greedy unless sampling says otherwise): time to the first delta, total time,
    tokens from the final event."""
    started = time.perf_counter()
    ttft, tokens, ok = None, 0, False
    body = {"text": text, "max_tokens": max_tokens, "temperature": 0, "stream": True, **sampling}
    async with session.post(url + "/v1/chat", json=body) as response:
        async for line in response.content:  # line by line, as bytes
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[len(b"data: "):])
            if "delta" in event and ttft is None:
                ttft = time.perf_counter() - started
            if event.get("done"):
                tokens, ok = event["usage"]["completion_tokens"], response.status == 200
    return Outcome(time.perf_counter() - started, ttft, tokens, ok)


async def openai_chat_call(session: aiohttp.ClientSession, url: str, text: str, max_tokens: int, **sampling) -> Outcome:
    """The same streamed greedy chat through /v1/chat/completions, which any OpenAI-compatible server
    answers (ours, llama.cpp's): time to the first content, tokens from the usage of the last chunk."""
    started = time.perf_counter()
    ttft, tokens, ok = None, 0, False
    body = {"model": "any", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **sampling}
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        # Split at b"\n" only: decoded lines would also split at U+2028 and U+0085, which llama.cpp sends unescaped.
        async for line in response.content:
            line = line.rstrip(b"\r\n")
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[len(b"data: "):])
            if ttft is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - started
            if chunk.get("usage"):
                tokens, ok = chunk["usage"]["completion_tokens"], response.status == 200
    return Outcome(time.perf_counter() - started, ttft, tokens, ok)


CALLS = {"sentiment": sentiment_call, "bulk_sentiment": bulk_sentiment_call, "healthz": healthz_call,
         "chat": chat_call, "openai_chat": openai_chat_call}


async def _level(kind: str, url: str, items: list, concurrency: int, max_tokens: int, sampling: dict) -> LevelResult:
    call = CALLS[kind]
    pending = list(reversed(items))
    outcomes: list[Outcome] = []
    connector = aiohttp.TCPConnector(limit=0)  # a keep-alive connection per client, as many as there are clients
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def client():
            while pending:
                item = pending.pop()
                text, tokens = (item, max_tokens) if isinstance(item, str) else item
                try:
                    outcomes.append(await call(session, url, text, tokens, **sampling))
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    outcomes.append(Outcome(0.0, ok=False))

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return LevelResult(concurrency, time.perf_counter() - started, outcomes)


def run_level(kind: str, url: str, items: list, concurrency: int, max_tokens: int = 32,
              sampling: dict | None = None) -> LevelResult:
    """Send every item once (a text, or a [text, max_tokens] pair) with `concurrency` clients, in order,
    from this process. kind: one of CALLS."""
    return asyncio.run(_level(kind, url, items, concurrency, max_tokens, sampling or {}))


def _client_main() -> None:
    """One load client process (`python -m bench.load`): its level's job as a JSON line on stdin, `ready`
    on stdout, then `go` on stdin starts it; its outcomes and CPU seconds as a JSON line on stdout. It
    imports neither torch nor the worker: what it costs is a client's, not a model's start-up."""
    job = json.loads(sys.stdin.readline())
    print("ready", flush=True)
    sys.stdin.readline()
    started, cpu = time.time(), time.process_time()
    level = run_level(job["kind"], job["url"], job["texts"], job["concurrency"], job["max_tokens"], job["sampling"])
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
