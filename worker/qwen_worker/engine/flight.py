"""Overlapped steps (QAIO_OVERLAP_STEPS): a decode step's tokens stay on the device while the next step is
launched, fed from them there, and are read back after it (a finished row is dropped one step later), so that
on a GPU the host's bookkeeping of step N runs while the device computes step N+1.

Two hazards come with a host that runs a step ahead of the device, and this module answers both: a pinned
buffer that a non-blocking copy reads must not be rewritten before that copy ran (CopyFence), and the
tokens read back need a buffer of their own per step in flight (TokenReadback: two, used in turn; a
step's tokens are always read before the step after next is launched). On a CPU every copy is done when
it returns: both are no-ops there, and a step's tokens are a host tensor already.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from .logprobs import TokenLogprob
from .sequence import GenerationRow

FED = -1  # a decode input token that the device takes from the previous step's tokens


class CopyFence:
    """Guards a pinned host buffer that non-blocking copies to the device read: `wait()` before writing it
    returns once the last copy from it (`copied()` after enqueuing one) has run. Idle unless `active`."""

    def __init__(self, active: bool = False):
        self.active = active
        self._event: torch.cuda.Event | None = None

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    def copied(self) -> None:
        if self.active:
            self._event = self._event or torch.cuda.Event()
            self._event.record()


class TokenReadback:
    """The device-to-host copies of steps' tokens: into two pinned buffers in turn, each with its event."""

    def __init__(self, device: torch.device, slots: int):
        self.on_gpu = device.type == "cuda"
        if self.on_gpu:
            self._buffers = [torch.zeros(slots, dtype=torch.long, pin_memory=True) for _ in range(2)]
            self._events = [torch.cuda.Event() for _ in range(2)]
        self._turn = 0

    def start(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Enqueue the copy of a step's tokens; the host buffer and the event that says it is there."""
        if not self.on_gpu:  # a copy: the buffer the tokens are in may be the next pick's
            return tokens.clone(), None
        buffer, event = self._buffers[self._turn][:tokens.shape[0]], self._events[self._turn]
        self._turn ^= 1
        buffer.copy_(tokens, non_blocking=True)
        event.record()
        return buffer, event


@dataclasses.dataclass(eq=False)
class Flight:
    """One decode step's rows and their tokens, aligned with slots: a host list (the step was picked on the
    host), or a device tensor with its copy to the host under way."""

    rows: Sequence[GenerationRow]
    tokens: list[int] | torch.Tensor  # on the device: what the next step is fed from
    logprobs: Sequence[TokenLogprob | None]
    host: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None

    @classmethod
    def launched(cls, rows, tokens, logprobs, readback: TokenReadback) -> "Flight":
        if isinstance(tokens, list):
            return cls(rows, tokens, logprobs)
        host, ready = readback.start(tokens)
        return cls(rows, tokens, logprobs, host, ready)

    @property
    def on_device(self) -> bool:
        return self.host is not None

    def read(self) -> list[int]:
        """The tokens on the host (waits for their copy: the step's one host sync)."""
        if self.host is None:
            return self.tokens
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()
