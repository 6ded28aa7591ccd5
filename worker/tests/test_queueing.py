"""Batching, admission and deadlines through the HTTP side's service, on in-process apps serving the
real tiny model (the engine loop alone: core/test_loop.py; both layouts: test_contract.py)."""
from concurrent.futures import ThreadPoolExecutor

import pytest

from qaio_testing import engine_host as host, eventually

from qwen_worker.prompts import Message
from qwen_worker.protocol import RequestFailed


def sentiment_body(text):
    return {"text": text, "lang": "zh"}


def test_concurrent_requests_share_batches_and_match_serial_answers(make_app):
    app = make_app(batch_wait_ms=300.0, max_batch_size=8)
    texts = [f"第{i}家店，味道{'很好' if i % 2 else '很差'}" for i in range(8)]

    def post(text):
        return app.test_client().post("/v1/sentiment", json=sentiment_body(text)).get_json()

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(post, texts))
    assert max(r["timing"]["batch_size"] for r in together) > 1
    for text, batched in zip(texts, together):
        alone = post(text)
        assert alone["timing"]["batch_size"] == 1
        for label, p in alone["sentiment"]["scores"].items():
            assert batched["sentiment"]["scores"][label] == pytest.approx(p, abs=1e-5)


CHAT = {"text": "排队中", "max_tokens": 2, "temperature": 0}


def test_full_queue_answers_503_with_retry_after_at_once(make_app, blocker):
    app = make_app(max_batch_size=1, queue_capacity=1, retry_after_s=3)
    service = app.extensions["qaio"]
    long_job = blocker.occupy(service)
    client = app.test_client()
    # A chat cannot join the running generation (batch size 1), so it waits in the queue.
    waiting = ThreadPoolExecutor(1).submit(client.post, "/v1/chat", json=CHAT)
    eventually(lambda: service.status().queue_depth == 1, what="the chat waits in the queue")
    refused = client.post("/v1/chat", json=CHAT)
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "3"
    assert refused.get_json()["error"]["code"] == "queue_full"
    blocker.release(long_job)
    assert waiting.result(timeout=30).status_code == 200  # the queued one is still served
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'qaio_rejections_total{reason="queue_full"} 1.0' in metrics


def test_a_chat_that_would_not_finish_before_its_deadline_answers_503_at_once(make_app, blocker):
    app = make_app(max_batch_size=1, retry_after_s=2)
    service = app.extensions["qaio"]
    loop = host(service).loop
    for _ in range(loop.turnover.MIN_SEEN):  # the slot has recently been held ~30 s per generation
        loop.turnover.observe(30.0, 100)
    long_job = blocker.occupy(service)
    client = app.test_client()
    refused = client.post("/v1/chat", json={**CHAT, "deadline_ms": 5000})
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "2"
    assert refused.get_json()["error"]["code"] == "deadline_unreachable"
    assert long_job.finish_reason is None, "refused while the slot was still held, not after its deadline"
    assert service.status().queue_depth == 0
    blocker.release(long_job)
    assert client.post("/v1/chat", json={**CHAT, "deadline_ms": 60000}).status_code == 200  # the slot is free again: admitted
    assert 'qaio_rejections_total{reason="deadline_unreachable"} 1.0' in client.get("/metrics").get_data(as_text=True)


def test_with_admission_by_estimate_off_the_same_chat_waits_out_its_deadline(make_app, blocker):
    app = make_app(max_batch_size=1, admit_by_estimate=False)
    service = app.extensions["qaio"]
    loop = host(service).loop
    for _ in range(loop.turnover.MIN_SEEN):
        loop.turnover.observe(30.0, 100)
    long_job = blocker.occupy(service)
    response = app.test_client().post("/v1/chat", json={**CHAT, "deadline_ms": 300})
    assert response.status_code == 504 and response.get_json()["error"]["code"] == "deadline_exceeded"
    blocker.release(long_job)


def test_deadline_passed_in_the_queue_answers_504_at_once_and_never_computes(make_app, blocker):
    app = make_app(max_batch_size=1)
    service = app.extensions["qaio"]
    long_job = blocker.occupy(service)
    prompt = service.chat_ids([Message("user", "等太久了")])
    job = service.submit_generation(prompt, 5, service.deadline(100), task="chat")
    with pytest.raises(RequestFailed) as err:
        job.wait()
    assert err.value.code == "deadline_exceeded"
    assert long_job.finish_reason is None, "the 504 must not wait for the running generation"
    assert job.started_at is None, "never computed"
    # withdrawn at the engine's next step, while the generation goes on
    eventually(lambda: service.status().queue_depth == 0 and service.status().busy == 1, what="withdrawn from the queue")
    assert long_job.finish_reason is None
    blocker.release(long_job)
    assert 'qaio_rejections_total{reason="deadline_in_queue"} 1.0' in app.test_client().get("/metrics").get_data(
        as_text=True)


