"""The latency metrics routers and the objectives read: time to first token and between tokens per task
(streamed and not), and the KV-slot utilisation gauge; in both process layouts, over real gunicorn."""
import json

import pytest
import requests

from qaio_testing import eventually, metric

LAYOUTS = {"one process": {}, "engine process": {"QAIO_ENGINE_PROCESS": "on", "QAIO_WORKERS": "2", "QAIO_THREADS": "16"}}
TTFT, TPOT = "qaio_time_to_first_token_seconds", "qaio_time_per_output_token_seconds"


def series(task: str, stream: bool) -> str:
    return f'{{stream="{str(stream).lower()}",task="{task}"}}'  # as exposed: labels sorted


@pytest.mark.parametrize("layout", LAYOUTS)
def test_time_to_first_token_and_between_tokens_per_task_and_slot_utilisation(gunicorn_server, layout):
    server = gunicorn_server(**LAYOUTS[layout])
    url = server.url
    assert metric(server, "qaio_kv_slot_utilization") == 0

    # A long stream (seconds here) holds a slot while it generates: the gauge shows it, then falls back.
    stream = requests.post(url + "/v1/chat", stream=True, timeout=120,
                           json={"text": "a long story", "max_tokens": 1000, "temperature": 0, "stream": True})
    lines = stream.iter_lines(decode_unicode=True)
    assert next(line for line in lines if line).startswith("data: ")
    eventually(lambda: metric(server, "qaio_kv_slot_utilization") > 0, what="a slot in use")
    events = [json.loads(line[6:]) for line in lines if line]
    assert events[-1]["usage"]["completion_tokens"] == 1000
    eventually(lambda: metric(server, TTFT + "_count", series("chat", True)) == 1, what="the stream's first token")
    eventually(lambda: metric(server, "qaio_kv_slot_utilization") == 0, what="the slot given back")
    assert metric(server, TPOT + "_count", series("chat", True)) == 1
    eventually(lambda: metric(server, "qaio_request_duration_seconds_count", '{code="200",task="chat"}') == 1,
               what="the stream's duration")
    ttft = metric(server, TTFT + "_sum", series("chat", True))
    gap = metric(server, TPOT + "_sum", series("chat", True))
    duration = metric(server, "qaio_request_duration_seconds_sum", '{code="200",task="chat"}')
    # From the same arrival: the first token, then 999 gaps, come before the last byte.
    assert 0 < ttft and 0 < gap and ttft + 999 * gap <= duration * 1.01, (ttft, gap, duration)

    # Not streamed: the engine's time of the first token still counts (the client sees it at the end).
    done = requests.post(url + "/v1/completions", json={"prompt": "Once", "max_tokens": 6, "temperature": 0},
                         timeout=60)
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 6
    eventually(lambda: metric(server, TTFT + "_count", series("completion", False)) == 1, what="completion's TTFT")
    assert metric(server, TPOT + "_count", series("completion", False)) == 1

    # Sentiment generates no tokens: no first token to time.
    assert requests.post(url + "/v1/sentiment", json={"text": "很好吃"}, timeout=30).status_code == 200
    eventually(lambda: metric(server, "qaio_request_duration_seconds_count", '{code="200",task="sentiment"}') == 1,
               what="the sentiment counted")
    assert metric(server, TTFT + "_count", series("sentiment", False)) == 0
    assert metric(server, TTFT + "_count", series("chat", True)) == 1
