import pytest

from qwen_worker.engine.block_manager import BlockManager
from qwen_worker.engine.scheduler import Scheduler
from qwen_worker.engine.sequence import GenerationRow

SIZE = 4


def row(prompt_len: int, max_new: int = 4, first: int = 1) -> GenerationRow:
    return GenerationRow(list(range(first, first + prompt_len)), max_new)


def make(slots: int, max_tokens: int, prefill_tokens_per_step: int, blocks: int = 64) -> Scheduler:
    return Scheduler(slots, max_tokens, prefill_tokens_per_step, BlockManager(blocks, SIZE))


def prefill(scheduler: Scheduler, now: float = 0.0) -> list:
    """Plan a step and mark its chunks computed, as the engine does (without sampling)."""
    chunks = scheduler.prefill_chunks(now)
    for r, chunk in chunks:
        r.cached = chunk.start + len(chunk.tokens)
    return chunks


def decoding_after_prefill(scheduler: Scheduler, *rows: GenerationRow) -> None:
    while not all(r.prefilled for r in rows):
        assert prefill(scheduler)
    for r in rows:
        r.tokens.append(7)
        r.next_input = 7


def test_prompts_prefill_in_chunks_within_the_step_budget_oldest_first():
    scheduler = make(slots=4, max_tokens=100, prefill_tokens_per_step=10)
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
    scheduler = make(slots=4, max_tokens=100, prefill_tokens_per_step=64)
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
    scheduler = make(slots=2, max_tokens=100, prefill_tokens_per_step=64)
    a, b = row(3), row(3)
    scheduler.admit(a)
    scheduler.admit(b)
    a.cached, a.next_input = 3, 42
    assert scheduler.decoding() == [a]


def test_a_row_longer_than_a_slot_is_refused():
    scheduler = make(slots=1, max_tokens=10, prefill_tokens_per_step=64)
    with pytest.raises(ValueError):
        scheduler.admit(row(8, max_new=3))
    assert scheduler.free_slots() == 1


def test_prefill_goes_as_far_as_the_free_blocks_and_no_younger_row_overtakes_a_waiting_one():
    scheduler = make(slots=3, max_tokens=40, prefill_tokens_per_step=64, blocks=6)  # 5 usable blocks: 20 tokens
    old, young = row(8), row(30, first=100)
    scheduler.admit(old)
    decoding_after_prefill(scheduler, old)  # 2 blocks
    scheduler.admit(young)
    chunks = scheduler.prefill_chunks()  # 3 blocks left, one kept back for old's next token (position 8)
    assert [(r, len(c.tokens)) for r, c in chunks] == [(young, 8)]
    young.cached = 8
    late = row(2, first=200)
    scheduler.admit(late)
    assert scheduler.prefill_chunks() == []  # young waits for blocks; late, though tiny, waits behind it


def test_a_decoding_row_short_of_a_block_takes_the_newest_rows_blocks_which_keeps_its_slot_and_tokens():
    scheduler = make(slots=2, max_tokens=40, prefill_tokens_per_step=64, blocks=5)  # 4 usable
    old, new = row(8), row(7, first=100)
    scheduler.admit(old)
    scheduler.admit(new)
    decoding_after_prefill(scheduler, old, new)  # 2 blocks each, old's full
    new.tokens.extend([8, 9])
    new.cached = 9
    decoding = scheduler.make_room_to_decode()  # old's 9th position needs a third block
    assert decoding == [old] and len(old.blocks) == 3
    assert new.blocks == [] and new.cached == 0 and new.next_input is None and new.preemptions == 1
    assert new.slot == 1 and new.tokens == [7, 8, 9] and scheduler.preemptions == 1
    assert new.known_ids() == list(range(100, 107)) + [7, 8]  # recomputed up to its last token, which decodes next


def test_the_newest_row_short_of_a_block_preempts_itself():
    scheduler = make(slots=2, max_tokens=40, prefill_tokens_per_step=64, blocks=5)
    old, new = row(7), row(8, first=100)
    scheduler.admit(old)
    scheduler.admit(new)
    decoding_after_prefill(scheduler, old, new)
    assert scheduler.make_room_to_decode() == [old] and new.preemptions == 1 and old.preemptions == 0


