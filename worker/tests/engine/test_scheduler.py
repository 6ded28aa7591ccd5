import pytest

from qwen_worker.engine.scheduler import Scheduler
from qwen_worker.engine.sequence import GenerationRow


def row(prompt_len: int, max_new: int = 4) -> GenerationRow:
    return GenerationRow(list(range(1, prompt_len + 1)), max_new)


def test_prompts_prefill_in_chunks_within_the_step_budget_oldest_first():
    scheduler = Scheduler(slots=4, max_tokens=100, prefill_tokens_per_step=10)
    long, short_a, short_b = row(25), row(4), row(7)
    for r in (long, short_a, short_b):
        scheduler.admit(r)
    first = scheduler.prefill_chunks()
    assert [(r is long, len(c.tokens), c.start) for r, c in first] == [(True, 10, 0)]
    long.cached = 10
    second = scheduler.prefill_chunks()
    assert [(len(c.tokens), c.start) for _, c in second] == [(10, 10)]
    long.cached = 20
    third = scheduler.prefill_chunks()  # the long prompt's last 5 tokens, and the 4-token one fits beside them
    assert [(r, len(c.tokens)) for r, c in third] == [(long, 5), (short_a, 4)]


def test_rows_hold_the_lowest_slots_and_the_decode_width_covers_them():
    scheduler = Scheduler(slots=4, max_tokens=100, prefill_tokens_per_step=64)
    rows = [row(3) for _ in range(3)]
    for r in rows:
        scheduler.admit(r)
    assert [r.slot for r in rows] == [0, 1, 2] and scheduler.decode_width() == 3
    scheduler.release(rows[2])
    assert scheduler.decode_width() == 2 and rows[2].slot is None
    scheduler.release(rows[0])
    assert scheduler.decode_width() == 2  # slot 1 is still live
    newcomer = row(3)
    scheduler.admit(newcomer)
    assert newcomer.slot == 0 and scheduler.free_slots() == 2


def test_only_rows_that_sampled_decode():
    scheduler = Scheduler(slots=2, max_tokens=100, prefill_tokens_per_step=64)
    a, b = row(3), row(3)
    scheduler.admit(a)
    scheduler.admit(b)
    a.cached, a.next_input = 3, 42
    assert scheduler.decoding() == [a]


def test_a_row_longer_than_a_slot_is_refused():
    scheduler = Scheduler(slots=1, max_tokens=10, prefill_tokens_per_step=64)
    with pytest.raises(ValueError):
        scheduler.admit(row(8, max_new=3))
    assert scheduler.free_slots() == 1
