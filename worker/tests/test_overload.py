"""A worker under more than it can hold: deadlines from the front door, no compute for clients who
left; real gunicorn over real sockets (the disconnect check needs one), in both process layouts."""
import json
import socket
import time

import pytest
import requests

from qaio_testing import eventually, metric
from qwen_worker.connection import MAX_FRONT_DOOR_AGE_S, arrival

LONG = 1000
LAYOUTS = {"one process": {"QAIO_ENGINE_PROCESS": "off"}, "engine process": {"QAIO_ENGINE_PROCESS": "on"}}


def open_request(server, path: str, body: dict, headers: dict | None = None) -> socket.socket:
    """Send a request and leave its connection open, unread, as a client that may still leave."""
    data = json.dumps(body).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n{head}\r\n".encode() + data)
    return sock


@pytest.fixture(params=list(LAYOUTS), ids=list(LAYOUTS))
def small_worker(request, gunicorn_server):
    """One KV slot, so a long generation holds it and the next request queues."""
    return gunicorn_server(**LAYOUTS[request.param], QAIO_MAX_BATCH_SIZE="1", QAIO_QUEUE_CAPACITY="4",
                           QAIO_WORKERS="1")


def generated(server) -> float:
    return metric(server, "qaio_generated_tokens_total", '{task="chat"}')


def test_a_client_that_leaves_mid_generation_costs_no_more_compute(small_worker):
    sock = open_request(small_worker, "/v1/chat", {"text": "a long story", "max_tokens": LONG, "temperature": 0})
    eventually(lambda: metric(small_worker, "qaio_live_slots") == 1, what="the generation runs")
    time.sleep(0.3)
    sock.close()
    eventually(lambda: metric(small_worker, "qaio_live_slots") == 0, what="its row is stopped")
    done = eventually(lambda: generated(small_worker), what="its tokens counted (once, as the row ends)")
    assert done < LONG
    time.sleep(0.5)
    assert generated(small_worker) == done


def test_a_client_that_leaves_while_queued_is_never_computed(small_worker):
    blocker = open_request(small_worker, "/v1/chat", {"text": "story", "max_tokens": LONG, "temperature": 0})
    eventually(lambda: metric(small_worker, "qaio_live_slots") == 1, what="the slot is taken")
    queued = open_request(small_worker, "/v1/chat", {"text": "next", "max_tokens": 50, "temperature": 0})
    eventually(lambda: requests.get(small_worker.url + "/readyz", timeout=5).json()["queue_depth"] == 1,
               what="the second request queues")
    queued.close()
    eventually(lambda: metric(small_worker, "qaio_rejections_total", '{reason="client_gone"}') == 1,
               what="the queued request is dropped when its client leaves")
    eventually(lambda: requests.get(small_worker.url + "/readyz", timeout=5).json()["queue_depth"] == 0,
               what="and the queue says so")
    blocker.close()
    eventually(lambda: metric(small_worker, "qaio_live_slots") == 0, what="the blocker is stopped")
    total = generated(small_worker)
    time.sleep(0.5)
    assert generated(small_worker) == total, "the dropped request never generated"
    assert total < LONG


def test_the_deadline_counts_from_the_front_door(small_worker):
    url = small_worker.url + "/v1/chat"
    # Received by the front door 2 s ago with a 1.5 s budget: late already, refused before any compute.
    stamp = {"X-Request-Start": f"t={time.time() - 2:.3f}"}
    late = requests.post(url, json={"text": "late", "max_tokens": 5, "deadline_ms": 1500}, headers=stamp, timeout=10)
    assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"
    assert metric(small_worker, "qaio_rejections_total", '{reason="deadline_on_arrival"}') == 1
    assert generated(small_worker) == 0

    # Stamped 4 s ago with 5 s, queued behind a long generation: 504 about 1 s after it was sent (5 s
    # if the deadline counted from the worker; the margin holds on a loaded machine).
    blocker = open_request(small_worker, "/v1/chat", {"text": "story", "max_tokens": LONG, "temperature": 0})
    eventually(lambda: metric(small_worker, "qaio_live_slots") == 1, what="the slot is taken")
    sent = time.monotonic()
    waited = requests.post(url, json={"text": "waited", "max_tokens": 5, "deadline_ms": 5000},
                           headers={"X-Request-Start": f"t={time.time() - 4:.3f}"}, timeout=30)
    elapsed = time.monotonic() - sent
    assert waited.status_code == 504
    assert elapsed < 3.5, f"answered {elapsed:.2f} s after sending: the deadline counted from the worker"
    blocker.close()


@pytest.mark.parametrize("stamp", [None, "", "garbage", "t=abc", "t=1.5", "t=12345678901234", "t=+1700000000"])
def test_a_missing_or_malformed_stamp_counts_as_now(stamp):
    assert arrival(stamp, now=1000.0) == 1000.0


def test_a_stamp_counts_back_from_now_by_its_age_bounded_by_the_past_and_an_hour():
    assert arrival(f"t={time.time() - 2:.3f}", now=1000.0) == pytest.approx(998.0, abs=0.5)
    assert arrival(f" t={time.time() - 2:.0f} ", now=1000.0) == pytest.approx(998.0, abs=1.5)
    assert arrival(f"t={time.time() + 3600:.3f}", now=1000.0) == 1000.0  # from the future: now
    assert arrival(f"t={time.time() - 86400:.3f}", now=1000.0) == 1000.0 - MAX_FRONT_DOOR_AGE_S  # a broken clock
