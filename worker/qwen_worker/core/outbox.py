"""What a pass of the engine loop tells the clients: started, streamed tokens, final outputs, sent as one
list per pass (engine thread only).

A stream's first token goes out in the pass that produced it; later tokens at most every
`stream_interval_s`, together (QAIO_STREAM_COALESCE_MS). An output per row per pass would cost both
processes more than the tokens: its message, its delivery to the request and, with no device time to
wait for, a frame per API process per pass.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

from ..protocol import Output, RequestFailed
from .arrivals import Work
from .failures import failure_code

Sink = Callable[[list[Output]], None]


class Outbox:
    def __init__(self, sink: Sink, stream_interval_s: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.sink = sink
        self.stream_interval_s = stream_interval_s
        self.clock = clock
        self._outputs: list[Output] = []

    def started(self, work: Work) -> None:
        self._outputs.append(Output(work.id, started_at=work.started_at, batch_size=work.batch_size))

    def final(self, work: Work, error: Exception | None = None, **fields) -> None:
        """The request's last output, with every generated token not sent yet."""
        output = Output(work.id, started_at=work.started_at, batch_size=work.batch_size, **fields)
        output.tokens = work.row.tokens[work.sent:]
        output.cached_tokens = work.row.cached_prompt_tokens
        output.first_token_at = work.first_token_at or (output.finished_at if work.row.tokens else None)
        if work.row.sampling.logprobs >= 0:
            output.logprobs = work.row.token_logprobs[work.sent:]
        if error is not None:
            output.error, output.message = (error.code, error.message) if isinstance(error, RequestFailed) \
                else failure_code(error)
            output.finished_at = output.finished_at or time.monotonic()
        self._outputs.append(output)

    def flush(self, generating: Iterable[Work]) -> None:
        """Send what this pass produced: streamed tokens of running generations (the first at once, the
        rest once their interval has passed), then the rest."""
        now = self.clock()
        for work in generating:
            tokens = work.row.tokens
            if work.first_token_at is None and tokens:
                work.first_token_at = now
            if work.request.stream and len(tokens) > work.sent and (work.sent == 0 or now >= work.stream_due):
                self._outputs.append(Output(work.id, tokens=tokens[work.sent:],
                                            logprobs=work.row.token_logprobs[work.sent:]
                                            if work.row.sampling.logprobs >= 0 else None,
                                            first_token_at=work.first_token_at))
                work.sent, work.stream_due = len(tokens), now + self.stream_interval_s
        if self._outputs:
            outputs, self._outputs = self._outputs, []
            self.sink(outputs)
