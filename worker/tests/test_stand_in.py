"""The real small chat model (SmolLM2-135M-Instruct) through the worker: replies that end by themselves,
batched equal to serial, and a worker that says plainly it serves a stand-in (also after a fallback)."""
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

QUESTIONS = ["What is the capital of France?", "Say hello in one short sentence.", "Name a colour.",
             "Is the sky blue? Answer yes or no."]


@pytest.fixture(scope="module")
def stand_in_app(make_app, stand_in_model_dir):
    return make_app(model=stand_in_model_dir, instance_id="stand-in", max_batch_size=4)


def chat(app, text, **extra):
    response = app.test_client().post("/v1/chat", json={"text": text, "max_tokens": 96, "temperature": 0, **extra})
    assert response.status_code == 200, response.get_data(as_text=True)
    return response


@pytest.fixture(scope="module")
def replies_one_at_a_time(stand_in_app):
    return [chat(stand_in_app, question).get_json() for question in QUESTIONS]


def test_greedy_replies_to_short_prompts_end_by_themselves(replies_one_at_a_time):
    for body in replies_one_at_a_time:
        assert body["finish_reason"] == "stop", body
        assert body["reply"].strip() and body["usage"]["completion_tokens"] < 96
    assert "Paris" in replies_one_at_a_time[0]["reply"]


def test_a_streamed_reply_ends_by_itself_with_the_same_text(stand_in_app):
    plain = chat(stand_in_app, QUESTIONS[1]).get_json()
    frames = chat(stand_in_app, QUESTIONS[1], stream=True).get_data(as_text=True).split("\n\n")
    events = [json.loads(f[len("data: "):]) for f in frames if f.startswith("data: ")]
    assert events[-1]["finish_reason"] == "stop"
    assert "".join(e.get("delta", "") for e in events) == plain["reply"]


def test_concurrent_replies_equal_the_replies_given_one_at_a_time(stand_in_app, replies_one_at_a_time):
    alone = [body["reply"] for body in replies_one_at_a_time]
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(lambda q: chat(stand_in_app, q).get_json(), QUESTIONS))
    assert max(r["timing"]["batch_size"] for r in together) > 1
    assert [r["reply"] for r in together] == alone


def test_responses_and_readiness_say_it_is_a_stand_in_not_qwen(stand_in_app):
    body = stand_in_app.test_client().post("/v1/sentiment", json={"text": "Great food, fast delivery!"}).get_json()
    assert body["model"] == "smollm2-135m-instruct"
    assert body["stand_in_model"] is True and body["demo_model"] is False
    assert body["sentiment"]["label"] == "positive"
    ready = stand_in_app.test_client().get("/readyz").get_json()
    assert ready["stand_in_model"] is True and "SmolLM2-135M-Instruct, not Qwen/Qwen2.5-0.5B-Instruct" in ready["warning"]


def test_a_model_that_cannot_be_loaded_falls_back_to_the_stand_in_and_says_so(make_app, stand_in_model_dir,
                                                                               tmp_path):
    missing = str(tmp_path / "no-such-model")
    app = make_app(model=missing, fallback_model=stand_in_model_dir, instance_id="fallback", max_batch_size=2)
    client = app.test_client()
    ready = client.get("/readyz").get_json()
    assert ready["model"] == "smollm2-135m-instruct" and ready["configured_model"] == missing
    assert missing in ready["fallback_reason"] and ready["stand_in_model"] is True
    answer = client.post("/v1/sentiment", json={"text": "terrible, cold and late"})
    assert answer.get_json()["model"] == "smollm2-135m-instruct"
    # Not cached under the key of the model the front door believes it serves:
    keyed = client.post("/v1/sentiment", json={"text": "terrible, cold and late"},
                        headers={"X-Qaio-Cache-Model": missing})
    assert keyed.headers["X-Accel-Expires"] == "0"
    same = client.post("/v1/sentiment", json={"text": "terrible, cold and late"},
                       headers={"X-Qaio-Cache-Model": stand_in_model_dir})
    assert same.headers["X-Accel-Expires"] != "0"
