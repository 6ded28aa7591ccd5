"""The engine on the real tiny model (CPU, eager): continuous batching over KV slots, and everything
the worker promises of it: batched equals serial, rows joining and leaving, slot reuse, chunked
prefill, deadlines, cancellation, and a failing pass that takes down only its own rows."""
import pytest
import torch

from qwen_worker.config import WorkerConfig
from qwen_worker.engine import GenerationRow
from qwen_worker.engine.errors import StepFailed
from qwen_worker.core.failures import is_oom
from qwen_worker.model import ModelService
from qwen_worker.prompts import Message
from qwen_worker.sampling import SamplingParams


def load(model_dir: str, **settings) -> ModelService:
    config = WorkerConfig.from_env({}, dtype="float32", model=model_dir, max_batch_size=4, max_prompt_tokens=256,
                                   max_tokens_limit=64, default_max_tokens=16, **settings)
    service = ModelService(config)
    service.load()
    return service


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    return load(tiny_model_dir)


def prompt(service, text: str) -> list[int]:
    return service.prompter.chat_ids([Message("user", text)])


def run(engine, rows, before_step=None):
    """Add rows, step until all are done; returns each row's (tokens, finish_reason, error)."""
    outcome = {}
    for r in rows:
        engine.add(r, lambda r, error: outcome.__setitem__(id(r), error))
    steps = 0
    while engine.has_work():
        if before_step:
            before_step(steps)
        engine.step()
        steps += 1
    return [(r.tokens, r.finish_reason, outcome[id(r)]) for r in rows]


def alone(service, text: str, max_new: int) -> list[int]:
    (tokens, _, error), = run(service.engine, [GenerationRow(prompt(service, text), max_new)])
    assert error is None
    return tokens


TEXTS = ["你好", "a much longer question about the weather " * 4, "短", "🍜 ok"]


def test_a_batch_of_mixed_lengths_equals_each_row_run_alone(service):
    limits = [12, 5, 20, 1]
    rows = [GenerationRow(prompt(service, t), n) for t, n in zip(TEXTS, limits)]
    together = run(service.engine, rows)
    for (tokens, reason, error), text, limit in zip(together, TEXTS, limits):
        assert error is None and reason in ("stop", "length")
        assert tokens == alone(service, text, limit)
        assert len(tokens) <= limit
    assert service.engine.live() == 0 and service.engine.free_slots() == 4


def test_rows_join_a_running_batch_and_a_freed_slot_serves_a_new_row_cleanly(service):
    engine = service.engine
    long = GenerationRow(prompt(service, "tell me a long story"), 40)
    short = GenerationRow(prompt(service, "插队"), 3)
    late = GenerationRow(prompt(service, "后来的"), 6)
    slots_seen, added = {}, set()

    def join(step):  # a row added waits for the next step, which gives it a slot
        if step == 5:  # the long row is generating: the short one joins
            engine.add(short, lambda r, e: None, lambda r: slots_seen.__setitem__("short", r.slot))
        if short.finish_reason is not None and "late" not in added:
            added.add("late")  # takes the slot the short row left, its stale keys included
            engine.add(late, lambda r, e: None, lambda r: slots_seen.__setitem__("late", r.slot))

    run(engine, [long], before_step=join)
    assert slots_seen["short"] == slots_seen["late"] == 1
    assert short.finish_reason in ("stop", "length") and long.finish_reason in ("stop", "length")
    assert len(long.tokens) > len(short.tokens)
    assert long.tokens == alone(service, "tell me a long story", 40)
    assert short.tokens == alone(service, "插队", 3)
    assert late.tokens == alone(service, "后来的", 6)


def test_long_prompts_prefill_in_chunks_with_the_same_result(tiny_model_dir, service):
    chunked = load(tiny_model_dir, prefill_chunk_tokens=16)
    text = "a prompt long enough to need several chunks of sixteen tokens " * 3
    rows = [GenerationRow(prompt(chunked, text), 10), GenerationRow(prompt(chunked, "短"), 10)]
    assert len(rows[0].prompt_ids) > 3 * 16
    results = run(chunked.engine, rows)
    assert results[0][0] == alone(service, text, 10)
    assert results[1][0] == alone(service, "短", 10)


def full_forward_scores(service, prompt_ids) -> list[float]:
    labels = list(service.prompter.label_token_ids)
    with torch.inference_mode():
        return service.model(input_ids=torch.tensor([prompt_ids])).logits[0, -1, labels].softmax(-1).tolist()


def test_a_long_sentiment_text_scored_in_chunks_equals_a_full_forward_pass(tiny_model_dir):
    chunked = load(tiny_model_dir, prefill_chunk_tokens=16)
    prompts = [chunked.prompter.sentiment_ids("送餐太慢了，饭菜都凉了，" * 12, "zh"),
               chunked.prompter.sentiment_ids("ok", "en")]
    assert len(prompts[0]) > 8 * 16
    for p, scores in zip(prompts, chunked.score_sentiment(prompts)):
        assert list(scores.values()) == pytest.approx(full_forward_scores(chunked, p), abs=1e-5)


