"""The engine over a pool of KV blocks, on the real tiny model: prompts attach the cached blocks they
start with and the answer does not change; a pool that runs dry preempts the newest row and recomputes
it, with the same answer; cached blocks are evicted under pressure, never blocks in use."""
import pytest

from qwen_worker.config import WorkerConfig
from qwen_worker.engine import GenerationRow
from qwen_worker.model import ModelService
from qwen_worker.prompts import Message

# The tiny model: 2 layers x 2 KV heads x 16 dims x 4 bytes x keys and values = 512 bytes a token.
BLOCK_BYTES = 512 * 16
ROW_BLOCKS = (256 + 64) // 16  # one full-length row: the smallest pool allowed


def load(model_dir: str, **settings) -> ModelService:
    config = WorkerConfig.from_env({}, **{"dtype": "float32", "model": model_dir, "max_batch_size": 4, "max_prompt_tokens": 256,
                                          "max_tokens_limit": 64, "default_max_tokens": 16, "warmup": False, **settings})
    service = ModelService(config)
    service.load()
    return service


@pytest.fixture(scope="module")
def cached(tiny_model_dir):
    return load(tiny_model_dir)


@pytest.fixture(scope="module")
def uncached(tiny_model_dir):
    return load(tiny_model_dir, prefix_cache=False)


def chat(service, *turns: str) -> list[int]:
    return service.prompter.chat_ids([Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)])


def generate(service, prompts: list[list[int]], max_new: int = 12) -> list[GenerationRow]:
    rows = [GenerationRow(list(p), max_new) for p in prompts]
    service.engine.run(rows)
    return rows


def prefilled_tokens(service, monkeypatch) -> list[int]:
    """Counts the prompt tokens every prefill pass computes from now on."""
    counted = [0]
    runner = service.engine.runner
    real = runner.prefill

    def counting(chunks):
        counted[0] += sum(len(chunk.tokens) for chunk in chunks)
        return real(chunks)

    monkeypatch.setattr(runner, "prefill", counting)
    return counted


def test_a_conversations_next_turn_prefills_only_what_is_new_and_answers_as_without_the_cache(cached, uncached,
                                                                                            monkeypatch):
    first = chat(cached, "tell me about the weather in spring " * 3)
    reply = cached.prompter.tokenizer.decode(generate(cached, [first])[0].tokens)
    second = chat(cached, "tell me about the weather in spring " * 3, reply, "and in autumn?")
    counted = prefilled_tokens(cached, monkeypatch)
    row, = generate(cached, [second])
    reused = len(first) // 16 * 16  # every full block of the first turn's prompt, at least
    assert row.cached_prompt_tokens >= reused > 0
    assert counted[0] == len(second) - row.cached_prompt_tokens
    assert row.tokens == generate(uncached, [second])[0].tokens
    assert generate(uncached, [second])[0].cached_prompt_tokens == 0


def test_rows_sharing_a_system_prompt_in_one_batch_and_after_it_answer_as_without_the_cache(cached, uncached):
    system = "You are a terse assistant who answers in one line. " * 4
    prompts = [cached.prompter.chat_ids([Message("system", system), Message("user", q)])
               for q in ("你好", "what is 2 + 2?", "短", "🍜 ok")]
    want = [row.tokens for row in generate(uncached, prompts)]
    assert [row.tokens for row in generate(cached, prompts)] == want
    again = generate(cached, prompts)  # the system prompt's blocks are cached now
    assert [row.tokens for row in again] == want
    assert min(row.cached_prompt_tokens for row in again) >= len(cached.prompter.tokenizer(system)["input_ids"]) // 16 * 16


