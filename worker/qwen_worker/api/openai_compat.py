"""OpenAI-compatible endpoints, so the `openai` SDK works unchanged against a worker (or nginx)."""
from __future__ import annotations

import time

from flask import Blueprint, g, jsonify

from .. import validation as v
from ..client import RequestHandle
from ..errors import ApiError, bad_request
from ..protocol import RequestFailed
from .common import envelope, service, sse
from .tasks import error_event, finished, generation_params, usage

bp = Blueprint("openai", __name__, url_prefix="/v1")

# OpenAI's finish reasons have no "deadline": a generation cut short is reported as "length".
_FINISH = {"stop": "stop", "length": "length", "deadline": "length", "cancelled": "stop"}
_UNSUPPORTED = ("tools", "functions", "tool_choice", "response_format", "logit_bias")


@bp.get("/models")
def models():
    svc = service()
    return jsonify({"object": "list", "data": [{"id": svc.config.model_name, "object": "model",
                                                "created": 0, "owned_by": "qwen-all-in-one"}]})


@bp.post("/chat/completions")
def chat_completions():
    svc = service()
    body = v.json_body()
    messages = v.messages({"messages": body.get("messages")}, svc.config.max_messages, svc.config.max_input_chars)
    if "max_completion_tokens" in body and "max_tokens" not in body:
        body["max_tokens"] = body["max_completion_tokens"]
    params = generation_params(body)
    if v.optional_int(body, "n", 1, 1, 1) != 1:
        raise bad_request("only n=1 is supported")
    if body.get("stop") not in (None, [], ""):
        raise bad_request("`stop` sequences are not supported", "unsupported_parameter")
    for name in _UNSUPPORTED:
        if body.get(name) not in (None, [], {}):
            raise bad_request(f"`{name}` is not supported by this model server", "unsupported_parameter")
    stream = v.optional_bool(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("`stream_options` must be an object")
    deadline = svc.deadline(v.deadline_ms(body, svc.config.chat_deadline_ms), g.arrived)
    g.log_fields.update(task="chat", input_chars=sum(len(m.content) for m in messages), stream=stream)
    prompt = svc.chat_ids(messages)
    completion_id = f"chatcmpl-{g.request_id}"
    created = int(time.time())
    job = svc.submit_generation(prompt, **params, deadline=deadline, task="chat", stream=stream)
    if stream:
        return sse(_chunks(job, completion_id, created, bool(options.get("include_usage"))))
    row = finished(job)
    return jsonify({
        "id": completion_id, "object": "chat.completion", "created": created, "model": svc.config.model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": svc.decode(row.tokens)},
                     "finish_reason": _FINISH[row.finish_reason], "logprobs": None}],
        "usage": usage(row),
        "system_fingerprint": svc.config.instance_id,
        "qaio": envelope([job], finish_reason=row.finish_reason),
    })


def _chunks(job: RequestHandle, completion_id: str, created: int, include_usage: bool):
    model = service().config.model_name

    def chunk(delta: dict, finish_reason=None, **extra) -> dict:
        return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}

    yield chunk({"role": "assistant", "content": ""})
    try:
        for delta in service().deltas(job, g.client_gone):
            yield chunk({"content": delta})
    except (ApiError, RequestFailed) as err:
        yield error_event(err)
        return
    row = job
    yield chunk({}, _FINISH[row.finish_reason])
    if include_usage:
        yield {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [], "usage": usage(row)}
    yield "[DONE]"
