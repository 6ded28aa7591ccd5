"""What a pass of the engine loop tells the clients: started, streamed tokens, final outputs, sent as one
list per pass (engine thread only)."""
from __future__ import annotations

import time
from typing import Callable, Iterable

from ..protocol import Output, RequestFailed
from .arrivals import Work
from .failures import failure_code

Sink = Callable[[list[Output]], None]


class Outbox:
    def __init__(self, sink: Sink):
        self.sink = sink
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
        """Send what this pass produced: streamed tokens of running generations, then the rest."""
        now = time.monotonic()
        for work in generating:
            if work.first_token_at is None and work.row.tokens:
                work.first_token_at = now
            if work.request.stream and len(work.row.tokens) > work.sent:
                self._outputs.append(Output(work.id, tokens=work.row.tokens[work.sent:],
                                            logprobs=work.row.token_logprobs[work.sent:]
                                            if work.row.sampling.logprobs >= 0 else None,
                                            first_token_at=work.first_token_at))
                work.sent = len(work.row.tokens)
        if self._outputs:
            outputs, self._outputs = self._outputs, []
            self.sink(outputs)
