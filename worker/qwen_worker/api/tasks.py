"""The product's own API: sentiment, chat and analyze (sentiment, then an empathetic reply)."""
from __future__ import annotations

from flask import Blueprint, g, jsonify

from .. import validation as v
from ..batcher import deadline_error
from ..errors import ApiError
from ..engine import GenerationRow
from ..prompts import detect_language
from ..service import TokenStream, sentiment_view
from .common import envelope, service, sse

bp = Blueprint("tasks", __name__, url_prefix="/v1")


def usage(row: GenerationRow) -> dict:
    return {"prompt_tokens": len(row.prompt_ids), "completion_tokens": len(row.tokens),
            "total_tokens": len(row.prompt_ids) + len(row.tokens)}


def generation_params(body: dict) -> dict:
    cfg = service().config
    return {"max_tokens": v.optional_int(body, "max_tokens", 1, cfg.max_tokens_limit, cfg.default_max_tokens),
            "temperature": v.optional_number(body, "temperature", 0.0, 2.0, cfg.default_temperature),
            "top_p": v.optional_number(body, "top_p", 0.0, 1.0, cfg.default_top_p, exclusive_min=True)}


def finished_row(job) -> GenerationRow:
    """The generated row of a non-streaming job; a generation cut by its deadline is a 504."""
    row: GenerationRow = job.wait(g.client_gone)
    if row.finish_reason == "deadline":
        raise deadline_error()
    return row


def _sentiment(body: dict, task: str, default_deadline_ms: int):
    svc = service()
    text = v.text_value(body.get("text"), "text", svc.config.max_input_chars)
    lang = v.choice(body, "lang", ("auto", "zh", "en"), "auto")
    if lang == "auto":
        lang = detect_language(text)
    deadline = svc.deadline(v.deadline_ms(body, default_deadline_ms), g.arrived)
    g.log_fields.update(task=task, input_chars=len(text))
    if task == "analyze":
        svc.check_analyze_tokens(text)
    job = svc.submit_sentiment(text, lang, deadline, task=task)
    return text, lang, job, sentiment_view(job.wait(g.client_gone))


@bp.post("/sentiment")
def sentiment():
    body = v.json_body()
    _, lang, job, result = _sentiment(body, "sentiment", service().config.sentiment_deadline_ms)
    g.cacheable = True
    return jsonify(envelope([job], sentiment=result, lang=lang))


@bp.post("/chat")
def chat():
    svc = service()
    body = v.json_body()
    messages = v.messages(body, svc.config.max_messages, svc.config.max_input_chars)
    params = generation_params(body)
    stream = v.optional_bool(body, "stream")
    deadline = svc.deadline(v.deadline_ms(body, svc.config.chat_deadline_ms), g.arrived)
    g.log_fields.update(task="chat", input_chars=sum(len(m.content) for m in messages), stream=stream)
    prompt = svc.chat_ids(messages)
    if stream:
        tokens = svc.token_stream(g.client_gone)
        job = svc.submit_generation(prompt, **params, deadline=deadline, task="chat", stream=tokens)
        return sse(_chat_events(tokens, job))
    job = svc.submit_generation(prompt, **params, deadline=deadline, task="chat")
    row = finished_row(job)
    g.cacheable = params["temperature"] == 0
    return jsonify(envelope([job], reply=svc.model.decode(row.tokens), finish_reason=row.finish_reason,
                            usage=usage(row)))


def _chat_events(tokens: TokenStream, job):
    try:
        for delta in tokens.deltas():
            yield {"delta": delta}
        row: GenerationRow = job.future.result(timeout=0)
    except ApiError as err:
        yield {"error": {"code": err.code, "message": err.message, "request_id": g.request_id}}
        return
    yield {"done": True, **envelope([job], finish_reason=row.finish_reason, usage=usage(row))}


@bp.post("/analyze")
def analyze():
    svc = service()
    body = v.json_body()
    text, lang, sentiment_job, result = _sentiment(body, "analyze", svc.config.chat_deadline_ms)
    params = generation_params(body)
    prompt = svc.analyze_ids(text, result["label"])
    # Both steps share the request's one deadline, which the sentiment job carries.
    chat_job = svc.submit_generation(prompt, **params, deadline=sentiment_job.deadline, task="analyze")
    row = finished_row(chat_job)
    g.cacheable = params["temperature"] == 0
    return jsonify(envelope([sentiment_job, chat_job], sentiment=result, lang=lang,
                            reply=svc.model.decode(row.tokens), finish_reason=row.finish_reason,
                            usage=usage(row)))
