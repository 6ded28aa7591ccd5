"""OpenAI's generation parameters through the real `openai` SDK against a real gunicorn worker (tiny
model): stop, seed, logprobs (checked against transformers' own forward pass), n, penalties, the legacy
completions endpoint, and a 400 naming every field that is not honoured."""
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qwen_worker.prompts import ChatMLPrompter, Message

pytestmark = pytest.mark.gunicorn

USER = [{"role": "user", "content": "写一首关于秋天的诗"}]


@pytest.fixture(scope="module")
def sdk(tiny_model_dir):
    from qaio_testing import GunicornServer

    # Two API processes beside one engine process: the layout a GPU serves with, over its socket.
    server = GunicornServer(tiny_model_dir, QAIO_ENGINE_PROCESS="on", QAIO_WORKERS="2", QAIO_THREADS="16").wait_ready()
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    server.stop()


def reply(sdk, **kwargs):
    kwargs = {"model": "tiny", "messages": USER, "max_tokens": 24, **kwargs}
    return sdk.chat.completions.create(**kwargs)


def streamed(sdk, **kwargs):
    chunks = list(reply(sdk, stream=True, **kwargs))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_stop_ends_the_reply_before_the_stop_string_and_a_stream_never_shows_part_of_it(sdk):
    full = reply(sdk, temperature=0).choices[0].message.content
    assert len(full) > 12
    stop = full[8:11]  # a piece of the middle: the reply must end right before its first occurrence
    expected = full[:full.index(stop)]
    cut = reply(sdk, temperature=0, stop=[stop, "never-occurs"])
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < reply(sdk, temperature=0).usage.completion_tokens
    text, chunks = streamed(sdk, temperature=0, stop=stop)
    assert text == expected
    assert all(stop not in (c.choices[0].delta.content or "") for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_the_same_seed_gives_the_same_reply_and_another_seed_another(sdk):
    first = reply(sdk, temperature=1.0, seed=1234).choices[0].message.content
    assert reply(sdk, temperature=1.0, seed=1234).choices[0].message.content == first
    assert streamed(sdk, temperature=1.0, seed=1234)[0] == first
    others = {reply(sdk, temperature=1.0, seed=s).choices[0].message.content for s in (1, 2, 3)}
    assert first not in others and len(others) == 3


def test_n_choices_are_separate_rows_each_reproducible_with_a_seed(sdk):
    answer = reply(sdk, temperature=1.0, seed=7, n=3)
    texts = [c.message.content for c in answer.choices]
    assert [c.index for c in answer.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert texts[0] == reply(sdk, temperature=1.0, seed=7).choices[0].message.content
    assert [c.message.content for c in reply(sdk, temperature=1.0, seed=7, n=3).choices] == texts
    assert answer.usage.completion_tokens == 3 * 24


def test_logprobs_are_the_log_softmax_of_the_served_distribution(sdk, tiny_model_dir):
    # No penalty (the default repetition penalty would change the served distribution from the model's).
    answer = reply(sdk, temperature=0, logprobs=True, top_logprobs=3, max_tokens=10, extra_body={"repetition_penalty": 1})
    content = answer.choices[0].logprobs.content
    assert len(content) == 10 and all(len(entry.top_logprobs) == 3 for entry in content)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompt = ChatMLPrompter(tokenizer).chat_ids([Message(**m) for m in USER])
    generated = tokenizer(answer.choices[0].message.content, add_special_tokens=False)["input_ids"]
    # Each entry's bytes are its token's: together they are the reply, even where a token is part of a character.
    assert b"".join(bytes(e.bytes) for e in content).decode() == answer.choices[0].message.content
    ids = prompt + generated[:10]
    with torch.inference_mode():
        expected = model(torch.tensor([ids])).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
    for position, entry in enumerate(content):
        top = expected[position].topk(3)
        assert entry.logprob == pytest.approx(top.values[0].item(), abs=1e-4)  # greedy: the top token
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    _, chunks = streamed(sdk, temperature=0, logprobs=True, top_logprobs=3, max_tokens=10,
                         extra_body={"repetition_penalty": 1})
    streamed_lp = [e.logprob for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed_lp == pytest.approx([e.logprob for e in content], abs=1e-6)


def test_penalties_act_on_the_tokens_already_seen_and_stay_within_the_request(sdk):
    """The tiny model's random weights never repeat a token on their own; a repetition penalty below 1
    (it favours tokens already seen) makes them, which proves the per-slot counts reach the logits.
    What each penalty does to the logits: test_sampler.py."""
    def tokens(**extra):
        content = reply(sdk, temperature=0, max_tokens=30, logprobs=True, extra_body=extra).choices[0].logprobs.content
        return [bytes(e.bytes) for e in content]
    plain = tokens()
    assert len(set(plain)) > 25
    assert len(set(tokens(repetition_penalty=0.2))) < 15  # the prompt's tokens, over and over
    assert tokens() == plain


def test_completions_continue_a_plain_prompt_with_the_same_parameters(sdk):
    answer = sdk.completions.create(model="tiny", prompt="从前有座山，", max_tokens=8, temperature=0, logprobs=2)
    choice = answer.choices[0]
    assert answer.object == "text_completion" and choice.text and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == 8 and all(len(t) <= 2 for t in choice.logprobs.top_logprobs)
    offsets = choice.logprobs.text_offset
    assert len(offsets) == 8 and offsets[0] == 0 and offsets == sorted(offsets)
    chunks = list(sdk.completions.create(model="tiny", prompt="从前有座山，", max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert sdk.completions.create(model="tiny", prompt="从前有座山，", max_tokens=8, temperature=1, seed=3, n=2).usage \
        .completion_tokens == 16


@pytest.mark.parametrize("field, value", [("tools", [{"type": "function", "function": {"name": "f"}}]),
                                          ("logit_bias", {"1": 5}), ("response_format", {"type": "json_object"}),
                                          ("service_tier", "flex")])
def test_a_field_that_is_not_honoured_is_a_400_naming_it(sdk, field, value):
    with pytest.raises(openai.BadRequestError) as err:
        reply(sdk, **{field: value})
    assert f"`{field}`" in str(err.value) and err.value.code == "unsupported_parameter"