def test_sentiment_runs_between_the_steps_of_a_running_generation(make_app, blocker):
    app = make_app(max_batch_size=4)
    service = app.extensions["qaio"]
    long_job = blocker.occupy(service)
    jobs = [service.submit_sentiment(text, "zh", service.deadline(30_000)) for text in ("插队一", "插队二")]
    results = [job.wait().scores for job in jobs]
    assert service.status().busy == 1, "sentiment must not wait for the whole generation"
    assert all(abs(sum(r.values()) - 1) < 1e-4 for r in results)
    blocker.release(long_job)
    # ...and gives the answer it gives when it runs on its own.
    alone = service.submit_sentiment("插队一", "zh", service.deadline(30_000)).wait().scores
    assert alone == pytest.approx(results[0], abs=1e-5)


def test_deadline_stops_generation_inside_the_loop(make_app):
    client = make_app().test_client()
    response = client.post("/v1/chat", json={"text": "write forever", "max_tokens": 1000, "temperature": 0,
                                             "deadline_ms": 300})
    assert response.status_code == 504
    assert response.get_json()["error"]["code"] == "deadline_exceeded"


def test_deadline_ends_a_stream_with_finish_reason_deadline(make_app):
    client = make_app().test_client()
    response = client.post("/v1/chat", json={"text": "write forever", "max_tokens": 1000, "temperature": 0,
                                             "stream": True}, headers={"X-Deadline-Ms": "300"})
    events = [line for line in response.get_data(as_text=True).split("\n\n") if line]
    final = __import__("json").loads(events[-1][len("data: "):])
    assert final["finish_reason"] == "deadline"
    assert 0 < final["usage"]["completion_tokens"] < 1000


def test_model_failures_in_a_row_drain_readiness_but_the_worker_keeps_serving(make_app, monkeypatch):
    app = make_app(failure_threshold=2, failure_cooldown_s=300)
    service, client = app.extensions["qaio"], app.test_client()
    runner = host(service).model.engine.runner
    label_logits = runner.label_logits
    failures = iter([IndexError("index out of range in self")] * 2)  # the model fails two passes, then not

    def failing(*args, **kwargs):
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return label_logits(*args, **kwargs)

    monkeypatch.setattr(runner, "label_logits", failing)
    for _ in range(2):
        job = service.submit_sentiment("坏了", "zh", service.deadline(5000))
        with pytest.raises(RequestFailed) as err:
            job.wait()
        assert err.value.code == "model_error"
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["status"] == "cooling_down"
    assert ready.headers["Retry-After"]
    assert client.post("/v1/sentiment", json=sentiment_body("还能用吗")).status_code == 200
    assert 'qaio_model_failures_total{reason="model_error"} 2.0' in client.get("/metrics").get_data(as_text=True)


def test_an_out_of_memory_pass_answers_503_for_its_requests_only_and_the_worker_goes_on(make_app, monkeypatch):
    import torch

    app = make_app(failure_threshold=5)
    service, client = app.extensions["qaio"], app.test_client()
    runner = host(service).model.engine.runner
    real_prefill = runner.prefill
    injected = []

    def allocation_fails_once(chunks):
        if not injected:
            injected.append(len(chunks))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_prefill(chunks)

    monkeypatch.setattr(runner, "prefill", allocation_fails_once)
    refused = client.post("/v1/chat", json={"text": "oom", "max_tokens": 4, "temperature": 0})
    assert refused.status_code == 503 and refused.get_json()["error"]["code"] == "out_of_memory"
    assert refused.headers["Retry-After"]
    assert injected == [1]
    served = client.post("/v1/chat", json={"text": "oom", "max_tokens": 4, "temperature": 0})
    assert served.status_code == 200 and served.get_json()["usage"]["completion_tokens"] >= 1
    assert host(service).model.engine.live() == 0
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'qaio_model_failures_total{reason="out_of_memory"} 1.0' in metrics
