"""Overlapped steps (QAIO_OVERLAP_STEPS, engine/decode_step.py and flight.py): each decode step is launched
fed from the previous step's tokens where they are, and those are read back after it. On a CPU every pass
has ended when it returns, so what runs here is the bookkeeping: the same tokens as steps read back at once,
for every kind of row, with rows ending early or late, cancelled in flight, preempted, and a failing pass;
blocks keyed by the tokens they hold."""
import pytest
import torch

from qwen_worker.config import WorkerConfig
from qwen_worker.engine import GenerationRow
from qwen_worker.engine.errors import StepFailed
from qwen_worker.model import ModelService
from qwen_worker.prompts import Message
from qwen_worker.sampling import SamplingParams

# The tiny model: 2 layers x 2 KV heads x 16 dims x 4 bytes x keys and values = 512 bytes a token.
BLOCK_BYTES = 512 * 16


def load(model_dir: str, **settings) -> ModelService:
    config = WorkerConfig.from_env({}, **{"dtype": "float32", "model": model_dir, "max_batch_size": 4,
                                          "max_prompt_tokens": 128, "max_tokens_limit": 64, "default_max_tokens": 16,
                                          "sample_candidates": 0, "warmup": False, **settings})
    service = ModelService(config)
    service.load()
    return service


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    return load(tiny_model_dir, overlap_steps=True)


@pytest.fixture()
def engine(service):
    engine = service.engine
    engine.service = service
    eos, picker = engine.eos, engine.picker
    yield engine
    engine.eos = eos
    engine.decoder.set_overlap(True)
    picker.penalties = picker.graphs = None


def prompts(service, count: int) -> list[list[int]]:
    texts = ("你好 你好 你好", "the weather, the weather", "短", "go on and on", "tell me a story about a cat")
    return [service.prompter.chat_ids([Message("user", f"{texts[i % len(texts)]} {i}")]) for i in range(count)]


def run(engine, kinds, overlap: bool, seed: int = 0, count: int = 9) -> list[GenerationRow]:
    """By default nine rows of mixed lengths on 4 slots: slots are freed and taken while steps are in flight."""
    engine.decoder.set_overlap(overlap)
    picker = engine.picker
    if picker.penalties is not None:  # a fresh penalty state for each run
        picker.penalties = None
        if picker.graphs is not None:
            picker.use_graphs(capture=False)
    rows = [GenerationRow(prompt, (6, 11, 17, 24)[i % 4], SamplingParams(**kinds[i % len(kinds)]))
            for i, prompt in enumerate(prompts(engine.service, count))]
    torch.manual_seed(seed)
    engine.run(rows)
    assert engine.decoder.flight is None and all(row.pending == 0 for row in rows)
    return rows


