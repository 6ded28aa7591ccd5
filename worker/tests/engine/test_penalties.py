"""Penalties applied sparsely (engine/penalties.py) against their dense definition: the same logits,
bit for bit, over many steps, and the same tokens from the engine, greedy and seeded."""
import random

import numpy as np
import pytest
import torch

from qwen_worker.engine import GenerationRow
from qwen_worker.engine.penalties import PenaltyState
from qwen_worker.sampling import SamplingParams


class DensePenalties:
    """The definition, as the engine applied it before (issue 20): [slots, vocab] counts and a seen mask,
    every penalized row's whole vocabulary row rewritten each step. It speaks PenaltyState's interface to
    the picker: the engine runs on either."""

    def __init__(self, slots: int, vocab: int):
        self.counts = torch.zeros((slots, vocab))
        self.seen = torch.zeros((slots, vocab), dtype=torch.bool)
        self.params = torch.zeros((slots, 3))

    def reset(self, row):
        self.counts[row.slot].zero_()
        self.seen[row.slot].zero_()
        self.seen[row.slot, torch.tensor(row.prompt_ids)] = True
        s = row.sampling
        self.params[row.slot] = torch.tensor([s.repetition_penalty, s.presence_penalty, s.frequency_penalty])

    def select(self, at: np.ndarray, host_slots: np.ndarray):
        return torch.from_numpy(at), torch.from_numpy(host_slots)

    def apply(self, logits, selected):
        index, slots = selected
        repetition, presence, frequency = (self.params[slots, i:i + 1] for i in range(3))
        chosen = logits.index_select(0, index).float()
        counts, seen = self.counts.index_select(0, slots), self.seen.index_select(0, slots)
        chosen = torch.where(seen, torch.where(chosen > 0, chosen / repetition, chosen * repetition), chosen)
        chosen = chosen - presence * (counts > 0) - frequency * counts
        out = logits.float().clone()
        out.index_copy_(0, index, chosen)
        return out

    def count(self, selected, tokens):
        index, slots = selected
        drawn = tokens.index_select(0, index)
        self.counts.index_put_((slots, drawn), torch.ones_like(drawn, dtype=torch.float32), accumulate=True)
        self.seen[slots, drawn] = True


def penalized(state: PenaltyState, rows):
    """The state's selection of rows' penalized ones, as the picker makes it (None when there are none)."""
    at = np.array([i for i, row in enumerate(rows) if row is not None and row.sampling.penalized], dtype=np.int64)
    return state.select(at, np.array([rows[i].slot for i in at], dtype=np.int64)) if len(at) else None


