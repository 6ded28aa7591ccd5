"""A request handle: text deltas from streamed outputs (exact text, incomplete characters held back,
what arrived meanwhile as one delta), waiting with its deadline and grace, cancelling."""
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
    outputs = iter([Output(7, tokens=[token]) for token in ids] + [Output(7, finish_reason="length")])

    def decode(tokens):  # the next output arrives while the reader decodes: one token per wake-up
        job.deliver(next(outputs, Output(7)))
        return tokenizer.decode(tokens, skip_special_tokens=True)

    job.deliver(Output(7, started_at=time.monotonic(), batch_size=1))
    deltas = list(job.deltas(decode))
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


def test_outputs_that_arrived_while_the_reader_was_away_go_out_as_one_delta(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer("one two three four five six seven eight", add_special_tokens=False).input_ids
    job = handle()
    job.deliver(Output(7, tokens=[ids[0]], started_at=time.monotonic()))
    deltas = job.deltas(lambda t: tokenizer.decode(t, skip_special_tokens=True))
    first = next(deltas)
    for token in ids[1:]:  # several passes' outputs, queued before the reader came back
        job.deliver(Output(7, tokens=[token]))
    job.deliver(Output(7, finish_reason="length"))
    rest = list(deltas)
    assert first + "".join(rest) == tokenizer.decode(ids)
    assert len(rest) == 1, f"what was there went as one delta: {rest}"
    assert job.finish_reason == "length"


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
