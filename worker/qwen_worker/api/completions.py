"""OpenAI's (legacy) completions: a plain prompt continued, for gateways whose model-server protocol
names Completions (the Kubernetes Gateway API inference extension) and for raw prompting."""
from __future__ import annotations

import time

from flask import Blueprint, g, jsonify

from .. import validation as v
from ..errors import ApiError, bad_request
from ..protocol import RequestFailed
from . import choices as ch
from .common import envelope, service, sse
from .logprob_view import completions_logprobs
from .openai_compat import COMMON_FIELDS, FINISH, check_stream_choices, stream_options
from .params import generation, refuse_unknown
from .tasks import error_event

bp = Blueprint("completions", __name__, url_prefix="/v1")

FIELDS = COMMON_FIELDS | {"prompt", "echo", "best_of"}


def _prompt(body: dict, max_chars: int) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise bad_request("`prompt` must be a string (or a list of one string; token ids are not accepted)",
                              "unsupported_parameter")
        prompt = prompt[0]
    return v.text_value(prompt, "prompt", max_chars)


@bp.post("/completions")
def completions():
    svc = service()
    body = v.json_body()
    refuse_unknown(body, FIELDS)
    text = _prompt(body, svc.config.max_input_chars)
    if v.optional_bool(body, "echo"):
        raise bad_request("`echo` is not supported (the answer holds only the completion)", "unsupported_parameter")
    gen = generation(body, logprobs_style="completions")
    best_of = v.optional_int(body, "best_of", 1, svc.config.max_choices, gen.n)
    if best_of != gen.n:
        raise bad_request("`best_of` other than `n` is not supported", "unsupported_parameter")
    stream = v.optional_bool(body, "stream")
    include_usage = stream_options(body, stream)
    check_stream_choices(stream, gen.n)
    deadline = svc.deadline(v.deadline_ms(body, svc.config.chat_deadline_ms), g.arrived)
    g.log_fields.update(task="completion", input_chars=len(text), stream=stream, n=gen.n)
    # A raw prompt: its own markup (ChatML control tokens included) is the client's to write.
    prompt = svc.prompter.markup(text)
    completion_id = f"cmpl-{g.request_id}"
    created = int(time.time())
    handles = ch.start(prompt, gen, deadline, "completion", stream)
    if stream:
        return sse(_chunks(handles[0], gen, completion_id, created, include_usage))
    done = ch.finish_all(handles, gen)
    return jsonify({
        "id": completion_id, "object": "text_completion", "created": created, "model": svc.config.model_name,
        "choices": [{"index": i, "text": c.text, "finish_reason": FINISH[c.finish_reason],
                     "logprobs": _logprobs(c.handle, gen)} for i, c in enumerate(done)],
        "usage": ch.usage(handles),
        "system_fingerprint": svc.config.instance_id,
        "qaio": envelope(handles, finish_reason=done[0].finish_reason),
    })


def _logprobs(handle, gen, start: int = 0, end: int | None = None, offset: int = 0) -> dict | None:
    if gen.sampling["logprobs"] < 0:
        return None
    end = len(handle.tokens) if end is None else end
    return completions_logprobs(ch.token_text(), handle.tokens[start:end], handle.logprobs[start:end], offset)


def _chunks(handle, gen, completion_id: str, created: int, include_usage: bool):
    model = service().config.model_name

    def chunk(text: str, finish_reason=None, logprobs=None) -> dict:
        return {"id": completion_id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}

    offset = 0
    try:
        for text, start, end in service().pieces(handle, g.client_gone, ch.stops(gen)):
            yield chunk(text, logprobs=_logprobs(handle, gen, start, end, offset))
            offset += len(text)
    except (ApiError, RequestFailed) as err:
        yield error_event(err)
        return
    yield chunk("", FINISH[handle.finish_reason])
    if include_usage:
        yield {"id": completion_id, "object": "text_completion", "created": created, "model": model,
               "choices": [], "usage": ch.usage([handle])}
    yield "[DONE]"