def test_penalties_follow_their_definitions_on_the_rows_that_ask_and_leave_the_others():
    state = PenaltyState(slots=3, max_tokens=8, vocab=6, device=torch.device("cpu"))
    plain = GenerationRow([0], 4)
    plain.slot = 0
    rep = GenerationRow([1], 4, SamplingParams(repetition_penalty=2.0))
    freq = GenerationRow([1], 4, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    for slot, row in ((1, rep), (2, freq)):
        row.slot = slot
        state.reset(row)
    rows = [plain, rep, freq]
    state.count(penalized(state, rows), torch.tensor([5, 2, 3]))
    state.count(penalized(state, rows), torch.tensor([5, 2, 3]))
    out = state.apply(torch.tensor([[1.0, 2.0, -2.0, 3.0, 0.0, 1.0]] * 3), penalized(state, rows))
    assert out[0].tolist() == [1.0, 2.0, -2.0, 3.0, 0.0, 1.0]  # no penalty asked
    # repetition: the prompt's token 1 and generated 2: positive logits divided, negative multiplied
    assert out[1].tolist() == [1.0, 1.0, -4.0, 3.0, 0.0, 1.0]
    # presence 0.5 once and frequency 0.25 per time on token 3 (drawn twice); the prompt does not count
    assert out[2].tolist() == [1.0, 2.0, -2.0, 3.0 - 0.5 - 0.5, 0.0, 1.0]


@pytest.mark.parametrize("host_tables", [True, False], ids=["counted in numpy (a CPU)", "counted in torch (a GPU's way)"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_penalties_equal_the_dense_definition_bit_for_bit_over_many_steps(seed, host_tables):
    """Rows of every kind of penalty (and none) enter slots, draw tokens old and new for many steps, leave,
    and new rows take their slots; every step's logits equal the dense definition's exactly."""
    rng = random.Random(seed)
    slots, vocab, max_tokens = 6, 300, 120
    sparse = PenaltyState(slots, max_tokens, vocab, torch.device("cpu"), host_tables=host_tables)
    dense = DensePenalties(slots, vocab)
    rows: list[GenerationRow | None] = [None] * slots

    def enter(slot):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]  # repeats ids, as prompts do
        kind = rng.choice([{}, {"repetition_penalty": rng.choice([0.5, 1.1, 1.7])},
                           {"presence_penalty": rng.uniform(-2, 2), "frequency_penalty": rng.uniform(-2, 2)},
                           {"repetition_penalty": 1.3, "presence_penalty": 0.4, "frequency_penalty": -0.7}])
        row = GenerationRow(prompt, max_tokens - len(prompt), SamplingParams(**kind))
        row.slot = slot
        rows[slot] = row
        if row.sampling.penalized:
            sparse.reset(row)
            dense.reset(row)

    for step in range(60):
        for slot in range(slots):
            if rows[slot] is None or rng.random() < 0.05:
                enter(slot)
        logits = torch.randn(slots, vocab) * 3
        logits[0, 0] = 0.0  # a logit of exactly zero is multiplied, not divided
        dense_selected = penalized(dense, rows)
        expected = dense.apply(logits.clone(), dense_selected) if dense_selected else logits
        selected = penalized(sparse, rows)
        got = sparse.apply(logits.clone(), selected) if selected else logits
        assert torch.equal(got, expected), f"step {step}"
        # Drawn: often a token the row has seen (its prompt's, its own), sometimes a new one.
        drawn = torch.tensor([rng.choice(row.prompt_ids + row.tokens) if rng.random() < 0.6 else rng.randrange(vocab)
                              for row in rows])
        if selected:
            sparse.count(selected, drawn)
        if dense_selected:
            dense.count(dense_selected, drawn)
        for row, token in zip(rows, drawn.tolist()):
            row.tokens.append(token)


def test_penalties_change_the_logits_they_are_given_in_place_and_copy_other_precisions():
    state = PenaltyState(slots=1, max_tokens=4, vocab=3, device=torch.device("cpu"))
    row = GenerationRow([1], 2, SamplingParams(repetition_penalty=2.0))
    row.slot = 0
    state.reset(row)
    logits = torch.tensor([[1.0, 4.0, 2.0]])
    assert penalized(state, [None]) is None
    assert state.apply(logits, penalized(state, [row])) is logits and logits.tolist() == [[1.0, 2.0, 2.0]]
    half = torch.tensor([[1.0, 4.0, 2.0]], dtype=torch.bfloat16)
    out = state.apply(half, penalized(state, [row]))
    assert out.dtype == torch.float32 and out.tolist() == [[1.0, 2.0, 2.0]] and half[0, 1].item() == 4.0


def test_the_engine_draws_the_same_tokens_with_sparse_penalties_as_with_the_dense_definition(tiny_model_dir):
    """Greedy and seeded rows with each penalty, beside an unpenalized row, on the real tiny model."""
    from qwen_worker.config import WorkerConfig
    from qwen_worker.model import ModelService
    from qwen_worker.prompts import Message

    config = WorkerConfig.from_env({}, dtype="float32", model=tiny_model_dir, max_batch_size=4, max_prompt_tokens=128,
                                   max_tokens_limit=32, default_max_tokens=16)
    service = ModelService(config)
    service.load()
    engine = service.engine
    prompts = [service.prompter.chat_ids([Message("user", text)]) for text in ("你好 你好 你好", "the weather, the weather", "短")]

    def tokens(make_state, **sampling):
        rows = [GenerationRow(p, 16, SamplingParams(seed=i, **sampling)) for i, p in enumerate(prompts)]
        rows.append(GenerationRow(prompts[0], 16))
        engine.picker.penalties = make_state()
        engine.run(rows)
        return [r.tokens for r in rows]

    dense = lambda: DensePenalties(engine.runner.slots, engine.runner.stack.vocab_size)  # noqa: E731
    sparse = lambda: PenaltyState(engine.runner.slots, engine.runner.max_tokens, engine.runner.vocab_size,
                                   engine.runner.device)  # noqa: E731
    for sampling in ({"repetition_penalty": 0.2}, {"presence_penalty": -2.0, "frequency_penalty": -1.0},
                     {"repetition_penalty": 0.1, "temperature": 1.0, "top_p": 0.9},
                     {"repetition_penalty": 0.5, "frequency_penalty": -1.0, "temperature": 0.7}):
        expected = tokens(dense, **sampling)
        assert tokens(sparse, **sampling) == expected, sampling
        assert expected != tokens(sparse, **{**sampling, "repetition_penalty": 1.0, "presence_penalty": 0,
                                            "frequency_penalty": 0}), sampling  # the penalty acted
