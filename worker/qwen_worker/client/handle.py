"""One request as the HTTP side holds it: its outputs as they come, waiting with its deadline, text
deltas of a stream, and cancelling. The same whichever client (in-process or remote) is behind it."""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator, Sequence

from ..protocol import Output, Request, RequestFailed
from .stops import StopStrings

# A running generation is stopped by the engine at its deadline (finish_reason "deadline"); the handle
# waits this much longer for that last output before it gives up on its own.
RUNNING_GRACE_S = 5.0
CLIENT_POLL_S = 0.1  # how often a waiting request checks that its client is still connected
MAX_WAIT_S = 3600.0  # one wait at most (an infinite timeout overflows)


class RequestHandle:
    def __init__(self, request: Request, cancel: Callable[["RequestHandle", str], None]):
        self.request = request
        self._cancel = cancel
        self._outputs: queue.SimpleQueue[Output] = queue.SimpleQueue()
        self.enqueued_at = time.monotonic()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.first_token_at: float | None = None  # when the engine produced its first token
        self.batch_size = 0
        self.cached_tokens = 0  # prompt tokens the engine found in its prefix cache
        self.tokens: list[int] = []
        self.logprobs: list[tuple] = []  # per token, when the request asked for logprobs
        self.finish_reason: str | None = None
        self.scores: dict[str, float] | None = None
        self.error: RequestFailed | None = None
        self.done = False
        self.first: Output | None = None  # the first output that arrived (a remote stream waits for it)
        self.arrived = threading.Event()
        self.on_success: Callable[["RequestHandle"], None] | None = None  # once, when it completed

    @property
    def deadline(self) -> float:
        return self.request.deadline

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt)

    @property
    def queue_ms(self) -> float:
        end = self.started_at if self.started_at is not None else (self.finished_at or time.monotonic())
        return max(end - self.enqueued_at, 0.0) * 1000

    @property
    def compute_ms(self) -> float:
        if self.started_at is None:
            return 0.0
        return ((self.finished_at or time.monotonic()) - self.started_at) * 1000

    def deliver(self, output: Output) -> None:
        """Called by the client's receiving thread (or the engine loop) with each output."""
        self._outputs.put(output)
        if self.first is None:
            self.first = output
            self.arrived.set()

    def cancel(self, reason: str = "client_gone") -> None:
        """Nobody waits any more: the engine drops it from its queue or stops it at the next step."""
        if not self.done:
            self.done = True
            self._cancel(self, reason)

    # ---- waiting --------------------------------------------------------------------------------
    def wait(self, client_gone: Callable[[], bool] | None = None) -> "RequestHandle":
        """Until the final output; RequestFailed when the request failed, its deadline passed (after the
        grace, once running) or its client left (checked every CLIENT_POLL_S)."""
        while self.finished_at is None and not self.receive(client_gone).final:
            pass
        self._raise_error()
        return self

    def deltas(self, decode: Callable[[Sequence[int]], str], client_gone: Callable[[], bool] | None = None,
               stops: StopStrings | None = None) -> Iterator[str]:
        """Text as it is generated; ends with the request (its outcome is on the handle then)."""
        for text, _, _ in self.pieces(decode, client_gone, stops):
            if text:
                yield text

    def pieces(self, decode: Callable[[Sequence[int]], str], client_gone: Callable[[], bool] | None = None,
               stops: StopStrings | None = None) -> Iterator[tuple[str, int, int]]:
        """(text, first token, end token) as generated: the tokens [first, end) make up the text.

        A piece per wake-up, of every output that arrived by then: the engine already sends a stream's
        tokens coalesced (core/outbox.py), and a reader that fell behind catches up in one piece. With
        stop strings, text that could begin one waits, and at the first one the generation ends there:
        finish_reason "stop", the tokens cut after the one that completed it, the engine told to stop."""
        sent, shown = 0, 0  # tokens decoded; tokens whose piece went out
        try:
            while True:
                final = self.receive(client_gone).final or self._receive_ready()
                # Byte-level BPE decodes token by token without context, so only the tokens not yet sent
                # need decoding; they wait while they end inside a multi-byte character.
                text = decode(self.tokens[sent:])
                if text and (final or not text.endswith("\ufffd")):
                    start, sent = sent, len(self.tokens)
                    if stops is not None:
                        text = stops.push(text)
                        if stops.hit is not None:
                            self._stopped(decode, stops, start)
                            yield text, shown, len(self.tokens)
                            return
                    if text:
                        yield text, shown, sent
                        shown = sent
                if final:
                    rest = stops.flush() if stops is not None else ""
                    if rest or shown < len(self.tokens):
                        yield rest, shown, len(self.tokens)
                    self._raise_error()
                    return
        except GeneratorExit:
            self.cancel("client_gone")  # the client went away: stop generating for it
            raise

    def _stopped(self, decode, stops: StopStrings, start: int) -> None:
        """A stop string came: keep the tokens up to the one that completed it, and stop the engine."""
        end = start + 1  # the stop string is complete only with a token of this piece
        while end < len(self.tokens) and not any(stop in decode(self.tokens[:end]) for stop in stops.stops):
            end += 1
        del self.tokens[end:]
        del self.logprobs[end:]
        self.finish_reason = "stop"
        if not self.done:
            self.cancel("stop_string")
        self.done = True
        self.finished_at = self.finished_at or time.monotonic()
        self._succeeded()

    def receive(self, client_gone=None) -> Output:
        """The next output, applied; raises when the deadline (and grace) passed or the client left."""
        while True:
            budget = self.deadline - time.monotonic() + (RUNNING_GRACE_S if self.started_at is not None else 0.0)
            budget = min(max(budget, 0.01), MAX_WAIT_S)
            timeout = min(budget, CLIENT_POLL_S) if client_gone is not None else budget
            try:
                return self._apply(self._outputs.get(timeout=timeout))
            except queue.Empty:
                if client_gone is not None and client_gone():
                    self.cancel("client_gone")
                    raise RequestFailed("client_closed_request",
                                        "the client closed the connection before the answer") from None
                if timeout >= budget and self._outputs.empty():
                    self.cancel("deadline_in_queue")
                    raise RequestFailed("deadline_exceeded",
                                        "the request's deadline passed before it completed") from None

    def _receive_ready(self) -> bool:
        """Apply every output already here; whether the final one was among them."""
        final = False
        while not final:
            try:
                final = self._apply(self._outputs.get_nowait()).final
            except queue.Empty:
                break
        return final

    def _apply(self, output: Output) -> Output:
        self.tokens.extend(output.tokens)
        if output.logprobs:
            self.logprobs.extend(output.logprobs)
        if output.started_at is not None:
            self.started_at = output.started_at
        if output.first_token_at is not None and self.first_token_at is None:
            self.first_token_at = output.first_token_at
        if output.batch_size:
            self.batch_size = output.batch_size
        if output.cached_tokens:
            self.cached_tokens = output.cached_tokens
        if output.final:
            self.done = True
            self.finished_at = output.finished_at or time.monotonic()
            self.finish_reason, self.scores = output.finish_reason, output.scores
            if output.error is not None:
                self.error = RequestFailed(output.error, output.message)
            elif self.finish_reason in ("stop", "length"):
                self._succeeded()
        return output

    def _succeeded(self) -> None:
        """The on_success hook, once (a stop string's cut and the engine's last output both end it)."""
        hook, self.on_success = self.on_success, None
        if hook is not None:
            hook(self)

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error
