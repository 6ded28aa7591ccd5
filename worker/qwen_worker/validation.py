"""Parsing and checking of client input; every problem becomes an ApiError (4xx)."""
from __future__ import annotations

import json
import math
import re
import unicodedata
from typing import Any

from flask import request

from .errors import ApiError, bad_request
from .prompts import Message

ROLES = ("system", "developer", "user", "assistant")  # developer: what OpenAI's SDK sends for system
_ALLOWED_CONTROLS = {"\t", "\n", "\r"}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def json_body() -> dict[str, Any]:
    """The request body as a JSON object; 415 / 400 / 413 otherwise."""
    if request.mimetype != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    raw = request.get_data(cache=True)  # werkzeug raises 413 past MAX_CONTENT_LENGTH
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("the body is not valid UTF-8", "invalid_json") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"the body is not valid JSON: {str(exc)[:200]}", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object", "invalid_json")
    return body


def text_value(value: Any, field: str, max_chars: int) -> str:
    """A non-empty string of printable text no longer than max_chars."""
    if not isinstance(value, str):
        raise bad_request(f"`{field}` must be a string")
    if not value.strip():
        raise bad_request(f"`{field}` must not be empty", "empty_text")
    if len(value) > max_chars:
        raise ApiError(413, "text_too_long", f"`{field}` is longer than {max_chars} characters")
    for ch in value:
        category = unicodedata.category(ch)
        if (category == "Cc" and ch not in _ALLOWED_CONTROLS) or category == "Cs":
            raise bad_request(f"`{field}` contains a control character or lone surrogate "
                              f"(U+{ord(ch):04X})", "invalid_text")
    return value


def optional_int(body: dict, field: str, minimum: int, maximum: int, default: int | None) -> int | None:
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"`{field}` must be an integer")
    if not minimum <= value <= maximum:
        raise bad_request(f"`{field}` must be between {minimum} and {maximum}")
    return value


def optional_number(body: dict, field: str, minimum: float, maximum: float, default: float,
                    exclusive_min: bool = False) -> float:
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"`{field}` must be a number")
    if value > maximum or value < minimum or (exclusive_min and value == minimum):
        raise bad_request(f"`{field}` must be {'above' if exclusive_min else 'at least'} {minimum} "
                          f"and at most {maximum}")
    return float(value)


def optional_bool(body: dict, field: str, default: bool = False) -> bool:
    value = body.get(field)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"`{field}` must be true or false")
    return value


def choice(body: dict, field: str, choices: tuple[str, ...], default: str) -> str:
    value = body.get(field, default)
    if value not in choices:
        raise bad_request(f"`{field}` must be one of {', '.join(choices)}")
    return value


def _content_text(content: Any, field: str, max_chars: int) -> str:
    # The OpenAI format also allows a list of parts; only text parts mean anything to this model.
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"`{field}` parts must be objects of type text")
            parts.append(part["text"])
        content = "".join(parts)
    return text_value(content, field, max_chars)


def messages(body: dict, max_messages: int, max_chars: int) -> list[Message]:
    """Chat messages from `messages` (list of {role, content}) or `text` (one user message)."""
    has_messages, has_text = "messages" in body, "text" in body
    if has_messages == has_text:
        raise bad_request("give either `messages` or `text`")
    if has_text:
        return [Message("user", text_value(body["text"], "text", max_chars))]
    items = body["messages"]
    if not isinstance(items, list) or not items:
        raise bad_request("`messages` must be a non-empty list")
    if len(items) > max_messages:
        raise ApiError(413, "too_many_messages", f"at most {max_messages} messages per request")
    result = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise bad_request(f"`messages[{i}]` must be an object")
        role = item.get("role")
        if role not in ROLES:
            raise bad_request(f"`messages[{i}].role` must be one of {', '.join(ROLES)}")
        if role in ("system", "developer") and i != 0:
            raise bad_request("a system (or developer) message may only come first")
        result.append(Message("system" if role == "developer" else role, _content_text(item.get("content"), f"messages[{i}].content", max_chars)))
    if result[-1].role != "user":
        raise bad_request("the last message must come from the user")
    return result


# Header values we parse as numbers: ASCII digits only (str.isdigit() also takes superscripts and
# other scripts' digits, which int() then refuses or reads), and short enough for any int().
_HEADER_INT = re.compile(r"[0-9]{1,12}", re.ASCII)


def header_int(name: str, minimum: int) -> int | None:
    """An integer request header; absent: None; anything but 1-12 ASCII digits, or below minimum: 400."""
    value = request.headers.get(name)
    if value is None:
        return None
    if not _HEADER_INT.fullmatch(value) or int(value) < minimum:
        raise bad_request(f"{name} must be an integer of at least {minimum} (up to 12 digits)", "invalid_header")
    return int(value)


def deadline_ms(body: dict, default_ms: int) -> int:
    """The request's deadline: the task default, lowered by `deadline_ms` or the X-Deadline-Ms header."""
    requested = [optional_int(body, "deadline_ms", 1, default_ms * 1000, None), header_int("X-Deadline-Ms", 1)]
    return min([default_ms] + [r for r in requested if r is not None])
