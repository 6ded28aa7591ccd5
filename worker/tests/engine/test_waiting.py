"""Which waiting rows the scheduler admits into free slots at a step: generations in arrival order;
scoring rows bounded in prompt tokens, short texts never stuck behind long ones, long ones in at most half
the scoring slots, urgent ones first, the rest left waiting in order."""
from qwen_worker.engine.block_manager import BlockManager
from qwen_worker.engine.scheduler import Scheduler
from qwen_worker.engine.sequence import GenerationRow

NOW = 1000.0


def scoring(tokens: int, waited: float = 0.0, deadline_s: float = 15.0, first: int = 1) -> GenerationRow:
    row = GenerationRow.scoring(list(range(first, first + tokens)), deadline=NOW - waited + deadline_s)
    row.admitted_at = NOW - waited
    return row


def scheduler_of(*rows: GenerationRow, slots: int = 1, score_slots: int = 16, budget: int = 1000) -> Scheduler:
    """A scheduler whose short requests are those of at most budget / 4 tokens, with `rows` waiting."""
    scheduler = Scheduler(slots, 10_000, budget, BlockManager(4096, 4), score_slots=score_slots)
    for row in rows:
        scheduler.add(row)
    return scheduler


def test_short_texts_behind_a_bulk_of_long_ones_go_first_within_the_budget():
    bulk = [scoring(900, first=1000 * i) for i in range(4)]
    shorts = [scoring(110, first=5000), scoring(120, first=6000), scoring(100, first=7000)]
    scheduler = scheduler_of(*bulk, *shorts)
    assert scheduler.admit_waiting(NOW) == [shorts[2], shorts[0], shorts[1]]  # 330 tokens; 900 more would pass 1,000
    assert scheduler.admit_waiting(NOW) == [bulk[0]]  # then the long ones, one per step, oldest first among equals
    assert list(scheduler.waiting_to_score) == bulk[1:] and all(row.slot is not None for row in shorts)


def test_a_text_over_the_budget_goes_alone_and_a_cheaper_one_may_fill_what_is_left():
    rows = [scoring(3000, first=1), scoring(600, first=4000), scoring(500, first=5000), scoring(300, first=6000)]
    scheduler = scheduler_of(*rows)
    assert scheduler.admit_waiting(NOW) == [rows[3], rows[2]]  # 300 + 500; 600 would pass 1,000
    assert scheduler.admit_waiting(NOW) == [rows[1]]
    assert scheduler.admit_waiting(NOW) == [rows[0]]  # longer than any budget: alone, never stuck


def test_urgent_texts_first_then_the_free_slots_and_generations_in_arrival_order():
    urgent, a, b, c = scoring(800, waited=8.0), scoring(100, first=900), scoring(100, first=1000), scoring(100, first=1100)
    chats = [GenerationRow([1, 2, 3], 4), GenerationRow([4, 5, 6], 4)]
    scheduler = scheduler_of(urgent, a, chats[0], b, chats[1], c, slots=1, score_slots=2)
    # 8 of its 15 s spent waiting: it goes before shorter ones; the first chat takes the one generation slot
    assert scheduler.admit_waiting(NOW) == [chats[0], urgent, a]
    assert scheduler.admit_waiting(NOW) == [] and scheduler.free_score_slots() == 0
    scheduler.release(urgent)
    scheduler.release(a)
    scheduler.release(chats[0])
    assert scheduler.admit_waiting(NOW) == [chats[1], b, c]


def test_long_texts_hold_at_most_half_the_scoring_slots_and_short_ones_pass_them():
    longs = [scoring(150, first=1000 * i) for i in range(1, 4)]  # over budget / 4 = 100 tokens: long
    shorts = [scoring(20, first=5000), scoring(30, first=6000)]
    scheduler = scheduler_of(*longs, *shorts, score_slots=4, budget=400)
    assert scheduler.admit_waiting(NOW) == [shorts[0], shorts[1], longs[0], longs[1]]
    for row in shorts:
        scheduler.release(row)
    assert scheduler.admit_waiting(NOW) == []  # two slots free, but two long texts already hold half of them
    late = scoring(10, first=9000)
    scheduler.add(late)
    assert scheduler.admit_waiting(NOW) == [late]
    scheduler.release(longs[0])
    assert scheduler.admit_waiting(NOW) == [longs[2]]


def test_a_scoring_row_waits_by_its_tokens_past_the_cached_prefix():
    scheduler = scheduler_of(budget=40)
    shared = list(range(100, 132))  # eight full blocks of 4
    cached = GenerationRow.scoring(shared)
    scheduler.admit(cached)
    cached.cached = len(shared)
    scheduler.blocks.grow(cached, len(shared))
    scheduler.blocks.register(cached)
    scheduler.release(cached)  # its blocks stay in the prefix cache
    long_tail, cached_head = scoring(20, first=500), scoring(0)
    cached_head.prompt_ids = shared + [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]  # 44 tokens, 12 of its own
    for row in (long_tail, cached_head):
        scheduler.add(row)
    assert (cached_head.own_tokens, long_tail.own_tokens) == (12, 20)
    assert scheduler.admit_waiting(NOW) == [cached_head, long_tail]  # ordered by what each computes
