"""Reusing the fixed sentiment prefix's KV cache gives the full computation's answer."""
import re

import pytest

from qwen_worker.config import WorkerConfig
from qwen_worker.model import ModelService

TEXTS = ["很快，好吃，味道足，量大", "送餐太慢了，饭菜都凉了，再也不点了", "Great food!", "一般",
         "The soup was cold and the driver was rude; I waited an hour for it and nobody answered the phone."]


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    services = []
    for reuse in (True, False):
        service = ModelService(WorkerConfig.from_env({}, model=tiny_model_dir, prefix_cache=reuse))
        service.load()
        services.append(service)
    return services


def test_one_cached_prefix_per_language(pair):
    reused, full = pair
    assert len(reused.scorer.prefix_kv) == 2 and not full.scorer.prefix_kv
    prefix = reused.prompter.sentiment_prefix_ids["zh"]
    keys, values = reused.scorer.prefix_kv[tuple(prefix)][0]
    assert keys.shape[0] == 1 and keys.shape[2] == len(prefix)


def test_prefix_reuse_equals_full_computation_in_mixed_padded_batches(pair):
    reused, full = pair
    prompts = [reused.prompter.sentiment_ids(t, "en" if i % 2 else "zh") for i, t in enumerate(TEXTS)]
    prompts.append(list(reused.prompter.markup("<|im_start|>user\nno cached prefix<|im_end|>\n")))
    batched = reused.score_sentiment(prompts)
    for prompt, got, expected in zip(prompts, batched, full.score_sentiment(prompts)):
        assert got == pytest.approx(expected, abs=1e-5)
        assert reused.score_sentiment([prompt])[0] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("lengths", [[5] * 10, [3, 60, 10, 12, 9, 40, 15, 11, 8, 100, 14, 13, 16, 7, 20, 25], [1], []])
def test_length_buckets_cover_every_row_once_and_bound_padding(lengths):
    from qwen_worker.model.sentiment import MAX_PADDING_SHARE, MIN_BUCKET_TOKENS, length_buckets

    buckets = length_buckets(lengths)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    for bucket in buckets:
        real = sum(lengths[i] for i in bucket)
        padded = len(bucket) * max(lengths[i] for i in bucket)
        without_last = real - max(lengths[i] for i in bucket)
        # A bucket only grows past the padding bound while it is still too small to stand alone.
        assert padded <= (1 + MAX_PADDING_SHARE) * real or without_last < MIN_BUCKET_TOKENS


def test_a_repeated_conversation_reports_its_cached_prompt_tokens_in_usage_readyz_and_metrics(make_app):
    client = make_app(max_batch_size=4).test_client()
    messages = [{"role": "system", "content": "You answer in one short line. " * 6},
                {"role": "user", "content": "what is the weather like?"}]
    body = {"messages": messages, "max_tokens": 6, "temperature": 0}
    first = client.post("/v1/chat/completions", json=body).get_json()
    messages += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "and tomorrow?"}]
    second = client.post("/v1/chat/completions", json=body).get_json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert first["usage"]["prompt_tokens"] // 16 * 16 <= cached < second["usage"]["prompt_tokens"]
    kv = client.get("/readyz").get_json()["kv_cache"]
    assert kv["blocks_used"] == 0 and kv["bytes_in_use"] == 0 and kv["blocks_cached"] > 0
    assert kv["prefix_hit_rate"] > 0 and kv["bytes_total"] == kv["blocks_total"] * 512 * 16
    metrics = client.get("/metrics").get_data(as_text=True)
    hit = re.search(r'^qaio_prefix_cache_tokens_total\{kind="hit"\} (\S+)$', metrics, re.M)
    assert hit and float(hit.group(1)) >= cached
    assert re.search(r'^qaio_kv_blocks\{state="cached"\} [1-9]', metrics, re.M)
