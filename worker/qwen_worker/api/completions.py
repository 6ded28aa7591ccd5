"""OpenAI's (legacy) completions: a plain prompt continued, for gateways whose model-server protocol
names Completions (the Kubernetes Gateway API inference extension) and for raw prompting."""
from __future__ import annotations

from flask import Blueprint, g

from .. import validation as v
from ..errors import bad_request
from . import choices as ch
from .common import service
from .logprob_view import completions_logprobs
from .openai_compat import COMMON_FIELDS, Shape, delivery, respond
from .params import generation, refuse_unknown

bp = Blueprint("completions", __name__, url_prefix="/v1")

FIELDS = COMMON_FIELDS | {"prompt", "echo", "best_of"}
COMPLETION = Shape("cmpl", "text_completion", "text_completion",
                   text=lambda text: {"text": text},
                   delta=lambda text: {"text": "" if text is None else text},
                   logprobs=lambda tokens, logprobs, offset: completions_logprobs(ch.token_text(), tokens, logprobs,
                                                                                  offset))


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
    stream, include_usage, deadline = delivery(body, gen)
    g.log_fields.update(task="completion", input_chars=len(text), stream=stream, n=gen.n)
    # A raw prompt: its own markup (ChatML control tokens included) is the client's to write.
    return respond(COMPLETION, svc.prompter.markup(text), gen, "completion", stream, include_usage, deadline)