def test_a_pool_that_runs_dry_preempts_the_newest_row_and_recomputes_it_with_the_same_answer(tiny_model_dir,
                                                                                           uncached):
    small = load(tiny_model_dir, kv_cache_mb=ROW_BLOCKS * BLOCK_BYTES / 2**20)  # 20 blocks for 4 rows of ~80 tokens
    prompts = [chat(small, f"question number {i}: " + "why is the sky blue? " * 4) for i in range(4)]
    rows = generate(small, prompts, max_new=60)
    stats = small.engine.kv_stats()
    assert stats["preemptions"] > 0 and any(row.preemptions for row in rows)
    assert [row.tokens for row in rows] == [row.tokens for row in generate(uncached, prompts, max_new=60)]
    assert stats["blocks_used"] == 0 and small.engine.free_slots() == 4


def test_cached_blocks_are_evicted_oldest_first_under_pressure_and_answers_stay_right(tiny_model_dir, uncached):
    small = load(tiny_model_dir, kv_cache_mb=ROW_BLOCKS * BLOCK_BYTES / 2**20)
    prompts = [chat(small, f"topic {i}: " + "a long description of something " * 3) for i in range(6)]
    for prompt in prompts:  # one at a time: each leaves its blocks cached, and the pool fills
        generate(small, [prompt], max_new=30)
    stats = small.engine.kv_stats()
    assert stats["evictions"] > 0 and stats["blocks_cached"] > 0 and stats["blocks_used"] == 0
    latest, oldest = generate(small, [prompts[-1]])[0], generate(small, [prompts[0]])[0]
    common = next(i for i, (a, b) in enumerate(zip(prompts[0], prompts[-1])) if a != b)
    shared = common // 16 * 16
    assert shared > 0  # the template's system prompt: used by every row, so recently used
    assert latest.cached_prompt_tokens > common  # the most recent prompt is still cached whole
    # The oldest one's own blocks were evicted first: it finds the shared full blocks, and copies the
    # tokens it has in common with the head of a newer prompt's next block.
    assert oldest.cached_prompt_tokens == common > shared
    assert [latest.tokens, oldest.tokens] == [row.tokens for row in generate(uncached, [prompts[-1], prompts[0]])]


def test_memory_in_use_follows_the_rows_held(cached):
    engine = cached.engine
    before = engine.kv_stats()
    row = GenerationRow(chat(cached, "a question that needs a few blocks " * 4), 40)
    engine.add(row, lambda row, error: None)
    held = []
    while engine.has_work():
        engine.step()
        held.append(engine.kv_stats()["blocks_used"])
    assert max(held) == -(-(len(row.prompt_ids) + 40) // 16) or max(held) == -(-(len(row.prompt_ids) + 39) // 16)
    assert held == sorted(held[:-1]) + held[-1:]  # grows as tokens arrive; the last step releases them all
    assert engine.kv_stats()["blocks_used"] == before["blocks_used"] == 0


def test_the_triton_kernels_read_cached_blocks_and_preempted_rows_to_the_same_answer(tiny_model_dir, uncached):
    """The GPU path (its kernels in Triton's interpreter here): the next turn through attached blocks, and
    rows preempted and recomputed in a small pool, answer as the torch path without any cache."""
    pytest.importorskip("triton")
    # Rows of at most 128 + 32 tokens, a pool of 10 blocks: 4 rows of ~70 tokens do not fit at once.
    kernels = load(tiny_model_dir, kernels="triton", cpu_linear="default", max_prompt_tokens=128,
                   max_tokens_limit=32, kv_cache_mb=10 * BLOCK_BYTES / 2**20)
    first = chat(kernels, "tell me about the weather in spring " * 3)
    reply = kernels.prompter.tokenizer.decode(generate(kernels, [first])[0].tokens)
    second = chat(kernels, "tell me about the weather in spring " * 3, reply, "and in autumn?")
    row, = generate(kernels, [second])
    assert row.cached_prompt_tokens >= len(first) // 16 * 16
    assert row.tokens == generate(uncached, [second])[0].tokens
    prompts = [chat(kernels, f"question number {i}: " + "why is the sky blue? " * 4) for i in range(4)]
    rows = generate(kernels, prompts, max_new=12)
    assert kernels.engine.kv_stats()["preemptions"] > 0
    assert [r.tokens for r in rows] == [r.tokens for r in generate(uncached, prompts, max_new=12)]
