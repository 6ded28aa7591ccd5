"""OpenAI-compatible chat completions and models, so the `openai` SDK works unchanged against a worker
(or nginx). Every field OpenAI defines is honoured or refused with 400 naming it; none is ignored."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

from flask import Blueprint, g, jsonify

from .. import validation as v
from ..errors import ApiError, bad_request
from ..protocol import RequestFailed
from . import choices as ch
from .common import envelope, service, sse
from .logprob_view import chat_content
from .params import Generation, generation, refuse_unknown
from .tasks import error_event

bp = Blueprint("openai", __name__, url_prefix="/v1")

# OpenAI's finish reasons have no "deadline": a generation cut short is reported as "length".
FINISH = {"stop": "stop", "length": "length", "deadline": "length", "cancelled": "stop"}
# `user` names the end user for the operator's logs; `model` may be any name (one model is served,
# and every answer names it).
COMMON_FIELDS = frozenset({"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop",
                           "seed", "presence_penalty", "frequency_penalty", "user", "logprobs",
                           "repetition_penalty", "deadline_ms"})
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}


@bp.get("/models")
def models():
    svc = service()
    model = svc.model()
    return jsonify({"object": "list", "data": [{"id": svc.config.model_name, "object": "model", "created": 0,
                                                "owned_by": "qwen-all-in-one",
                                                "sentiment_calibration": svc.calibration_view(model)}]})


def stream_options(body: dict, stream: bool) -> bool:
    """Whether a stream ends with a usage chunk."""
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("`stream_options` must be an object")
    if set(options) - {"include_usage"}:
        raise bad_request("`stream_options` may only hold `include_usage`", "unsupported_parameter")
    return bool(options.get("include_usage")) and stream


def delivery(body: dict, gen: Generation) -> tuple[bool, bool, float]:
    """stream, include_usage and the deadline; n > 1 streams are refused (one choice per stream)."""
    svc = service()
    stream = v.optional_bool(body, "stream")
    include_usage = stream_options(body, stream)
    if stream and gen.n > 1:
        raise bad_request("`n` above 1 is not supported with `stream`", "unsupported_parameter")
    return stream, include_usage, svc.deadline(v.deadline_ms(body, svc.config.chat_deadline_ms), g.arrived)


@dataclasses.dataclass(frozen=True)
class Shape:
    """How one OpenAI endpoint writes its answers: object names, where a choice's text goes, its logprobs."""

    id_prefix: str
    object: str
    chunk_object: str
    text: Callable[[str], dict]  # a choice's text fields, in the answer
    delta: Callable[[str | None], dict]  # a chunk's text fields (None: the last chunk's)
    logprobs: Callable[[list[int], list[tuple], int], dict]  # tokens, their logprobs, the text's offset
    first_delta: dict | None = None  # the fields of a chunk sent before any text


def respond(shape: Shape, prompt: list[int], gen: Generation, task: str, stream: bool, include_usage: bool,
            deadline: float):
    """Start the choices; answer them as one JSON body, or as a stream of chunks."""
    svc = service()
    completion_id = f"{shape.id_prefix}-{g.request_id}"
    created = int(time.time())
    handles = ch.start(prompt, gen, deadline, task, stream)
    if stream:
        return sse(_chunks(shape, handles[0], gen, completion_id, created, include_usage))
    done = ch.finish_all(handles, gen)
    return jsonify({
        "id": completion_id, "object": shape.object, "created": created, "model": svc.config.model_name,
        "choices": [{"index": i, **shape.text(c.text), "finish_reason": FINISH[c.finish_reason],
                     "logprobs": _logprobs(shape, c.handle, gen)} for i, c in enumerate(done)],
        "usage": ch.usage(handles),
        "system_fingerprint": svc.config.instance_id,
        "qaio": envelope(handles, finish_reason=done[0].finish_reason),
    })


def _logprobs(shape: Shape, handle, gen: Generation, start: int = 0, end: int | None = None,
              offset: int = 0) -> dict | None:
    if gen.sampling.logprobs < 0:
        return None
    end = len(handle.tokens) if end is None else end
    return shape.logprobs(handle.tokens[start:end], handle.logprobs[start:end], offset)


def _chunks(shape: Shape, handle, gen: Generation, completion_id: str, created: int, include_usage: bool):
    model = service().config.model_name

    def chunk(fields: dict, finish_reason=None, logprobs=None) -> dict:
        return {"id": completion_id, "object": shape.chunk_object, "created": created, "model": model,
                "choices": [{"index": 0, **fields, "logprobs": logprobs, "finish_reason": finish_reason}]}

    if shape.first_delta is not None:
        yield chunk(shape.first_delta)
    offset, last = 0, []  # the final output's text goes out with the end of the stream, in one write
    try:
        for text, start, end in service().pieces(handle, g.client_gone, ch.stops(gen)):
            event = chunk(shape.delta(text), logprobs=_logprobs(shape, handle, gen, start, end, offset))
            offset += len(text)
            if handle.finished_at is None:
                yield event
            else:
                last.append(event)
    except (ApiError, RequestFailed) as err:
        yield [*last, error_event(err)]
        return
    last.append(chunk(shape.delta(None), FINISH[handle.finish_reason]))
    if include_usage:
        last.append({"id": completion_id, "object": shape.chunk_object, "created": created, "model": model,
                     "choices": [], "usage": ch.usage([handle])})
    yield [*last, "[DONE]"]


CHAT = Shape("chatcmpl", "chat.completion", "chat.completion.chunk",
             text=lambda text: {"message": {"role": "assistant", "content": text}},
             delta=lambda text: {"delta": {} if text is None else {"content": text}},
             logprobs=lambda tokens, logprobs, offset: {"content": chat_content(ch.token_text(), tokens, logprobs),
                                                        "refusal": None},
             first_delta={"delta": {"role": "assistant", "content": ""}})


@bp.post("/chat/completions")
def chat_completions():
    svc = service()
    body = v.json_body()
    refuse_unknown(body, CHAT_FIELDS)
    messages = v.messages({"messages": body.get("messages")}, svc.config.max_messages, svc.config.max_input_chars)
    gen = generation(body)
    stream, include_usage, deadline = delivery(body, gen)
    g.log_fields.update(task="chat", input_chars=sum(len(m.content) for m in messages), stream=stream, n=gen.n)
    return respond(CHAT, svc.chat_ids(messages), gen, "chat", stream, include_usage, deadline)
