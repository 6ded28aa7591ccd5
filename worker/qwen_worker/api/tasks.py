"""The product's own API: sentiment, chat and analyze (sentiment, then an empathetic reply)."""
from __future__ import annotations

from flask import Blueprint, g, jsonify

from .. import validation as v
from ..client import RequestHandle
from ..errors import ApiError, engine_error
from ..prompts import detect_language
from ..protocol import RequestFailed
from ..service import sentiment_view
from .common import envelope, service, sse

bp = Blueprint("tasks", __name__, url_prefix="/v1")


def usage(handle: RequestHandle) -> dict:
    return {"prompt_tokens": handle.prompt_tokens, "completion_tokens": len(handle.tokens),
            "total_tokens": handle.prompt_tokens + len(handle.tokens)}


def generation_params(body: dict) -> dict:
    cfg = service().config
    return {"max_tokens": v.optional_int(body, "max_tokens", 1, cfg.max_tokens_limit, cfg.default_max_tokens),
            "temperature": v.optional_number(body, "temperature", 0.0, 2.0, cfg.default_temperature),
            "top_p": v.optional_number(body, "top_p", 0.0, 1.0, cfg.default_top_p, exclusive_min=True)}


def finished(handle: RequestHandle) -> RequestHandle:
    """A non-streaming generation, once done; one cut by its deadline is a 504."""
    handle.wait(g.client_gone)
    if handle.finish_reason == "deadline":
        raise RequestFailed("deadline_exceeded", "the request's deadline passed before it completed")
    return handle


def error_event(err: Exception) -> dict:
    """A stream that fails after its 200 ends with this event."""
    if isinstance(err, RequestFailed):
        err = engine_error(err)
    return {"error": {"code": err.code, "message": err.message, "request_id": g.request_id}}


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
    return text, lang, job, sentiment_view(job.wait(g.client_gone).scores)


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
    job = svc.submit_generation(prompt, **params, deadline=deadline, task="chat", stream=stream)
    if stream:
        return sse(_chat_events(job))
    finished(job)
    g.cacheable = params["temperature"] == 0
    return jsonify(envelope([job], reply=svc.decode(job.tokens), finish_reason=job.finish_reason, usage=usage(job)))


def _chat_events(job: RequestHandle):
    try:
        for delta in service().deltas(job, g.client_gone):
            yield {"delta": delta}
    except (ApiError, RequestFailed) as err:
        yield error_event(err)
        return
    yield {"done": True, **envelope([job], finish_reason=job.finish_reason, usage=usage(job))}


@bp.post("/analyze")
def analyze():
    svc = service()
    body = v.json_body()
    text, lang, sentiment_job, result = _sentiment(body, "analyze", svc.config.chat_deadline_ms)
    params = generation_params(body)
    prompt = svc.analyze_ids(text, result["label"])
    # Both steps share the request's one deadline, which the sentiment job carries.
    chat_job = svc.submit_generation(prompt, **params, deadline=sentiment_job.deadline, task="analyze")
    finished(chat_job)
    g.cacheable = params["temperature"] == 0
    return jsonify(envelope([sentiment_job, chat_job], sentiment=result, lang=lang,
                            reply=svc.decode(chat_job.tokens), finish_reason=chat_job.finish_reason,
                            usage=usage(chat_job)))
