"""Decode steps picked through the sampling graphs' pass (engine/pick_graphs.py, run as plain passes on a CPU)
against the eager picks: the same tokens for the same seeds, rows of every kind reusing each other's slots."""
import types

import numpy as np
import pytest
import torch

from qwen_worker.engine import GenerationRow
from qwen_worker.engine.penalties import AllRows, PenaltyState
from qwen_worker.engine.pick_graphs import PickGraphs
from qwen_worker.prompts import Message
from qwen_worker.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from qwen_worker.config import WorkerConfig
    from qwen_worker.model import ModelService

    # Whole-vocabulary sorts (the GPU's default, the only mode the graphs serve); no prefix cache, so that a
    # second run's prefills are the first's, bit for bit.
    config = WorkerConfig.from_env({}, dtype="float32", model=tiny_model_dir, max_batch_size=4, max_prompt_tokens=128,
                                   max_tokens_limit=48, default_max_tokens=16, sample_candidates=0, prefix_cache=False)
    service = ModelService(config)
    service.load()
    engine = service.engine
    engine.eos = set()  # every row runs its whole length: both runs step the same rows in the same slots
    return service


PASSES: list[int] = []  # the batch of each pass the graphs' picker ran, in the last run


def tokens(service, kinds, graphs: bool, seed: int = 0):
    """Each row's tokens from a fresh picker state, its decode steps picked through the pass or eagerly."""
    engine = service.engine
    picker = engine.picker
    picker.penalties = picker.graphs = None
    PASSES.clear()
    if graphs:
        picker.use_graphs(capture=False)
        run_pass = picker.graphs._pass
        picker.graphs._pass = lambda n: (PASSES.append(n), run_pass(n))
    prompts = [service.prompter.chat_ids([Message("user", text)]) for text in ("你好 你好 你好", "the weather, the weather", "短", "go on and on")]
    rows = [GenerationRow(prompts[i % len(prompts)], 8 + 5 * (i % 4), SamplingParams(**kind))
            for i, kind in enumerate(kinds)]
    torch.manual_seed(seed)
    engine.run(rows)
    return [row.tokens for row in rows]