GREEDY = [{}, {"repetition_penalty": 0.2}, {}, {"presence_penalty": 1.5, "frequency_penalty": 1.0}]
SEEDED = [{"temperature": 1.0, "seed": 3}, {"repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.9, "seed": 5},
          {"logprobs": 2}, {}, {"temperature": 0.8, "top_p": 0.9, "seed": 11, "logprobs": 1}]
SAMPLED = [{"repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.9}, {"temperature": 1.0},
           {}, {"presence_penalty": 2.0, "temperature": 1.2, "top_p": 0.95}]


@pytest.mark.parametrize("kinds,graphs", [(GREEDY, False), (GREEDY, True), (SEEDED, True)],
                         ids=["greedy", "greedy-graph-picks", "seeded-and-logprobs"])
def test_overlapped_steps_give_every_row_the_tokens_of_steps_read_back_at_once(engine, kinds, graphs):
    engine.eos = set()  # every row runs its length
    if graphs:
        engine.picker.use_graphs(capture=False)
    expected = run(engine, kinds, overlap=False)
    got = run(engine, kinds, overlap=True)
    assert [row.tokens for row in got] == [row.tokens for row in expected]
    for row, want in zip(got, expected):  # the same ids; float32 values of other batches, so within rounding
        assert [top for _, top, _ in row.token_logprobs] == [top for _, top, _ in want.token_logprobs]
        assert [logprob for logprob, _, _ in row.token_logprobs] == pytest.approx(
            [logprob for logprob, _, _ in want.token_logprobs], abs=1e-4)
    assert any(row.token_logprobs for row in got) == (kinds is SEEDED)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager-picks", "graph-picks"])
def test_rows_drawing_from_the_shared_generator_draw_the_same_tokens_overlapped(engine, graphs):
    """Rows without a seed draw from one generator by batch: the same batches (one row a slot, the
    longest in the highest) draw the same tokens."""
    engine.eos = set()
    if graphs:
        engine.picker.use_graphs(capture=False)
    expected = run(engine, SAMPLED, overlap=False, count=4)
    got = run(engine, SAMPLED, overlap=True, count=4)
    assert [row.tokens for row in got] == [row.tokens for row in expected]
    assert [len(row.tokens) for row in got] == [6, 11, 17, 24]


def test_a_row_that_draws_its_stop_token_in_flight_ends_there_and_frees_its_slot(engine):
    engine.eos = set()
    first = run(engine, GREEDY, overlap=False)
    # A token some rows draw part way through: they stop at it, the others run their length.
    stop = first[1].tokens[3]
    engine.eos = {stop}
    expected = run(engine, GREEDY, overlap=False)
    got = run(engine, GREEDY, overlap=True)
    assert [row.tokens for row in got] == [row.tokens for row in expected]
    assert [row.finish_reason for row in got] == [row.finish_reason for row in expected]
    assert "stop" in {row.finish_reason for row in got} and stop not in sum((row.tokens for row in got), [])
    assert engine.free_slots() == engine.runner.slots and engine.kv_stats()["blocks_used"] == 0


def test_a_row_cancelled_with_a_token_in_flight_drops_it_and_the_others_run_as_before(engine):
    engine.decoder.set_overlap(False)
    expected = [GenerationRow(p, 17) for p in prompts(engine.service, 4)]
    engine.run(expected)
    engine.decoder.set_overlap(True)
    rows = [GenerationRow(p, 17) for p in prompts(engine.service, 4)]
    for row in rows:
        engine.add(row, lambda r, e: None)
    while len(rows[0].tokens) < 5:
        engine.step()
    assert rows[0] in engine.decoder.flight.rows and rows[0].pending == 1
    rows[0].cancelled.set()
    kept = list(rows[0].tokens)
    while engine.has_work():
        engine.step()
    assert rows[0].finish_reason == "cancelled" and rows[0].tokens == kept == expected[0].tokens[:len(kept)]
    assert [row.tokens for row in rows[1:]] == [row.tokens for row in expected[1:]]
    assert engine.free_slots() == engine.runner.slots and engine.kv_stats()["blocks_used"] == 0


def test_blocks_filled_while_tokens_were_in_flight_are_keyed_by_the_tokens_they_hold(engine):
    """A conversation's next turn finds the first turn's blocks, its reply's among them, as without overlap."""
    service = engine.service
    engine.decoder.set_overlap(True)
    first = GenerationRow(prompts(service, 1)[0], 40)
    engine.run([first])
    follow_up = first.prompt_ids + first.tokens + prompts(service, 2)[1]
    second = GenerationRow(follow_up, 8)
    engine.run([second])
    assert second.cached_prompt_tokens >= (len(first.prompt_ids) + len(first.tokens) - 1) // 16 * 16
    engine.decoder.set_overlap(False)
    again = GenerationRow(list(follow_up), 8)
    engine.run([again])
    assert second.tokens == again.tokens


def test_rows_preempted_with_a_token_in_flight_keep_it_and_recompute_to_the_same_answer(tiny_model_dir):
    rows_tokens, in_flight = [], []
    for overlap in (False, True):
        small = load(tiny_model_dir, kv_cache_mb=12 * BLOCK_BYTES / 2**20, prefix_cache=False,
                     overlap_steps=overlap)
        scheduler = small.engine.scheduler
        preempt = scheduler._preempt
        scheduler._preempt = lambda row: (in_flight.append(row.pending), preempt(row))
        rows = [GenerationRow(p, 60) for p in prompts(small, 6)]
        small.engine.run(rows)
        assert small.engine.kv_stats()["preemptions"] > 0 and any(row.preemptions for row in rows)
        rows_tokens.append([row.tokens for row in rows])
    assert any(in_flight), "no row was preempted while a token of its was in flight"
    assert rows_tokens[0] == rows_tokens[1] and all(len(tokens) == 60 for tokens in rows_tokens[1])


def test_a_failing_pass_fails_the_rows_in_flight_too_and_the_engine_goes_on(engine, monkeypatch):
    engine.decoder.set_overlap(True)
    rows = [GenerationRow(p, 30) for p in prompts(engine.service, 3)]
    errors = {}
    for i, row in enumerate(rows):
        engine.add(row, lambda r, e, i=i: errors.__setitem__(i, e))
    for _ in range(4):  # prefill, then decode steps: one is in flight
        engine.step()
    assert engine.decoder.flight is not None and engine.decoder.flight.rows
    decode = engine.runner.decode
    monkeypatch.setattr(engine.runner, "decode", lambda *args: (_ for _ in ()).throw(RuntimeError("device lost")))
    with pytest.raises(StepFailed):
        engine.step()
    assert sorted(errors) == [0, 1, 2] and all(str(e) == "device lost" for e in errors.values())
    assert engine.decoder.flight is None and engine.live() == 0 and engine.free_slots() == engine.runner.slots
    monkeypatch.setattr(engine.runner, "decode", decode)
    assert len(run(engine, GREEDY, overlap=True)[0].tokens) == 6


def test_the_null_model_serves_overlapped_steps_from_its_cycle(tiny_model_dir):
    from qwen_worker.model.null import NullModelService

    service = NullModelService(WorkerConfig.from_env({"QAIO_MODEL": tiny_model_dir, "QAIO_NULL_MODEL": "1",
                                                      "QAIO_MAX_BATCH_SIZE": "4", "QAIO_OVERLAP_STEPS": "1"}))
    service.load()
    assert service.engine.decoder.overlap
    prompt = service.prompter.chat_ids([Message("user", "hello")])
    default_chat = SamplingParams(repetition_penalty=1.1, temperature=0.7, top_p=0.9)
    rows = [GenerationRow(prompt + [11] * i, 5 + 7 * i, default_chat) for i in range(6)]
    service.engine.run(rows)
    cycle = service.engine.runner.cycle.tolist()
    for row in rows:  # token i of a reply is the cycle's token at the prompt's length + i
        want = [cycle[(len(row.prompt_ids) + i) % len(cycle)] for i in range(row.max_new_tokens)]
        assert row.tokens == want and row.finish_reason == "length"
