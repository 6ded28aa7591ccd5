"""The prefix cache over sentiment prompts (their instruction prefix) and conversations: what it serves,
what it reports, and answers equal to the full computation's."""
import re

import pytest

from qwen_worker.config import WorkerConfig
from qwen_worker.engine import GenerationRow
from qwen_worker.model import ModelService

TEXTS = ["很快，好吃，味道足，量大", "送餐太慢了，饭菜都凉了，再也不点了", "Great food!", "一般",
         "The soup was cold and the driver was rude; I waited an hour for it and nobody answered the phone."]


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    services = []
    for reuse in (True, False):
        service = ModelService(WorkerConfig.from_env({}, dtype="float32", model=tiny_model_dir, prefix_cache=reuse))
        service.load()
        services.append(service)
    return services


def test_sentiment_prompts_attach_the_cached_instruction_prefix_of_their_language(pair):
    reused, full = pair
    engine = reused.engine
    for lang, text in (("zh", "送餐很快"), ("en", "fast delivery")):
        prefix = reused.prompter.sentiment_prefix_ids[lang]
        reused.score_sentiment([reused.prompter.sentiment_ids("first", lang)])  # its full blocks stay cached
        row = GenerationRow.scoring(reused.prompter.sentiment_ids(text, lang))
        engine.run([row])
        # Its full blocks, then the rest of the prefix copied from the head of the block that followed them.
        assert len(prefix) <= row.cached_prompt_tokens < len(row.prompt_ids) and row.finish_reason == "scored"
    row = GenerationRow.scoring(full.prompter.sentiment_ids("送餐很快", "zh"))
    full.engine.run([row])
    assert row.cached_prompt_tokens == 0  # QAIO_PREFIX_CACHE=false: every prompt is computed whole


def test_prefix_reuse_equals_full_computation_in_mixed_batches(pair):
    reused, full = pair
    prompts = [reused.prompter.sentiment_ids(t, "en" if i % 2 else "zh") for i, t in enumerate(TEXTS)]
    prompts.append(list(reused.prompter.markup("<|im_start|>user\nno cached prefix<|im_end|>\n")))
    batched = reused.score_sentiment(prompts)
    for prompt, got, expected in zip(prompts, batched, full.score_sentiment(prompts)):
        assert got == pytest.approx(expected, abs=1e-5)
        assert reused.score_sentiment([prompt])[0] == pytest.approx(expected, abs=1e-5)


def test_a_repeated_conversation_reports_its_cached_prompt_tokens_in_usage_readyz_and_metrics(make_app):
    client = make_app(max_batch_size=4).test_client()
    messages = [{"role": "system", "content": "You answer in one short line. " * 6},
                {"role": "user", "content": "what is the weather like?"}]
    body = {"messages": messages, "max_tokens": 6, "temperature": 0}
    first = client.post("/v1/chat/completions", json=body).get_json()
    messages += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "and tomorrow?"}]
    second = client.post("/v1/chat/completions", json=body).get_json()
    # The first finds no full block, at most the head of the warm-up prompt's first block (the template's).
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] < 16
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert first["usage"]["prompt_tokens"] // 16 * 16 <= cached < second["usage"]["prompt_tokens"]
    kv = client.get("/readyz").get_json()["kv_cache"]
    assert kv["blocks_used"] == 0 and kv["bytes_in_use"] == 0 and kv["blocks_cached"] > 0
    assert kv["prefix_hit_rate"] > 0 and kv["bytes_total"] == kv["blocks_total"] * 512 * 16
    metrics = client.get("/metrics").get_data(as_text=True)
    hit = re.search(r'^qaio_prefix_cache_tokens_total\{kind="hit"\} (\S+)$', metrics, re.M)
    assert hit and float(hit.group(1)) >= cached
    assert re.search(r'^qaio_kv_blocks\{state="cached"\} [1-9]', metrics, re.M)
