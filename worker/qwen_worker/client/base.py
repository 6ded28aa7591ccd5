"""The one interface the HTTP side talks to the engine through, in-process or in another process."""
from __future__ import annotations

import abc
import itertools
import os
import threading

from ..protocol import GENERATE, SENTIMENT, Cancel, Output, Request, RequestFailed, Status
from ..sampling import GREEDY, SamplingParams
from .handle import RequestHandle


class EngineClient(abc.ABC):
    """Submits Requests and hands each Output to its request's handle.

    Request ids start at this process's pid << 32, so that the ids of every API process sharing one
    engine process are distinct without the engine renumbering them."""

    prompter = None  # the served model's prompt builder (its tokenizer), once the engine is ready

    def __init__(self):
        self._handles: dict[int, RequestHandle] = {}
        self._ids = itertools.count((os.getpid() << 32) + 1)
        self._lock = threading.Lock()

    # ---- requests -------------------------------------------------------------------------------
    def sentiment(self, task: str, prompt: list[int], deadline: float) -> RequestHandle:
        """One sentiment request (sentiments of one); RequestFailed at once when refused here."""
        job, = self.sentiments(task, [prompt], deadline)
        if isinstance(job, RequestFailed):
            raise job
        return job

    def sentiments(self, task: str, prompts: list[list[int]], deadline: float) -> list:
        """Several sentiment requests sent together: each one's handle, or the RequestFailed that refused
        it here."""
        requests = [Request(next(self._ids), SENTIMENT, task, prompt, deadline) for prompt in prompts]
        handles = [RequestHandle(request, self._cancel) for request in requests]
        with self._lock:
            self._handles.update((handle.request.id, handle) for handle in handles)
        refusals: list = list(requests)  # until they are sent, as if each was refused: its handle let go
        try:
            refusals = self.send_requests(requests)
        finally:
            with self._lock:
                for handle, refusal in zip(handles, refusals):
                    if refusal is not None:
                        self._handles.pop(handle.request.id, None)
        return [refusal or handle for handle, refusal in zip(handles, refusals)]

    def generate(self, task: str, prompt: list[int], deadline: float, max_tokens: int,
                 sampling: SamplingParams = GREEDY, stream: bool = False) -> RequestHandle:
        return self._submit(Request(next(self._ids), GENERATE, task, prompt, deadline, max_tokens, sampling, stream))

    def _submit(self, request: Request) -> RequestHandle:
        """RequestFailed at once when the engine refused it here (a remote engine's refusals arrive as
        the request's final output)."""
        handle = RequestHandle(request, self._cancel)
        with self._lock:
            self._handles[request.id] = handle
        try:
            self.send_request(request, handle)
        except Exception:
            with self._lock:
                self._handles.pop(request.id, None)
            raise
        return handle

    def _cancel(self, handle: RequestHandle, reason: str) -> None:
        with self._lock:
            held = self._handles.pop(handle.request.id, None)
        if held is not None:
            self.send_cancel(Cancel(handle.request.id, reason))

    def deliver(self, outputs: list[Output]) -> None:
        """The engine's outputs of one pass, each to its request's handle (a final one also ends it here)."""
        with self._lock:
            routed = [(self._handles.pop(out.id, None) if out.final else self._handles.get(out.id), out)
                      for out in outputs]
        for handle, output in routed:
            if handle is not None:
                handle.deliver(output)

    def fail_all(self, code: str, message: str) -> None:
        """Every request waiting fails with `code` (the engine is gone)."""
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        for handle in handles:
            handle.deliver(Output(handle.request.id, error=code, message=message))

    # ---- what each transport does ----------------------------------------------------------------
    @abc.abstractmethod
    def send_request(self, request: Request, handle: RequestHandle) -> None: ...

    def send_requests(self, requests: list[Request]) -> list[RequestFailed | None]:
        """Requests that need no acknowledgement (not streams), in order: what refused each one here."""
        refusals: list[RequestFailed | None] = []
        for request in requests:
            try:
                self.send_request(request, None)
                refusals.append(None)
            except RequestFailed as refused:
                refusals.append(refused)
        return refusals

    @abc.abstractmethod
    def send_cancel(self, cancel: Cancel) -> None: ...

    @abc.abstractmethod
    def status(self) -> Status:
        """The engine's state now (in-process) or as it last said (remote)."""

    @abc.abstractmethod
    def control(self, op: str) -> Status:
        """status | drain | undrain, answered once the engine has applied it."""

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return True

    def other_heaps(self) -> dict[int, dict[str, int]]:
        """C heaps of other processes of this instance, by pid (for qaio_heap_bytes)."""
        return {}
