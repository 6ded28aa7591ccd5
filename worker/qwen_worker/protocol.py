"""The engine contract: the few typed messages that cross between the HTTP side and the engine loop,
whether the loop runs on a thread of the same process or in an engine process behind a socket.

Both layouts use exactly these types. Over the socket each message travels as a plain tuple
`(tag, *fields)` (`encode`/`decode`): pickling tuples of ints and strings is ~4x cheaper than pickling
dataclasses, and a peer speaking another PROTOCOL_VERSION is refused at its first message.
Deadlines and timestamps are time.monotonic() values: one clock for every process on the host.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .sampling import GREEDY, SamplingParams

PROTOCOL_VERSION = 5

SENTIMENT = "sentiment"  # score the label tokens after the prompt: one pass, between decode steps
GENERATE = "generate"  # a generation row in the running batch


class RequestFailed(Exception):
    """A request the engine did not complete; `code` names why (the HTTP side maps codes to statuses)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(slots=True)
class Request:
    """One unit of engine work: a sentiment prompt, or a generation."""

    id: int
    kind: str  # SENTIMENT | GENERATE
    task: str  # the API task it serves (metrics and logs)
    prompt: list[int]
    deadline: float
    max_tokens: int = 0
    sampling: SamplingParams = GREEDY
    stream: bool = False  # send tokens with every pass, not only with the last output


@dataclasses.dataclass(slots=True)
class Output:
    """What one pass produced for one request. A request gets zero or more non-final outputs (started,
    streamed tokens), then exactly one final one: finish_reason, scores or error set."""

    id: int
    tokens: list[int] = dataclasses.field(default_factory=list)  # new since the last output
    # Per token when the request asked for logprobs: (log-probability, top ids, their log-probabilities).
    logprobs: list[tuple] | None = None
    finish_reason: str | None = None  # stop | length | deadline | cancelled
    scores: dict[str, float] | None = None  # a sentiment request's label probabilities
    error: str | None = None  # a code: queue_full, deadline_exceeded, model_error, ...
    message: str = ""
    started_at: float | None = None  # set once the engine took the request (queue wait ends)
    finished_at: float | None = None
    first_token_at: float | None = None  # a generation's first token (time to first token)
    batch_size: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys came from the prefix cache (final outputs)

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.scores is not None or self.error is not None


@dataclasses.dataclass(slots=True)
class Cancel:
    """The request's client left or gave up: a queued request leaves the queue, a running one stops."""

    id: int
    reason: str = "client_gone"  # the rejection it counts as while still queued


@dataclasses.dataclass(slots=True)
class Control:
    """An operator's request to the engine, answered with a Status carrying the same `id`."""

    id: int
    op: str  # status | drain | undrain


@dataclasses.dataclass(slots=True)
class ModelInfo:
    """The served model as the HTTP side needs it: its tokenizer's source, its description, and the
    calibration of its sentiment scores (calibration.Calibration.as_dict())."""

    name: str
    source: str
    identity: str  # the front door's cache key name of it
    describe: dict[str, Any]
    demo_info: dict | None = None
    stand_in_info: dict | None = None
    fallback_reason: str | None = None
    calibration: dict | None = None


@dataclasses.dataclass(slots=True)
class Status:
    """The engine's state: pushed periodically by an engine process, and the reply to a Control."""

    state: str  # loading | failed | ready | cooling_down | draining
    accepting: bool = False  # loaded and not broken: requests may be sent (a draining engine refuses them)
    ready: bool = False  # what /readyz says
    draining: bool = False
    broken: str | None = None  # a sticky device error: the instance must be replaced
    load_error: str | None = None
    queue_depth: int = 0
    busy: int = 0  # requests held: queued, scoring or generating (what a drain waits for)
    model: ModelInfo | None = None
    pid: int = 0
    heap: dict[str, int] | None = None  # the engine process's C heap, for qaio_heap_bytes
    kv: dict[str, int] | None = None  # the KV pool and prefix cache (Engine.kv_stats()), once loaded
    reply_to: int = 0  # the Control it answers (0: pushed)


_TYPES = {cls.__name__: cls for cls in (Request, Output, Cancel, Control, Status)}
_FIELDS = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in _TYPES.values()}
_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelInfo))
_SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
_SAMPLING_AT = _FIELDS[Request].index("sampling")


def encode(message) -> tuple:
    cls = type(message)
    values = [getattr(message, name) for name in _FIELDS[cls]]
    if cls is Status and message.model is not None:
        values[_FIELDS[Status].index("model")] = tuple(getattr(message.model, n) for n in _MODEL_FIELDS)
    elif cls is Request:
        values[_SAMPLING_AT] = tuple(getattr(message.sampling, n) for n in _SAMPLING_FIELDS)
    return (cls.__name__, *values)


def decode(packed: tuple):
    cls = _TYPES.get(packed[0]) if packed else None
    if cls is None or len(packed) != len(_FIELDS[cls]) + 1:
        raise ValueError(f"not a message of protocol version {PROTOCOL_VERSION}: {packed[:1]!r}")
    message = cls(*packed[1:])
    if cls is Status and message.model is not None:
        message.model = ModelInfo(*message.model)
    elif cls is Request:
        message.sampling = SamplingParams(*message.sampling)
    return message


def hello() -> tuple:
    """The first thing each side sends: its protocol version."""
    return ("hello", PROTOCOL_VERSION)


def check_hello(packed) -> None:
    if not (isinstance(packed, tuple) and packed[:1] == ("hello",) and packed[1:] == (PROTOCOL_VERSION,)):
        raise ValueError(f"peer speaks another engine protocol than version {PROTOCOL_VERSION}: {packed!r}")