def test_scoring_rows_hold_slots_of_their_own_beside_a_full_batch(service):
    engine = service.engine
    writers = [GenerationRow(prompt(service, "tell me a long story"), 30) for _ in range(4)]
    scored = [GenerationRow.scoring(service.prompter.sentiment_ids(t, "zh")) for t in ("很好吃", "太慢了")]

    seen = []

    def score_while_generating(step):
        if step == 2:
            assert engine.free_slots() == 0 and engine.live() == 4
            for row in scored:  # each takes a scoring slot at the next step
                engine.add(row, lambda r, e: None, lambda r: seen.append((r.slot, engine.live(), engine.free_slots())))

    run(engine, writers, before_step=score_while_generating)
    assert sorted(seen) == [(4, 4, 0), (5, 4, 0)]  # the slots above the 4 generation slots, beside a full batch
    for row in scored:
        assert row.finish_reason == "scored" and row.tokens == []
        assert list(row.label_probs) == pytest.approx(full_forward_scores(service, row.prompt_ids), abs=1e-5)
    assert all(len(w.tokens) == 30 for w in writers)
    assert engine.free_score_slots() == 4 and engine.scheduler.blocks.used() == 0


def test_a_deadline_stops_a_scoring_row_between_its_chunks(tiny_model_dir):
    chunked = load(tiny_model_dir, prefill_chunk_tokens=16)
    engine = chunked.engine
    now = [0.0]
    engine.clock = lambda: now[0]
    row = GenerationRow.scoring(chunked.prompter.sentiment_ids("送餐太慢了，饭菜都凉了，" * 12, "zh"), deadline=2.5)
    done = []
    engine.add(row, lambda r, error: done.append(error))
    steps = 0
    while engine.has_work():
        now[0] = steps  # one "second" per step
        engine.step()
        steps += 1
    assert done == [None] and row.finish_reason == "deadline" and row.label_probs is None
    assert steps == 4 and 0 < row.cached < len(row.prompt_ids)  # three chunks ran, then the deadline
    assert engine.free_score_slots() == 4 and engine.scheduler.blocks.used() == 0


def test_sentiment_scores_equal_a_full_forward_pass_and_do_not_depend_on_the_batch(service):
    texts = ["很好吃", "送餐太慢了，饭菜都凉了，再也不点了，真的很失望", "ok", "一般般吧，还行"]
    prompts = [service.prompter.sentiment_ids(t, "zh") for t in texts]
    batched = service.score_sentiment(prompts)
    for p, scores in zip(prompts, batched):
        assert service.score_sentiment([p])[0] == pytest.approx(scores, abs=1e-5)
        assert list(scores.values()) == pytest.approx(full_forward_scores(service, p), abs=1e-5)


def test_a_deadline_stops_a_row_inside_the_loop_and_frees_its_slot(service):
    engine = service.engine
    now = [0.0]
    real_clock, engine.clock = engine.clock, lambda: now[0]
    try:
        row = GenerationRow(prompt(service, "write forever"), 60, deadline=5.0)
        other = GenerationRow(prompt(service, "another"), 8)

        def tick(step):
            now[0] = step  # one "second" per step

        results = run(engine, [row, other], before_step=tick)
    finally:
        engine.clock = real_clock
    assert row.finish_reason == "deadline" and 0 < len(row.tokens) < 60
    assert results[1][1] in ("stop", "length")
    assert engine.free_slots() == 4


def test_a_cancelled_row_stops_at_the_next_step(service):
    row = GenerationRow(prompt(service, "keep going"), 60)
    run(service.engine, [row], before_step=lambda step: row.cancelled.set() if step == 3 else None)
    assert row.finish_reason == "cancelled" and len(row.tokens) <= 4  # the prefill token + 3 steps
    assert service.engine.live() == 0


def test_an_out_of_memory_prefill_fails_only_its_rows_and_the_engine_goes_on(service, monkeypatch):
    engine = service.engine
    running = GenerationRow(prompt(service, "already generating"), 12)
    doomed = [GenerationRow(prompt(service, f"new {i}"), 5) for i in range(2)]
    errors = {}
    real_prefill = engine.runner.prefill
    failures = []

    def injected_allocation_failure(chunks):
        if any(c.slot in {r.slot for r in doomed} for c in chunks):
            failures.append(len(chunks))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_prefill(chunks)

    monkeypatch.setattr(engine.runner, "prefill", injected_allocation_failure)
    engine.add(running, lambda r, e: errors.__setitem__("running", e))
    engine.step()
    for i, r in enumerate(doomed):
        engine.add(r, lambda r, e, i=i: errors.__setitem__(i, e))
    with pytest.raises(StepFailed) as failed:
        engine.step()
    assert is_oom(failed.value.cause) and failures == [2]
    assert all(is_oom(errors[i]) for i in range(2)) and all(r.slot is None for r in doomed)
    while engine.has_work():
        engine.step()
    assert errors["running"] is None
    monkeypatch.undo()
    assert running.tokens == alone(service, "already generating", 12)


