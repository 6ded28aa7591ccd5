"""The product's own API: sentiment (one text or many), chat and analyze (sentiment, then an
empathetic reply; streamed with the sentiment as the first event)."""
from __future__ import annotations

from flask import Blueprint, g, jsonify

from .. import validation as v
from ..client import RequestHandle
from ..errors import ApiError, engine_error
from ..prompts import detect_language
from ..protocol import RequestFailed
from ..service import sentiment_view
from . import choices as ch
from .common import envelope, service, sse
from .logprob_view import chat_content
from .params import GENERATION_FIELDS, Generation, generation, refuse_unknown
from .usage import track

bp = Blueprint("tasks", __name__, url_prefix="/v1")
# Every field each endpoint reads: any other is refused with a 400 naming it, as the OpenAI endpoints do
# (a misspelt `temprature` must not silently mean the default).
SENTIMENT_FIELDS = frozenset({"text", "texts", "lang", "deadline_ms"})
CHAT_FIELDS = GENERATION_FIELDS | {"messages", "text"}
ANALYZE_FIELDS = CHAT_FIELDS | {"lang"}


def usage(handle: RequestHandle) -> dict:
    return ch.usage([handle])


def error_event(err: Exception) -> dict:
    """A stream that fails after its 200 ends with this event."""
    if isinstance(err, RequestFailed):
        err = engine_error(err)
    return {"error": {"code": err.code, "message": err.message, "request_id": g.request_id}}


def _language(body: dict, text: str) -> str:
    lang = v.choice(body, "lang", ("auto", "zh", "en"), "auto")
    return detect_language(text) if lang == "auto" else lang


def _sentiment(body: dict, task: str, default_deadline_ms: int, conversation=None):
    """The sentiment of `text`, or of a conversation's last (user) message."""
    svc = service()
    text = conversation[-1].content if conversation else v.text_value(body.get("text"), "text", svc.config.max_input_chars)
    lang = _language(body, text)
    deadline = svc.deadline(v.deadline_ms(body, default_deadline_ms), g.arrived)
    g.log_fields.update(task=task, input_chars=len(text))
    if task == "analyze":
        svc.check_analyze_tokens(conversation or text)
    job = svc.submit_sentiment(text, lang, deadline, task=task)
    track([job])
    return text, lang, job, sentiment_view(job.wait(g.client_gone).scores, lang, svc.calibration())


@bp.post("/sentiment")
def sentiment():
    body = v.json_body()
    refuse_unknown(body, SENTIMENT_FIELDS)
    if "texts" in body:
        from .bulk import bulk_sentiment

        return bulk_sentiment(body)
    _, lang, job, result = _sentiment(body, "sentiment", service().config.sentiment_deadline_ms)
    g.cacheable = True
    return jsonify(envelope([job], sentiment=result, lang=lang))


def _choice_fields(choice: ch.Choice, gen: Generation) -> dict:
    fields = {"reply": choice.text, "finish_reason": choice.finish_reason}
    if gen.sampling.logprobs >= 0:
        fields["logprobs"] = chat_content(ch.token_text(), choice.tokens, choice.handle.logprobs)
    return fields


def _generated(handles: list[RequestHandle], gen: Generation) -> dict:
    """/v1/chat's answer: the first choice's reply; with n > 1 every choice in `choices` too."""
    done = ch.finish_all(handles, gen)
    g.cacheable = gen.sampling.greedy and gen.n == 1
    extra = {"choices": [_choice_fields(c, gen) for c in done]} if gen.n > 1 else {}
    return envelope(handles, **_choice_fields(done[0], gen), usage=ch.usage(handles), **extra)


@bp.post("/chat")
def chat():
    svc = service()
    body = v.json_body()
    refuse_unknown(body, CHAT_FIELDS)
    messages = v.messages(body, svc.config.max_messages, svc.config.max_input_chars)
    gen = generation(body)
    stream = v.optional_bool(body, "stream")
    if stream and gen.n > 1:
        raise ApiError(400, "unsupported_parameter", "`n` above 1 is not supported with `stream`")
    deadline = svc.deadline(v.deadline_ms(body, svc.config.chat_deadline_ms), g.arrived)
    g.log_fields.update(task="chat", input_chars=sum(len(m.content) for m in messages), stream=stream, n=gen.n)
    handles = ch.start(svc.chat_ids(messages), gen, deadline, "chat", stream)
    if stream:
        return sse(_reply_events(handles[0], gen))
    return jsonify(_generated(handles, gen))


def _reply_events(job: RequestHandle, gen: Generation, *before: RequestHandle, first: dict | None = None):
    """A streamed reply: `first` (analyze's sentiment), text deltas (with their logprobs when asked), a
    last event with the outcome."""
    if first is not None:
        yield first
    last = []  # the text that came with the final output goes out with the outcome, in one write
    try:
        for text, start, end in service().pieces(job, g.client_gone, ch.stops(gen)):
            event = {"delta": text}
            if gen.sampling.logprobs >= 0:
                event["logprobs"] = chat_content(ch.token_text(), job.tokens[start:end], job.logprobs[start:end])
            if job.finished_at is None:
                yield event
            else:
                last.append(event)
    except (ApiError, RequestFailed) as err:
        yield [*last, error_event(err)]
        return
    yield [*last, {"done": True, **envelope([*before, job], finish_reason=job.finish_reason, usage=usage(job))}]


@bp.post("/analyze")
def analyze():
    svc = service()
    body = v.json_body()
    refuse_unknown(body, ANALYZE_FIELDS)
    gen = generation(body)
    stream = v.optional_bool(body, "stream")
    if gen.n > 1:
        raise ApiError(400, "unsupported_parameter", "`n` is not supported by analyze (one sentiment, one reply)")
    # `messages` (a conversation ending with the user's text) or `text`: the sentiment is the last message's.
    conversation = v.messages(body, svc.config.max_messages, svc.config.max_input_chars) if "messages" in body else None
    text, lang, sentiment_job, result = _sentiment(body, "analyze", svc.config.chat_deadline_ms, conversation)
    prompt = svc.analyze_ids(conversation or text, result["label"])
    # Both steps share the request's one deadline, which the sentiment job carries.
    handles = ch.start(prompt, gen, sentiment_job.deadline, "analyze", stream)
    if stream:
        first = {"sentiment": result, "lang": lang, "instance": svc.config.instance_id}
        return sse(_reply_events(handles[0], gen, sentiment_job, first=first))
    done = ch.finish_all(handles, gen)
    g.cacheable = gen.sampling.greedy
    return jsonify(envelope([sentiment_job, *handles], sentiment=result, lang=lang, **_choice_fields(done[0], gen),
                            usage=ch.usage(handles)))
