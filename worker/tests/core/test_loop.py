"""The engine loop alone, without HTTP: requests in, per-pass outputs to a sink, on the real tiny model."""
import subprocess
import sys
import threading
import time

import pytest

from qwen_worker.config import WorkerConfig
from qwen_worker.core.loop import EngineLoop
from qwen_worker.engine import GenerationRow
from qwen_worker.health import Health
from qwen_worker.metrics import WorkerMetrics
from qwen_worker.model import ModelService
from qwen_worker.prompts import Message
from qwen_worker.protocol import GENERATE, SENTIMENT, Request, RequestFailed
from qaio_testing import eventually


class Sink:
    """Collects the loop's outputs by request id; `passes` counts the batches it was handed."""

    def __init__(self):
        self.outputs = {}
        self.passes = []
        self.finished = []  # request ids in the order their final outputs came
        self.lock = threading.Lock()

    def __call__(self, outputs):
        with self.lock:
            self.passes.append([o.id for o in outputs])
            for output in outputs:
                self.outputs.setdefault(output.id, []).append(output)
                if output.final:
                    self.finished.append(output.id)

    def final(self, request_id, timeout=60):
        return eventually(lambda: next((o for o in self.outputs.get(request_id, []) if o.final), None), timeout,
                          f"the final output of request {request_id}")


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    service = ModelService(WorkerConfig.from_env({}, dtype="float32", model=tiny_model_dir, max_batch_size=2))
    service.load()
    return service


@pytest.fixture()
def loop(model):
    config = WorkerConfig.from_env({}, dtype="float32", model=model.config.model, max_batch_size=2, queue_capacity=2,
                                   batch_wait_ms=20.0)
    health = Health(3, 30)
    health.mark_ready()
    sink = Sink()
    engine_loop = EngineLoop(model, config, WorkerMetrics(), health, sink)
    engine_loop.sink_for_tests = sink
    engine_loop.start()
    yield engine_loop
    engine_loop.stop()


def generation(model, request_id, max_tokens=4, deadline_s=60.0, stream=False):
    # This prompt makes the tiny model's random weights generate past 3,000 tokens before any end token.
    prompt = model.prompter.chat_ids([Message("user", "tell me a long story")])
    return Request(request_id, GENERATE, "chat", prompt, time.monotonic() + deadline_s, max_tokens, stream=stream)


def sentiment(model, request_id, text="味道很好"):
    return Request(request_id, SENTIMENT, "sentiment", model.prompter.sentiment_ids(text, "zh"), time.monotonic() + 60)


def test_generations_take_free_slots_and_the_rest_wait_then_every_token_arrives_once(loop, model):
    sink = loop.sink_for_tests
    for i in (1, 2, 3):
        loop.submit(generation(model, i, max_tokens=6, stream=i == 1))
        eventually(lambda: loop.arrivals.waiting() < 2, what="room in the queue")
    finals = [sink.final(i) for i in (1, 2, 3)]
    assert [f.finish_reason for f in finals] == ["length"] * 3
    streamed = [t for o in sink.outputs[1] for t in o.tokens]
    assert len(streamed) == 6 and len(sink.outputs[1]) > 2  # tokens came with several passes
    assert sum(len(o.tokens) for o in sink.outputs[2]) == 6 and len(finals[1].tokens) == 6  # unstreamed: at the end
    started = {i: next(o for o in sink.outputs[i] if o.started_at is not None).started_at for i in (1, 2, 3)}
    assert started[3] >= min(finals[0].finished_at, finals[1].finished_at)  # the third waited for a free slot


def test_sentiment_is_scored_between_the_steps_of_a_running_generation(loop, model):
    sink = loop.sink_for_tests
    loop.submit(generation(model, 10, max_tokens=3000, stream=True))
    eventually(lambda: any(o.tokens for o in sink.outputs.get(10, [])), what="generating")
    loop.submit(sentiment(model, 11))
    scores = sink.final(11).scores
    assert abs(sum(scores.values()) - 1) < 1e-4
    assert loop.pace.seen >= 1 and loop.arrivals.pace is loop.pace  # admission's scoring pace follows the passes
    assert not [o for o in sink.outputs[10] if o.final], "sentiment must not wait for the generation"
    loop.cancel(10)
    assert sink.final(10).finish_reason == "cancelled"


class DecodeGate:
    """Holds each decode pass of a runner until the test lets one through; `held`: passes waiting now."""

    def __init__(self, decode):
        self.decode, self.permits, self.held = decode, threading.Semaphore(0), 0

    def __call__(self, *args, **kwargs):
        self.held += 1
        self.permits.acquire(timeout=120)
        self.held -= 1
        return self.decode(*args, **kwargs)


def test_first_tokens_and_scores_go_out_before_the_decode_pass_of_their_step(loop, model, monkeypatch):
    sink = loop.sink_for_tests
    gate = DecodeGate(model.engine.runner.decode)
    monkeypatch.setattr(model.engine.runner, "decode", gate)
    try:
        loop.submit(generation(model, 60, max_tokens=3000, stream=True))
        # No decode pass can end before a permit: a token out now came between its step's prefill and decode.
        eventually(lambda: [o for o in sink.outputs.get(60, []) if o.tokens], timeout=30, what="the first token")
        eventually(lambda: gate.held == 1, what="its step's decode pass held")
        assert sum(len(o.tokens) for o in sink.outputs[60]) == 1
        loop.submit(sentiment(model, 61))
        gate.permits.release()  # that step ends; the next one scores it, then decodes the generation (held)
        assert sink.final(61, timeout=30).scores is not None
        eventually(lambda: gate.held == 1, what="the next decode pass held")
        assert not [o for o in sink.outputs[60] if o.final]
    finally:
        loop.cancel(60)
        gate.permits.release(1000)
    assert sink.final(60).finish_reason == "cancelled"