SAMPLED = [  # more rows than the engine's 4 slots: penalized slots are taken by unpenalized rows, and back
    {"repetition_penalty": 0.1, "temperature": 1.0, "top_p": 0.9},
    {"temperature": 0.8},
    {},  # plain greedy
    {"presence_penalty": 2.0, "frequency_penalty": 1.5, "temperature": 1.0, "top_p": 0.95},
    {"temperature": 1.0, "top_p": 0.5},
    {"repetition_penalty": 0.2, "frequency_penalty": -1.0, "temperature": 0.7},
    {"temperature": 1.2},
    {"repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.9},  # the default chat
]
GREEDY = [{"repetition_penalty": 0.1}, {}, {"presence_penalty": -2.0, "frequency_penalty": -1.0}, {},
          {"repetition_penalty": 0.3}, {}]


@pytest.mark.parametrize("kinds", [SAMPLED, GREEDY], ids=["sampled", "greedy"])
def test_steps_picked_by_the_graphs_pass_draw_the_eager_picks_tokens(engine, kinds):
    expected = tokens(engine, kinds, graphs=False)
    assert tokens(engine, kinds, graphs=True) == expected
    assert len(PASSES) >= 10 and max(PASSES) == 4  # the decode steps that sampled went through the pass
    assert engine.engine.picker.graphs.replays == 0  # no graphs on a CPU: the same pass, run as it is


def test_rows_with_a_seed_or_logprobs_make_their_steps_eager_and_draw_as_before(engine):
    kinds = [{"temperature": 1.0, "seed": 7}, {"repetition_penalty": 0.2, "temperature": 1.0},
             {"temperature": 0.9, "logprobs": 2}, {"repetition_penalty": 0.5}, {"temperature": 1.0}]
    expected = tokens(engine, kinds, graphs=False)
    assert tokens(engine, kinds, graphs=True) == expected
    assert PASSES, "once the seeded and logprobs rows are done, the others' steps go through the pass"


def test_the_penalties_act_in_the_graphs_pass(engine):
    """The comparison above is not vacuous: with the penalties taken out, the pass draws other tokens."""
    plain = [{k: v for k, v in kind.items() if k == "temperature" or k == "top_p"} for kind in SAMPLED]
    assert tokens(engine, plain, graphs=True) != tokens(engine, SAMPLED, graphs=True)


def test_slots_left_by_penalized_rows_hold_neutral_penalties_again_while_the_graphs_are_off(engine):
    """Turning the graphs on later (the GPU run's A/B of them does, in one load) finds no stale penalties."""
    tokens(engine, [{"repetition_penalty": 0.1, "presence_penalty": 1.0}] * 4, graphs=False)  # all 4 slots
    prompt = engine.prompter.chat_ids([Message("user", "短")])
    engine.engine.run([GenerationRow(prompt, 4, SamplingParams(temperature=0.8)) for _ in range(4)])  # each takes one
    params = engine.engine.picker.penalties.params
    assert torch.equal(params, torch.tensor([[1.0, 0.0, 0.0]] * len(params)))


def test_a_pass_over_every_slot_changes_nothing_where_no_penalty_is_asked_or_counted():
    """A slot whose previous row had penalties holds neutral ones again; counting masked slots leaves their tables."""
    state = PenaltyState(slots=3, max_tokens=4, vocab=6, device=torch.device("cpu"))
    for slot in range(3):
        row = GenerationRow([1, 2, 3, 4][:slot + 2], 3, SamplingParams(repetition_penalty=2.0, presence_penalty=1.0))
        row.slot = slot
        state.reset(row)
    state.neutral(1)
    state.neutral(2)
    logits = torch.tensor([[1.0, 2.0, -2.0, 3.0, -0.0, 1.0]] * 3)
    out = state.apply(logits.clone(), AllRows(3, 4, torch.device("cpu")))
    assert out[0].tolist() == [1.0, 1.0, -4.0, 3.0, -0.0, 1.0] and torch.equal(out[1:], logits[1:])
    tables = [t.clone() for t in (state.ids, state.entry, state.counts, state.valid)]
    state.count_masked(AllRows(3, 4, torch.device("cpu")), torch.tensor([5, 3, 0]), torch.tensor([True, False, False]))
    assert state.ids[0].tolist() == [1, 2, 5, 1] and state.valid.tolist() == [3, 3, 4]
    assert state.counts[0].tolist() == [0.0, 0.0, 1.0, 0.0] and state.entry[0, 5] == 2
    for before, after in zip(tables, (state.ids, state.entry, state.counts, state.valid)):
        assert torch.equal(before[1:], after[1:])
    # Slot 2's table is full (4 distinct prompt ids): not counted, a new id's index still stays in range.
    state.count_masked(AllRows(3, 4, torch.device("cpu")), torch.tensor([0, 0, 5]), torch.tensor([False, False, False]))
    assert np.array_equal(state.valid.numpy(), [3, 3, 4]) and state.ids[2].tolist() == [1, 2, 3, 4]


def test_a_captured_graph_is_checked_against_its_pass_and_one_that_baked_in_its_tokens_fails():
    """What capture() runs after capturing, here with stand-ins for the graphs (a CPU captures none)."""
    cpu = torch.device("cpu")
    runner = types.SimpleNamespace(device=cpu, slots=4, batch_sizes=(1, 2, 4), pad_shapes=True, vocab_size=1000,
                                   max_tokens=16)
    graphs = PickGraphs(runner, PenaltyState(4, 16, 1000, cpu))
    graphs.graphs[4] = types.SimpleNamespace(replay=lambda: graphs._pass(4))  # reads its buffers: as the pass
    graphs._check(4)
    baked = graphs.tokens[:4].clone()
    graphs.graphs[4] = types.SimpleNamespace(replay=lambda: graphs.tokens[:4].copy_(baked))  # the last logits' tokens
    with pytest.raises(RuntimeError, match="batch 4"):
        graphs._check(4)
