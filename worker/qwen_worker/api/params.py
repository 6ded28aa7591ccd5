"""Generation parameters as clients send them (the product's API and OpenAI's), checked once: what the
engine is asked for, the stop strings the HTTP side watches for, and how many choices."""
from __future__ import annotations

import dataclasses

from .. import validation as v
from ..engine.logprobs import MAX_TOP_LOGPROBS
from ..errors import bad_request
from ..sampling import SEED_LIMIT, SamplingParams
from .common import service

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 64
# A positive logit is divided by the repetition penalty: below this, a real model's logits (tens) grow
# past what a temperature's division and a softmax keep finite.
MIN_REPETITION_PENALTY = 0.01
# What every generating endpoint reads of a body (the product's own and OpenAI's): generation() and delivery.
GENERATION_FIELDS = frozenset({"max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "presence_penalty",
                               "frequency_penalty", "repetition_penalty", "logprobs", "top_logprobs", "n", "stop",
                               "stream", "deadline_ms"})


@dataclasses.dataclass
class Generation:
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    n: int = 1


def generation(body: dict, logprobs_style: str = "chat") -> Generation:
    """logprobs_style: `chat` (logprobs true/false + top_logprobs 0-20, OpenAI chat and /v1/chat) or
    `completions` (logprobs 0-20: that many alternatives, OpenAI's legacy completions)."""
    cfg = service().config
    if "max_completion_tokens" in body and body.get("max_tokens") is None:
        body["max_tokens"] = body["max_completion_tokens"]
    sampling = SamplingParams(
        temperature=v.optional_number(body, "temperature", 0.0, 2.0, cfg.default_temperature),
        top_p=v.optional_number(body, "top_p", 0.0, 1.0, cfg.default_top_p, exclusive_min=True),
        seed=v.optional_int(body, "seed", 0, SEED_LIMIT, None),
        presence_penalty=v.optional_number(body, "presence_penalty", -2.0, 2.0, 0.0),
        frequency_penalty=v.optional_number(body, "frequency_penalty", -2.0, 2.0, 0.0),
        repetition_penalty=v.optional_number(body, "repetition_penalty", MIN_REPETITION_PENALTY, 2.0,
                                             cfg.default_repetition_penalty),
        logprobs=_logprobs(body, logprobs_style),
    )
    return Generation(v.optional_int(body, "max_tokens", 1, cfg.max_tokens_limit, cfg.default_max_tokens),
                      sampling, stop_strings(body), v.optional_int(body, "n", 1, cfg.max_choices, 1))


def _logprobs(body: dict, style: str) -> int:
    if style == "completions":
        count = v.optional_int(body, "logprobs", 0, MAX_TOP_LOGPROBS, None)
        return -1 if count is None else count
    wanted = v.optional_bool(body, "logprobs")
    top = v.optional_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, None)
    if top is not None and not wanted:
        raise bad_request("`top_logprobs` needs `logprobs: true`", "invalid_request")
    return (top or 0) if wanted else -1


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS or \
            not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise bad_request(f"`stop` must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings of "
                          f"at most {MAX_STOP_CHARS} characters")
    return stops


def refuse_unknown(body: dict, accepted: frozenset[str]) -> None:
    """400 naming the first field this server would not honour: nothing a client asks for is ignored.
    A field that asks for nothing (null, false, empty) is let through."""
    for name, value in body.items():
        if name not in accepted and not (value is None or value is False or value in ([], {}, "")):  # 0 is a value
            raise bad_request(f"`{name}` is not supported by this model server", "unsupported_parameter")
