"""The engine loop's outbox alone: what a stream's outputs carry pass by pass, on a clock the test moves."""
from qwen_worker.core.arrivals import Work
from qwen_worker.core.outbox import Outbox
from qwen_worker.engine import GenerationRow
from qwen_worker.protocol import GENERATE, Request


STEP_S = 1 / 128  # binary fractions: the clock's sums are exact


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def stream(request_id=1, stream=True):
    request = Request(request_id, GENERATE, "chat", [1, 2, 3], 1e9, 64, stream=stream)
    return Work(request, GenerationRow(request.prompt, 64))


def passes(interval_s, steps, works):
    """Each step: every work's row gains a token, the outbox flushes, the clock moves STEP_S. Returns the
    tokens of each output per pass."""
    clock, sent = Clock(), []
    outbox = Outbox(lambda outputs: sent.append([(o.id, list(o.tokens)) for o in outputs]), interval_s, clock)
    for step in range(steps):
        for work in works:
            work.row.tokens.append(1000 + step)
        outbox.flush(works)
        if len(sent) < step + 1:
            sent.append([])
        clock.now += STEP_S
    return sent, outbox


def test_a_streams_first_token_goes_out_at_once_and_the_rest_once_per_interval_together():
    work = stream()
    sent, _ = passes(4 * STEP_S, 12, [work])
    assert sent[0] == [(1, [1000])], "the first token in the pass that produced it"
    assert sent[1:4] == [[], [], []], "the next ones wait for the interval"
    assert sent[4] == [(1, [1001, 1002, 1003, 1004])], "then go as one output"
    assert sent[8] == [(1, [1005, 1006, 1007, 1008])]
    assert [t for p in sent for _, tokens in p for t in tokens] == [1000 + i for i in range(9)]  # each once, in order


def test_the_final_output_carries_every_token_the_interval_held_back():
    work = stream()
    sent, outbox = passes(4 * STEP_S, 3, [work])
    outbox.final(work, finish_reason="length")
    outbox.flush([])
    assert sent[-1][0][1] == [1001, 1002] and sent[-1][0][0] == 1


def test_without_an_interval_every_pass_sends_its_token_and_unstreamed_rows_send_nothing_until_final():
    streamed, unstreamed = stream(1), stream(2, stream=False)
    sent, _ = passes(0.0, 4, [streamed, unstreamed])
    assert sent == [[(1, [1000 + step])] for step in range(4)]