def test_a_queued_request_cancelled_leaves_the_queue_and_is_never_computed(loop, model):
    sink = loop.sink_for_tests
    loop.submit(generation(model, 20, max_tokens=400))
    loop.submit(generation(model, 21, max_tokens=400))
    eventually(lambda: loop.busy() == 2 and loop.arrivals.waiting() == 0, what="both slots taken")
    loop.submit(generation(model, 22))
    loop.cancel(22, "client_gone")
    eventually(lambda: loop.metrics.rejections.labels(reason="client_gone")._value.get() == 1, what="22 counted")
    assert loop.arrivals.waiting() == 0 and loop.busy() == 2 and 22 not in sink.outputs
    loop.cancel(20)
    loop.cancel(21)
    assert sink.final(20).finish_reason == sink.final(21).finish_reason == "cancelled"


def test_deadline_in_the_queue_and_a_full_queue(loop, model):
    sink = loop.sink_for_tests
    for i in (30, 31):
        loop.submit(generation(model, i, max_tokens=400))
    eventually(lambda: loop.busy() == 2 and loop.arrivals.waiting() == 0, what="both slots taken")
    expired = generation(model, 32, deadline_s=0.2)
    loop.submit(expired)
    loop.submit(generation(model, 33))
    with pytest.raises(RequestFailed) as full:
        loop.submit(generation(model, 34))
    assert full.value.code == "queue_full"
    eventually(lambda: time.monotonic() > expired.deadline, what="32's deadline passes while it waits")
    loop.cancel(30)  # a slot frees after 32's deadline passed: it is answered, never started
    assert sink.final(32).error == "deadline_exceeded" and sink.final(32).started_at is None
    assert sink.final(33).finish_reason == "length"
    loop.cancel(31)
    sink.final(31)


def test_a_running_generation_ends_at_its_deadline(loop, model):
    loop.submit(generation(model, 40, max_tokens=1000, deadline_s=0.3))
    final = loop.sink_for_tests.final(40)
    assert final.finish_reason == "deadline" and 0 < len(final.tokens) < 1000


def test_draining_and_stopping_refuse_with_a_code(loop, model):
    loop.health.set_draining(True)
    with pytest.raises(RequestFailed) as refused:
        loop.submit(sentiment(model, 50))
    assert refused.value.code == "draining"
    loop.health.set_draining(False)
    loop.submit(generation(model, 51, max_tokens=1000))
    loop.stop()
    assert loop.sink_for_tests.final(51).error == "not_ready"  # what it held is answered as it stops
    with pytest.raises(RequestFailed) as stopped:
        loop.submit(sentiment(model, 52))
    assert stopped.value.code == "not_ready"


def test_the_engine_side_imports_no_flask():
    code = ("import sys, qwen_worker.engine_server, qwen_worker.core.host, qwen_worker.client.remote; "
            "sys.exit('flask' in sys.modules or 'werkzeug' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_an_out_of_memory_scoring_pass_fails_only_its_requests_while_a_generation_goes_on(loop, model, monkeypatch):
    sink = loop.sink_for_tests
    runner = model.engine.runner
    real_label_logits = runner.label_logits

    def injected_allocation_failure(hidden, rows):
        raise __import__("torch").cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    loop.submit(generation(model, 40, max_tokens=6, stream=True))
    eventually(lambda: any(o.tokens for o in sink.outputs.get(40, [])), what="the generation decoding")
    monkeypatch.setattr(runner, "label_logits", injected_allocation_failure)
    for request_id in (41, 42):
        loop.submit(sentiment(model, request_id))
    for request_id in (41, 42):
        assert sink.final(request_id).error == "out_of_memory"
    monkeypatch.setattr(runner, "label_logits", real_label_logits)
    assert sink.final(40).finish_reason == "length"
    loop.submit(sentiment(model, 43))
    assert sink.final(43).scores is not None


def test_short_sentiment_requests_queued_behind_long_ones_are_scored_first(model):
    config = WorkerConfig.from_env({}, dtype="float32", model=model.config.model, max_batch_size=16, queue_capacity=16)
    health = Health(3, 30)
    health.mark_ready()
    sink = Sink()
    engine_loop = EngineLoop(model, config, WorkerMetrics(), health, sink)
    far = time.monotonic() + 600

    def request(request_id, text):
        return Request(request_id, SENTIMENT, "sentiment", model.prompter.sentiment_ids(text, "zh"), far)

    longs, shorts = [request(i, "这家店的菜很一般，" * 140) for i in range(1, 4)], [request(i, "好吃") for i in (7, 8, 9)]
    # Once one prompt was scored, the instruction prefix is in the KV blocks' prefix cache: a short
    # request's prefill is its own few tokens.
    model.score_sentiment([model.prompter.sentiment_ids("第一", "zh")])
    cached = model.engine.scheduler.blocks.cached_tokens
    assert all(len(r.prompt) - cached(GenerationRow.scoring(r.prompt)) < 32 for r in shorts)
    assert all(len(r.prompt) > config.prefill_chunk_tokens for r in longs)  # each prefills in chunks
    for r in longs + shorts:  # all queued before the loop takes anything: the order is the queue's choice
        engine_loop.submit(r)
    engine_loop.start()
    try:
        for r in longs + shorts:
            assert sink.final(r.id).scores
    finally:
        engine_loop.stop()
    assert set(sink.finished[:3]) == {7, 8, 9}, sink.finished  # the short ones first, whatever their place
