"""The engine contract: the few typed messages that cross between the HTTP side and the engine loop,
whether the loop runs on a thread of the same process or in an engine process behind a socket.

Both layouts use exactly these types: msgspec Structs, which over the socket travel as MessagePack
arrays in lists (`encode_batch`/`decode_batch`; one frame carries what a pass or a burst of requests
produced). A Struct is built, encoded and decoded in C: ~0.3 us for a streamed output, all three, where
tuples of dataclass fields through pickle took ~1.8 us; and what arrives is checked against its type
(a malformed message is an error there, not a wrong value later). A peer speaking another
PROTOCOL_VERSION is refused at its first message. Deadlines and timestamps are time.monotonic() values:
one clock for every process on the host.
"""
from __future__ import annotations

from typing import Any, Union

import msgspec

from .sampling import GREEDY, SamplingParams

PROTOCOL_VERSION = 6

SENTIMENT = "sentiment"  # score the label tokens after the prompt: one pass, between decode steps
GENERATE = "generate"  # a generation row in the running batch


class RequestFailed(Exception):
    """A request the engine did not complete; `code` names why (the HTTP side maps codes to statuses)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class Request(msgspec.Struct, array_like=True, tag=True, omit_defaults=True, gc=False):
    """One unit of engine work: a sentiment prompt, or a generation."""

    id: int
    kind: str  # SENTIMENT | GENERATE
    task: str  # the API task it serves (metrics and logs)
    prompt: list[int]
    deadline: float
    max_tokens: int = 0
    sampling: SamplingParams = GREEDY
    stream: bool = False  # send tokens with every pass, not only with the last output


class Output(msgspec.Struct, array_like=True, tag=True, omit_defaults=True, gc=False):
    """What one pass produced for one request. A request gets zero or more non-final outputs (started,
    streamed tokens), then exactly one final one: finish_reason, scores or error set."""

    id: int
    tokens: list[int] = []  # new since the last output (each Output gets a list of its own)
    first_token_at: float | None = None  # a generation's first token (time to first token)
    # Per token when the request asked for logprobs: (log-probability, top ids, their log-probabilities).
    logprobs: list[tuple] | None = None
    finish_reason: str | None = None  # stop | length | deadline | cancelled
    scores: dict[str, float] | None = None  # a sentiment request's label probabilities
    error: str | None = None  # a code: queue_full, deadline_exceeded, model_error, ...
    message: str = ""
    started_at: float | None = None  # set once the engine took the request (queue wait ends)
    finished_at: float | None = None
    batch_size: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys came from the prefix cache (final outputs)

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.scores is not None or self.error is not None


class Cancel(msgspec.Struct, array_like=True, tag=True, omit_defaults=True):
    """The request's client left or gave up: a queued request leaves the queue, a running one stops."""

    id: int
    reason: str = "client_gone"  # the rejection it counts as while still queued


class Control(msgspec.Struct, array_like=True, tag=True, omit_defaults=True):
    """An operator's request to the engine, answered with a Status carrying the same `id`."""

    id: int
    op: str  # status | drain | undrain


class ModelInfo(msgspec.Struct, array_like=True):
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


class Status(msgspec.Struct, array_like=True, tag=True, omit_defaults=True):
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


class Hello(msgspec.Struct, array_like=True, tag=True):
    """The first thing each side sends: its protocol version."""

    version: int


Message = Union[Request, Output, Cancel, Control, Status]


def _plain(value):
    """A value of a free-form field (a model's description) that MessagePack has no type for: a numpy or
    torch scalar as its number, anything else as its text, never an error that would stop a sender."""
    item = getattr(value, "item", None)
    return item() if callable(item) else str(value)


_encoder = msgspec.msgpack.Encoder(enc_hook=_plain)  # keeps no state between calls: one serves every thread
_batch = msgspec.msgpack.Decoder(list[Message])
_hello = msgspec.msgpack.Decoder(Hello)


def encode_batch(messages: list) -> bytes:
    return _encoder.encode(messages)


def decode_batch(data: bytes) -> list:
    """The messages of one frame; ValueError for anything that is not a list of this version's messages."""
    try:
        return _batch.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a message of protocol version {PROTOCOL_VERSION}: {exc}") from None


def hello() -> bytes:
    return _encoder.encode(Hello(PROTOCOL_VERSION))


def check_hello(data: bytes) -> None:
    try:
        version = _hello.decode(data).version
    except msgspec.DecodeError:
        version = None
    if version != PROTOCOL_VERSION:
        raise ValueError(f"peer speaks another engine protocol than version {PROTOCOL_VERSION}: {bytes(data[:40])!r}")
