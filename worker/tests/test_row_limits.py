"""Rows the engine's tables cannot hold: refused one by one before the device sees them, bounded in
tokens at the HTTP boundary on every path, and never counted as the model's failure."""
import pytest
import torch

from qwen_worker.engine import GenerationRow
from qwen_worker.errors import ENGINE_ERRORS
from qwen_worker.protocol import RequestFailed
from qaio_testing import engine_host

# Astral CJK characters: one character each, two or three byte tokens each for this tokenizer. 3,000
# of them are a legal text (under QAIO_MAX_INPUT_CHARS) of about 7,000 tokens: past the position table.
MANY_TOKENS = "𠀀𪚥𠮷" * 1000


def test_the_texts_are_legal_in_characters_and_past_the_engine_in_tokens(app):
    service = app.extensions["qaio"]
    assert len(MANY_TOKENS) <= service.config.max_input_chars
    assert len(service.prompter.sentiment_ids(MANY_TOKENS, "zh")) > engine_host(service).model.engine.runner.max_tokens


@pytest.mark.parametrize("path, body", [
    ("/v1/sentiment", {"text": MANY_TOKENS}),
    ("/v1/analyze", {"text": MANY_TOKENS, "max_tokens": 2}),
    ("/v1/chat", {"text": MANY_TOKENS, "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": MANY_TOKENS}], "max_tokens": 2}),
], ids=["sentiment", "analyze", "chat", "openai"])
def test_every_path_is_bounded_in_tokens_before_it_is_queued(client, path, body):
    response = client.post(path, json=body)
    assert response.status_code == 413, response.get_data(as_text=True)[:300]
    error = response.get_json()["error"]
    assert error["code"] == "prompt_too_long" and "at most 4096" in error["message"]


def _submit_sentiment(service, ids):
    """Straight to the engine, past the HTTP side's token bound."""
    return service.client.sentiment("sentiment", ids, service.deadline(30_000))


def _outcome(job):
    try:
        job.wait()
        return job.scores if job.request.kind == "sentiment" else job
    except RequestFailed as err:
        err.status = ENGINE_ERRORS[err.code][0]
        return err


def test_a_sentiment_row_past_the_position_table_fails_alone_in_its_pass(make_app):
    """Past the HTTP bound (a direct submission): the engine refuses that row only; the texts scored in
    the same pass get their answers, and the worker stays ready with no failure counted."""
    app = make_app(batch_wait_ms=300.0, max_batch_size=8)
    service = app.extensions["qaio"]
    innocent = service.prompter.sentiment_ids("味道很好", "zh")
    oversized = service.prompter.sentiment_ids(MANY_TOKENS, "zh")
    bad_token = innocent[:-3] + [engine_host(service).model.engine.runner.stack.vocab_size + 5] + innocent[-2:]
    for _ in range(3):  # three in a row used to put the worker into cooling_down
        jobs = [_submit_sentiment(service, ids) for ids in (innocent, oversized, innocent, bad_token, innocent)]
        outcomes = [_outcome(job) for job in jobs]
        assert [type(o) for o in outcomes] == [dict, RequestFailed, dict, RequestFailed, dict]
        assert (outcomes[1].status, outcomes[1].code) == (413, "prompt_too_long")
        assert (outcomes[3].status, outcomes[3].code) == (400, "invalid_token_id")
        assert max(job.batch_size for job in jobs) == 3  # the innocent three shared one pass
    assert service.status().state == "ready"
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'qaio_model_failures_total{reason="model_error"} 0.0' in metrics
    assert 'qaio_rejections_total{reason="prompt_too_long"} 3.0' in metrics


def test_a_generation_row_the_slots_cannot_hold_fails_alone(make_app):
    app = make_app()
    service = app.extensions["qaio"]
    engine = engine_host(service).model.engine
    prompt = service.prompter.chat_ids([])
    rows = [(prompt + [prompt[-1]] * engine.runner.max_tokens, 4), (prompt, 3), (prompt[:-1] + [-1], 4), (prompt, 3)]
    jobs = [service.client.generate("chat", ids, service.deadline(30_000), max_tokens)
            for ids, max_tokens in rows]
    outcomes = [_outcome(job) for job in jobs]
    assert (outcomes[0].status, outcomes[0].code) == (413, "prompt_too_long")
    assert (outcomes[2].status, outcomes[2].code) == (400, "invalid_token_id")
    assert len(outcomes[1].tokens) == len(outcomes[3].tokens) == 3
    assert engine.free_slots() == engine.runner.slots and service.status().state == "ready"


def test_a_chunk_padded_to_its_width_bucket_answers_as_unpadded(make_app):
    """On a GPU prefill chunks are padded to width buckets: a chunk that ends at the position table's
    end pads past it. Padding repeats the last real position and writes to scratch, so it changes nothing."""
    from qwen_worker.engine.model_runner import PrefillChunk, _round_up

    app = make_app(max_prompt_tokens=120, max_tokens_limit=8, default_max_tokens=8)
    engine = engine_host(app.extensions["qaio"]).model.engine
    runner, blocks = engine.runner, engine.scheduler.blocks
    length = runner.max_tokens - 20
    width = _round_up(length, runner.widths)  # the GPU's width bucket for this chunk
    assert 20 + width > runner.max_tokens  # its padding runs past the tables
    holder = GenerationRow(list(range(100, 100 + runner.max_tokens)), 0)
    assert blocks.grow(holder, runner.max_tokens)
    runner.set_blocks(0, holder.blocks)
    try:
        chunk = PrefillChunk(0, holder.prompt_ids[20:], 20)
        runner.prefill([PrefillChunk(0, holder.prompt_ids[:20], 0)])
        padded = runner._prefill_group([chunk], width)  # the pass the GPU runs for it
        assert padded.shape[0] == 1 and bool(padded.isfinite().all())
        assert torch.allclose(padded, runner._prefill_group([chunk], 0), atol=1e-4)
    finally:
        blocks.release(holder)
        runner.set_blocks(0, ())
