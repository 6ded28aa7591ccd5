"""Reusing the fixed sentiment prefix's KV cache gives the full computation's answer."""
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
    assert len(reused.prefix_kv) == 2 and not full.prefix_kv
    prefix = reused.prompter.sentiment_prefix_ids["zh"]
    keys, values = reused.prefix_kv[tuple(prefix)][0]
    assert keys.shape[0] == 1 and keys.shape[2] == len(prefix)


def test_prefix_reuse_equals_full_computation_in_mixed_padded_batches(pair):
    reused, full = pair
    prompts = [reused.prompter.sentiment_ids(t, "en" if i % 2 else "zh") for i, t in enumerate(TEXTS)]
    prompts.append(list(reused.prompter.markup("<|im_start|>user\nno cached prefix<|im_end|>\n")))
    batched = reused.score_sentiment(prompts)
    for prompt, got, expected in zip(prompts, batched, full.score_sentiment(prompts)):
        assert got == pytest.approx(expected, abs=1e-5)
        assert reused.score_sentiment([prompt])[0] == pytest.approx(expected, abs=1e-5)
