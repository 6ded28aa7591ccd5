"""A generation request's choices: n rows started together, each waited for (or streamed) with its stop
strings applied, and what the answer says of each."""
from __future__ import annotations

import dataclasses
import functools

from flask import g

from ..client import RequestHandle
from ..client.stops import StopStrings
from ..protocol import RequestFailed
from .common import service
from .logprob_view import TokenText
from .params import Generation
from .usage import track


@dataclasses.dataclass
class Choice:
    handle: RequestHandle
    text: str

    @property
    def finish_reason(self) -> str:
        return self.handle.finish_reason

    @property
    def tokens(self) -> list[int]:
        return self.handle.tokens


def start(prompt: list[int], gen: Generation, deadline: float, task: str, stream: bool = False) -> list[RequestHandle]:
    """n generation rows of one prompt; all or none (a refused one cancels those already queued).
    With stop strings a row streams to this side even when the client does not: the stop is found
    after detokenising, here, and the engine told to stop as soon as it is."""
    svc, handles = service(), []
    try:
        for i in range(gen.n):
            handle = svc.submit_generation(prompt, gen.max_tokens, deadline, task, gen.sampling.for_choice(i),
                                           stream or bool(gen.stop))
            handle.on_success = functools.partial(svc.metrics.observe_generation, task, stream, g.started)
            handles.append(handle)
    except BaseException:
        for handle in handles:
            handle.cancel("client_gone")
        raise
    track(handles)
    return handles


def stops(gen: Generation) -> StopStrings | None:
    return StopStrings(gen.stop) if gen.stop else None


def finish(handle: RequestHandle, gen: Generation) -> Choice:
    """A non-streaming choice once done; one cut by its deadline is a 504."""
    svc = service()
    if gen.stop:
        text = "".join(svc.deltas(handle, g.client_gone, stops(gen)))
    else:
        handle.wait(g.client_gone)
    if handle.finish_reason == "deadline":
        raise RequestFailed("deadline_exceeded", "the request's deadline passed before it completed")
    return Choice(handle, text if gen.stop else svc.decode(handle.tokens))


def finish_all(handles: list[RequestHandle], gen: Generation) -> list[Choice]:
    try:
        return [finish(handle, gen) for handle in handles]
    except BaseException:
        for handle in handles:
            handle.cancel("client_gone")
        raise


def usage(handles: list[RequestHandle]) -> dict:
    """Prompt tokens once (the choices share the prompt), completion tokens of every choice; as OpenAI
    and vLLM report it, how many prompt tokens came from the prefix cache."""
    prompt = handles[0].prompt_tokens
    completion = sum(len(h.tokens) for h in handles)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": handles[0].cached_tokens}}


def token_text() -> TokenText:
    """The served tokenizer's token texts, one cache per tokenizer."""
    tokenizer = service().client.prompter.tokenizer
    cached = getattr(tokenizer, "_qaio_token_text", None)
    if cached is None:
        cached = tokenizer._qaio_token_text = TokenText(tokenizer)
    return cached
