"""Streaming text from tokens: exact text, incomplete characters held back, deadlines honoured."""
import json
from concurrent.futures import Future

from transformers import AutoTokenizer

from qwen_worker.batcher import GENERATE, Job
from qwen_worker.engine import GenerationRow
from qwen_worker.service import TokenStream

TEXT = "很快，好吃😀 味道足！The food was 🍜 great… 量大 ñandú — ok\n第二行"


def test_deltas_add_up_to_the_text_and_never_split_a_character(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    stream = TokenStream(lambda t: tokenizer.decode(t, skip_special_tokens=True))
    job = Job(GENERATE, "chat", GenerationRow([1], len(ids)), deadline=float("inf"), future=Future())
    stream.attach(job)
    for token in ids:
        stream.put_token(token)
    job.future.set_result(job.payload)
    deltas = list(stream.deltas())
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
    assert not long_job.future.done(), "the stream must not wait for the running generation"
    blocker.release(long_job)


def test_tokens_arriving_within_the_coalescing_window_go_out_as_one_delta(tiny_model_dir):
    import threading
    import time

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer("one two three four five six seven eight", add_special_tokens=False).input_ids
    stream = TokenStream(lambda t: tokenizer.decode(t, skip_special_tokens=True), coalesce_s=0.2)
    job = Job(GENERATE, "chat", GenerationRow([1], len(ids)), deadline=float("inf"), future=Future())
    stream.attach(job)

    def engine():  # the first token, then the rest quickly, as decode steps would bring them
        stream.put_token(ids[0])
        time.sleep(0.05)
        for token in ids[1:]:
            stream.put_token(token)
            time.sleep(0.005)
        job.future.set_result(job.payload)

    threading.Thread(target=engine).start()
    started = time.monotonic()
    deltas = []
    for delta in stream.deltas():
        deltas.append((time.monotonic() - started, delta))
    assert "".join(d for _, d in deltas) == tokenizer.decode(ids)
    assert deltas[0][0] < 0.15, "the first token is sent at once"
    assert len(deltas) == 2, f"the rest arrived within one window and went as one delta: {deltas}"