def test_the_oldest_row_waiting_for_blocks_preempts_younger_ones():
    scheduler = make(slots=2, max_tokens=40, prefill_tokens_per_step=64, blocks=5)  # 4 usable
    old, holder = row(14), row(8, first=300)
    scheduler.admit(old)
    scheduler.admit(holder)
    assert scheduler.blocks.grow(holder, 16)  # a younger row holds every block (say, old was preempted)
    chunks = scheduler.prefill_chunks()
    assert [(r, len(c.tokens)) for r, c in chunks] == [(old, 14)]
    assert holder.preemptions == 1 and holder.blocks == [] and len(old.blocks) == 4


def test_short_requests_prefill_before_a_long_prompt_which_advances_beside_them_only_when_urgent():
    scheduler = make(slots=8, max_tokens=100, prefill_tokens_per_step=16)  # short: at most 4 own tokens
    long = row(40)
    long.deadline = 10.0
    shorts = [row(n, first=50 + 10 * i) for i, n in enumerate((3, 4, 4, 4, 3))]
    for r in (long, *shorts):  # the long prompt came first (admitted at 0)
        scheduler.admit(r)
    first = prefill(scheduler, now=1.0)  # short requests within the budget; the long one is not urgent
    assert [(r, len(c.tokens)) for r, c in first] == [(shorts[0], 3), (shorts[1], 4), (shorts[2], 4), (shorts[3], 4)]
    second = prefill(scheduler, now=6.0)  # half its deadline spent: a quarter of the budget beside them
    assert [(r, len(c.tokens)) for r, c in second] == [(shorts[4], 3), (long, 4)]
    assert [len(c.tokens) for _, c in prefill(scheduler, now=7.0)] == [16]  # alone: the whole budget


def test_an_urgent_long_prompt_keeps_its_quarter_when_short_requests_would_fill_every_step():
    scheduler = make(slots=8, max_tokens=100, prefill_tokens_per_step=16)  # short: at most 4 own tokens
    long = row(40)
    long.deadline = 10.0
    shorts = [row(4, first=50 + 10 * i) for i in range(6)]  # 24 tokens: more than a step's 16
    for r in (long, *shorts):
        scheduler.admit(r)
    step = prefill(scheduler, now=6.0)  # half its deadline spent: 4 of the 16 tokens stay its own
    assert [(r, len(c.tokens)) for r, c in step] == [(shorts[0], 4), (shorts[1], 4), (shorts[2], 4), (long, 4)]


def test_scoring_rows_take_slots_above_the_generations_and_no_decode_width():
    scheduler = Scheduler(2, 100, 64, BlockManager(64, SIZE), score_slots=2)
    writer, scored = row(3), GenerationRow.scoring(list(range(1, 9)))
    scheduler.admit(writer)
    scheduler.admit(scored)
    assert (writer.slot, scored.slot) == (0, 2) and scheduler.decode_width() == 1
    assert scheduler.live() == 1 and scheduler.free_slots() == 1 and scheduler.free_score_slots() == 1
    chunks = prefill(scheduler)
    assert [r for r, _ in chunks] == [writer, scored] and scored.prefilled
    assert scheduler.decoding() == []  # a scoring row never decodes (nor does a row that has not sampled)
    scheduler.release(scored)
    assert scheduler.free_score_slots() == 2 and scheduler.live() == 1 and scored.slot is None


def test_the_last_chunk_of_a_long_prompt_leaves_the_rest_of_the_budget_to_the_next_one():
    scheduler = make(slots=4, max_tokens=100, prefill_tokens_per_step=16)
    first, second = row(19), row(40, first=60)
    for r in (first, second):
        scheduler.admit(r)
    assert [(r, len(c.tokens)) for r, c in prefill(scheduler)] == [(first, 16)]
    # first has 3 tokens left: a short chunk, but no short request: second takes the rest of the budget
    assert [(r, len(c.tokens)) for r, c in prefill(scheduler)] == [(first, 3), (second, 13)]
