"""ModelService on the real tiny Qwen2 model: sentiment probabilities and batched == serial."""
import pytest
import torch

from qwen_worker.config import WorkerConfig
from qwen_worker.engine import GenerationRow
from qwen_worker.model import ModelService, resolve_dtype
from qwen_worker.model.building import kv_pool_blocks
from qwen_worker.prompts import LABELS, Message
from qwen_worker.sampling import SamplingParams

TEXTS = ["很快，好吃，味道足，量大", "送餐太慢了，饭菜都凉了", "The food was great, thanks!",
         "一般般吧", "Terrible. Cold soup, rude driver, never again, and I want my money back!!!"]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    service = ModelService(WorkerConfig.from_env({}, dtype="float32", model=tiny_model_dir))
    service.load()
    return service


def test_loads_in_float32_on_cpu_and_knows_it_is_a_demo(model):
    assert model.dtype == torch.float32 and next(model.model.parameters()).dtype == torch.float32
    assert model.is_demo and model.demo_info["shape"] == "tiny"
    assert resolve_dtype("auto", torch.device("cuda:0")) == torch.bfloat16


def test_sentiment_scores_are_a_probability_distribution(model):
    for scores in model.score_sentiment([model.prompter.sentiment_ids(t, "zh") for t in TEXTS]):
        assert set(scores) == set(LABELS)
        assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
        assert all(0 < p < 1 for p in scores.values())


def test_sentiment_batch_equals_serial(model):
    prompts = [model.prompter.sentiment_ids(t, "zh" if i % 2 else "en") for i, t in enumerate(TEXTS)]
    batched = model.score_sentiment(prompts)
    serial = [model.score_sentiment([p])[0] for p in prompts]
    for b, s in zip(batched, serial):
        for label in LABELS:
            assert b[label] == pytest.approx(s[label], abs=1e-5)


def test_sentiment_reads_the_last_position_of_a_full_forward(model):
    """Scoring on top of the cached prefix gives what the full forward gives at the last position."""
    prompt = model.prompter.sentiment_ids(TEXTS[0], "zh")
    with torch.inference_mode():
        full = model.model(input_ids=torch.tensor([prompt])).logits[0, -1]
    expected = full[list(model.prompter.label_token_ids)].softmax(-1).tolist()
    got = model.score_sentiment([prompt])[0]
    assert [got[label] for label in LABELS] == pytest.approx(expected, abs=1e-5)


def _rows(model, lengths):
    return [GenerationRow(model.prompter.chat_ids([Message("user", t)]), max_new_tokens=n)
            for t, n in zip(TEXTS, lengths)]


def test_greedy_generation_batch_equals_serial(model):
    lengths = [12, 3, 20, 7, 16]
    batched = _rows(model, lengths)
    model.engine.run(batched)
    for row, n in zip(batched, lengths):
        single = _rows(model, lengths)[batched.index(row)]
        model.engine.run([single])
        assert row.tokens == single.tokens
        assert len(row.tokens) == n and row.finish_reason == "length"
    assert len({tuple(r.tokens) for r in batched}) == len(batched), "tiny model output should vary by prompt"


def test_sampled_rows_do_not_disturb_greedy_rows_in_the_same_batch(model):
    greedy = _rows(model, [10])[0]
    model.engine.run([greedy])
    mixed = _rows(model, [10, 10, 10])
    mixed[1].sampling, mixed[2].sampling = SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.5)
    model.engine.run(mixed)
    assert mixed[0].tokens == greedy.tokens
    assert all(len(r.tokens) == 10 for r in mixed)


def test_the_kv_pool_is_sized_by_its_setting_or_the_gpus_free_memory_and_must_hold_one_full_row(model, monkeypatch):
    # The tiny model: 2 layers x 2 KV heads x 16 dims x 2 (K, V) x 4 bytes = 512 bytes a token, 8 KiB a block.
    block, row_blocks = 512 * 16, 5120 // 16
    config = WorkerConfig.from_env({}, model="x", max_batch_size=16, max_prompt_tokens=4096, max_tokens_limit=1024)
    cpu = kv_pool_blocks(model.model, config, 5120, torch.device("cpu"), torch.float32)
    assert cpu == 16 * row_blocks + 1  # what 16 full rows need (under the 1 GiB cap), plus the scratch block
    sized = WorkerConfig.from_env({}, model="x", kv_cache_mb=4.0, max_prompt_tokens=4096, max_tokens_limit=1024)
    assert kv_pool_blocks(model.model, sized, 5120, torch.device("cpu"), torch.float32) == 4 * 2**20 // block + 1
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * 2**30, 80 * 2**30))
    assert kv_pool_blocks(model.model, config, 5120, torch.device("cuda"), torch.float32) == int(7 * 2**30) // block + 1
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (row_blocks * block, 80 * 2**30))  # 70 %: short
    with pytest.raises(RuntimeError, match="QAIO_KV_CACHE_MB"):
        kv_pool_blocks(model.model, config, 5120, torch.device("cuda"), torch.float32)
