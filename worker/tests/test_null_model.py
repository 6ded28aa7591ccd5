"""QAIO_NULL_MODEL: everything but the model's arithmetic, for measuring the host path. Its replies are
the token cycle's, whatever the sampling asks; both process layouts carry them (streams, cancellation,
sentiment); over HTTP every place that names a model says `null`, and stop strings cut its text."""
import json

import pytest
from qaio_testing import eventually
from qwen_worker.config import WorkerConfig
from qwen_worker.engine import GenerationRow
from qwen_worker.model.null import CYCLE_TEXT, NullModelService
from qwen_worker.prompts import Message
from qwen_worker.sampling import SamplingParams

from .client.test_engine_link import LAYOUTS, open_link, soon

SETTINGS = {"QAIO_NULL_MODEL": "1", "QAIO_MAX_BATCH_SIZE": "4", "QAIO_MAX_TOKENS_LIMIT": "1000"}


@pytest.fixture(scope="module")
def null_service(tiny_model_dir):
    service = NullModelService(WorkerConfig.from_env({"QAIO_MODEL": tiny_model_dir, **SETTINGS}))
    service.load()
    return service


def expected_reply(service, prompt, count):
    """Token i of a reply to `prompt` is the cycle's token at the prompt's length + i."""
    cycle = service.engine.runner.cycle.tolist()
    return [cycle[(len(prompt) + i) % len(cycle)] for i in range(count)]


def test_its_replies_are_the_token_cycle_whatever_the_sampling_asks(null_service):
    prompt = null_service.prompter.chat_ids([Message("user", "hello")])
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=7, repetition_penalty=1.3, logprobs=2)
    rows = [GenerationRow(list(prompt), 40), GenerationRow(list(prompt), 40, sampling=sampled),
            GenerationRow(prompt + [11], 5)]
    null_service.engine.run(rows)
    assert rows[0].tokens == rows[1].tokens == expected_reply(null_service, prompt, 40)
    assert rows[2].tokens == expected_reply(null_service, prompt + [11], 5)
    assert all(logprob == (0.0, (token,), (0.0,)) for logprob, token in zip(rows[1].token_logprobs, rows[1].tokens))
    assert "外卖" in null_service.decode(rows[0].tokens + rows[0].tokens)  # real text of the cycle, both languages
    assert null_service.describe()["null_model"] is True and null_service.parameter_count == 0


def test_its_sentiment_scores_are_distributions_that_vary_with_the_text(null_service):
    prompts = [null_service.prompter.sentiment_ids(text, "zh") for text in ("好", "很好吃", "太难吃了，再也不点", "一般")]
    scores = null_service.score_sentiment(prompts)
    assert all(abs(sum(s.values()) - 1) < 1e-5 for s in scores)
    assert len({max(s, key=s.get) for s in scores}) > 1


@pytest.fixture(scope="module", params=LAYOUTS)
def null_link(request, tiny_model_dir, tmp_path_factory):
    with open_link(request.param, {"QAIO_MODEL": tiny_model_dir, **SETTINGS}, tmp_path_factory) as client:
        yield client


def test_both_layouts_carry_its_streams_cancellations_and_scores(null_link, null_service):
    assert null_link.status().model.name == "null"
    prompt = null_link.prompter.chat_ids([Message("user", "tell me a story")])
    handle = null_link.generate("chat", prompt, soon(), 30, stream=True)
    pieces = []
    while not (output := handle.receive()).final:
        pieces += output.tokens
    pieces += output.tokens
    assert pieces == handle.tokens == expected_reply(null_service, prompt, 30) and handle.finish_reason == "length"
    held = null_link.generate("chat", prompt, soon(), 1000, stream=True)
    held.receive()
    held.cancel()
    eventually(lambda: null_link.control("status").busy == 0, what="the cancelled row left its slot")
    assert len(held.tokens) < 1000
    scores = null_link.sentiment("sentiment", null_link.prompter.sentiment_ids("味道很好", "zh"), soon()).wait().scores
    assert abs(sum(scores.values()) - 1) < 1e-5


def test_over_http_every_model_name_is_null_and_stop_strings_cut_its_text(make_app):
    client = make_app(null_model=True, max_batch_size=4, model_name="pretend").test_client()
    assert client.get("/readyz").get_json()["model"] == "null"
    assert client.get("/readyz").get_json()["null_model"] is True
    assert [m["id"] for m in client.get("/v1/models").get_json()["data"]] == ["null"]
    answer = client.post("/v1/chat/completions", json={"model": "null", "max_tokens": 8,
                                                       "messages": [{"role": "user", "content": "hi"}]}).get_json()
    assert answer["model"] == "null" and answer["usage"]["completion_tokens"] == 8
    chat = client.post("/v1/chat", json={"text": "hi", "max_tokens": 200}).get_json()
    assert chat["model"] == "null" and chat["finish_reason"] == "length"
    stop = "外卖"  # in the cycle: a 200-token reply passes it
    assert stop in chat["reply"]
    streamed = client.post("/v1/chat", json={"text": "hi", "max_tokens": 200, "stop": [stop], "stream": True})
    events = [json.loads(line[6:]) for line in streamed.get_data(as_text=True).splitlines() if line.startswith("data: ")]
    text = "".join(e.get("delta", "") for e in events)
    assert events[-1]["done"] and events[-1]["finish_reason"] == "stop"
    assert stop not in text and chat["reply"].startswith(text) and CYCLE_TEXT.split(stop)[0].strip()[-5:] in text