def test_a_prompt_outside_the_vocabulary_is_refused_before_the_device_sees_it(service):
    with pytest.raises(Exception, match="token ids"):
        service.engine.add(GenerationRow([10 ** 9], 4), lambda r, e: None)
    assert service.engine.live() == 0


def test_sampled_rows_keep_their_limits_and_never_emit_an_end_token(service):
    rows = [GenerationRow(prompt(service, f"sample {i}"), 6, SamplingParams(temperature=1.2, top_p=0.8)) for i in range(4)]
    for tokens, reason, error in run(service.engine, rows):
        assert error is None and 1 <= len(tokens) <= 6
        assert reason == ("length" if len(tokens) == 6 else "stop")
        assert not set(tokens) & service.eos_token_ids


def test_on_a_cpu_passes_keep_their_real_sizes_and_attention_its_length_bucket(service):
    runner = service.engine.runner
    assert not runner.use_graphs and not runner.pad_shapes and not runner.graphs
    assert runner.decode_shape(3, 40) == (3, 128)
    assert runner.decode_shape(3, 200) == (3, 256)


def test_the_fused_weights_path_gives_what_the_layers_own_modules_give(tiny_model_dir, service):
    """On a GPU the engine concatenates q/k/v and gate/up weights (fuse()); forced here on the CPU,
    with plain linears (fusing reads their weights), it must answer as the module-by-module path."""
    fused = load(tiny_model_dir, cpu_linear="default")
    fused.engine.runner.stack.fuse()
    assert fused.engine.runner.stack.fused is not None
    for text, limit in zip(TEXTS, [12, 5, 20, 1]):
        (tokens, _, error), = run(fused.engine, [GenerationRow(prompt(fused, text), limit)])
        assert error is None and tokens == alone(service, text, limit)
    prompts = [service.prompter.sentiment_ids(t, "zh") for t in ("很好吃", "太慢了，凉了")]
    for a, b in zip(fused.score_sentiment(prompts), service.score_sentiment(prompts)):
        assert a == pytest.approx(b, abs=1e-5)


def test_an_out_of_memory_decode_fails_the_rows_it_carried_frees_their_slots_and_the_engine_goes_on(service,
                                                                                                    monkeypatch):
    engine = service.engine
    before = alone(service, "after the failure", 6)
    doomed = [GenerationRow(prompt(service, f"doomed {i}"), 8) for i in range(2)]
    errors = {}
    for i, r in enumerate(doomed):
        engine.add(r, lambda r, e, i=i: errors.__setitem__(i, e))
    engine.step()  # prefill: both rows now decode

    def injected_allocation_failure(rows, width, fed=None):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(engine.runner, "decode", injected_allocation_failure)
    with pytest.raises(StepFailed) as failed:
        engine.step()
    assert {id(r) for r in failed.value.rows} == {id(r) for r in doomed}
    assert all(is_oom(errors[i]) for i in range(2)) and all(r.slot is None for r in doomed)
    assert engine.live() == 0 and engine.free_slots() == engine.runner.slots
    monkeypatch.undo()
    assert alone(service, "after the failure", 6) == before


def test_a_seeded_row_draws_the_same_alone_and_beside_other_sampled_rows(service):
    def seeded():
        return GenerationRow(prompt(service, "hello"), 12, SamplingParams(temperature=1.0, top_p=0.95, seed=7))
    (alone, _, _), = run(service.engine, [seeded()])
    others = [GenerationRow(prompt(service, f"other {i}"), 20, SamplingParams(temperature=1.0)) for i in range(2)]
    beside = run(service.engine, [others[0], seeded(), others[1]])
    assert beside[1][0] == alone
    (another, _, _), = run(service.engine, [GenerationRow(prompt(service, "hello"), 12,
                                                            SamplingParams(temperature=1.0, top_p=0.95, seed=8))])
    assert another != alone


def test_logprobs_of_a_penalized_greedy_row_follow_its_penalized_logits(service):
    """Greedy with a penalty takes the argmax of the penalized logits, and reports their log-softmax."""
    row = GenerationRow(prompt(service, "hello"), 8, SamplingParams(repetition_penalty=0.2, logprobs=2))
    run(service.engine, [row])
    assert len(row.token_logprobs) == len(row.tokens) == 8
    for token, (logprob, ids, logprobs) in zip(row.tokens, row.token_logprobs):
        assert ids[0] == token and logprob == logprobs[0] and logprobs[0] >= logprobs[1]
    plain = GenerationRow(prompt(service, "hello"), 8)
    run(service.engine, [plain])
    assert plain.tokens != row.tokens  # the penalty (below 1: favouring the prompt's tokens) acted
