"""A request handle: text deltas from streamed outputs (exact text, incomplete characters held back,
coalescing), waiting with its deadline and grace, cancelling."""
import json
import time

import pytest
from transformers import AutoTokenizer

from qwen_worker.client.handle import RUNNING_GRACE_S, RequestHandle
from qwen_worker.protocol import GENERATE, Output, Request, RequestFailed


def handle(deadline: float = float("inf"), cancels=None) -> RequestHandle:
    request = Request(7, GENERATE, "chat", [1, 2, 3], deadline, max_tokens=100, stream=True)
    return RequestHandle(request, lambda h, reason: (cancels if cancels is not None else []).append(reason))

TEXT = "很快，好吃😀 味道足！The food was 🍜 great… 量大 ñandú — ok\n第二行"


def test_deltas_add_up_to_the_text_and_never_split_a_character(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    job = handle()
    job.deliver(Output(7, started_at=time.monotonic(), batch_size=1))
    for token in ids:
        job.deliver(Output(7, tokens=[token]))
    job.deliver(Output(7, finish_reason="length"))
    deltas = list(job.deltas(lambda t: tokenizer.decode(t, skip_special_tokens=True)))
    assert "".join(deltas) == TEXT
    assert not any("\ufffd" in d for d in deltas)
    assert len(deltas) > 10  # streamed piece by piece, not in one lump


def test_a_stream_still_queued_at_its_deadline_ends_with_a_deadline_error_at_once(make_app, blocker):
    app = make_app(max_batch_size=1)
    long_job = blocker.occupy(app.extensions["qaio"])
    response = app.test_client().post("/v1/chat", json={"text": "排队", "max_tokens": 5, "stream": True},
                                      headers={"X-Deadline-Ms": "150"})
    events = [json.loads(f[len("data: "):]) for f in response.get_data(as_text=True).split("\n\n") if f]
    assert events[-1]["error"]["code"] == "deadline_exceeded"
    assert long_job.finish_reason is None, "the stream must not wait for the running generation"
    blocker.release(long_job)


def test_tokens_arriving_within_the_coalescing_window_go_out_as_one_delta(tiny_model_dir):
    import threading

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer("one two three four five six seven eight", add_special_tokens=False).input_ids
    job = handle()

    def engine():  # the first token, then the rest quickly, as decode steps would bring them
        job.deliver(Output(7, tokens=[ids[0]], started_at=time.monotonic()))
        time.sleep(0.05)
        for token in ids[1:]:
            job.deliver(Output(7, tokens=[token]))
            time.sleep(0.005)
        job.deliver(Output(7, finish_reason="length"))

    threading.Thread(target=engine).start()
    started = time.monotonic()
    deltas = []
    for delta in job.deltas(lambda t: tokenizer.decode(t, skip_special_tokens=True), coalesce_s=0.2):
        deltas.append((time.monotonic() - started, delta))
    assert "".join(d for _, d in deltas) == tokenizer.decode(ids)
    assert deltas[0][0] < 0.15, "the first token is sent at once"
    assert len(deltas) == 2, f"the rest arrived within one window and went as one delta: {deltas}"


def test_a_queued_request_gives_up_at_its_deadline_and_cancels_itself():
    cancels = []
    job = handle(deadline=time.monotonic() + 0.2, cancels=cancels)
    with pytest.raises(RequestFailed) as err:
        job.wait()
    assert err.value.code == "deadline_exceeded" and cancels == ["deadline_in_queue"]


def test_a_started_request_waits_its_grace_for_the_engine_to_end_it_at_the_deadline():
    """The engine stops a running row at its deadline with finish_reason "deadline": the handle must still
    be waiting for that output, whichever transport brings it."""
    import threading

    job = handle(deadline=time.monotonic() + 0.1)
    job.deliver(Output(7, started_at=time.monotonic()))
    threading.Timer(0.5, lambda: job.deliver(Output(7, tokens=[5, 6], finish_reason="deadline"))).start()
    assert job.wait().finish_reason == "deadline" and job.tokens == [5, 6]
    assert 0.5 < RUNNING_GRACE_S


def test_a_failed_request_raises_its_code_and_a_client_that_left_cancels():
    job = handle()
    job.deliver(Output(7, error="queue_full", message="too many"))
    with pytest.raises(RequestFailed) as err:
        job.wait()
    assert err.value.code == "queue_full"
    cancels = []
    gone = handle(cancels=cancels)
    with pytest.raises(RequestFailed) as err:
        gone.wait(client_gone=lambda: True)
    assert err.value.code == "client_closed_request" and cancels == ["client_gone"]
