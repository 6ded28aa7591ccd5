"""A step's decode of every generating row: the rows' inputs and positions, the pass, the picks, then the
tokens read back and given to the rows. Read back at once, or, with overlapped steps (QAIO_OVERLAP_STEPS,
flight.py), after the next step is launched: that step is fed on the device from these tokens, a row whose
last token is in flight sits it out, a row that ended meanwhile drops its token, and a row preempted
meanwhile keeps it for its recompute."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .flight import FED, Flight, TokenReadback
from .sequence import GenerationRow

if TYPE_CHECKING:
    from .engine import Engine


class DecodeSteps:
    def __init__(self, engine: "Engine", overlap: bool = False):
        self.engine = engine
        self.overlap = False
        self.flight: Flight | None = None  # the decode step whose tokens are not read back yet
        self._readback = TokenReadback(engine.runner.device, engine.runner.slots)
        self.set_overlap(overlap)

    def set_overlap(self, on: bool) -> None:
        """Overlapped steps on or off from the next step (the GPU run compares both in one load)."""
        self.land()
        if on:
            self.engine.runner.fence_copies()
            self.engine.picker.fence_copies()
        self.overlap = on

    def step(self, decoding: list[GenerationRow]) -> None:
        """One decode step of the rows (their blocks made room for it)."""
        engine = self.engine
        runner, clock = engine.runner, engine.clock
        started, replays = clock(), runner.graph_replays
        inputs: dict[int, tuple[int, int]] = {}
        by_slot: list[GenerationRow | None] = [None] * (engine.scheduler.decode_width() if decoding else 0)
        due, size, launched = [], runner.block_tokens, decoding
        for row in decoding:
            if row.pending:  # its last token is on the device (overlapped steps only)
                if len(row.tokens) + row.pending >= row.max_new_tokens:
                    launched = None  # it sits this step out
                    continue
                inputs[row.slot] = (FED, row.cached)
            else:
                inputs[row.slot] = (row.next_input, row.cached)
            row.cached += 1
            by_slot[row.slot] = row
            if row.cached % size == 0:
                due.append(row)
        if not inputs:
            self.land()
            return
        flight = self.flight
        logits, greedy = runner.decode(inputs, len(by_slot), flight.tokens if flight is not None else None)
        sent = clock()
        tokens, logprobs = engine.picker.pick(by_slot, logits, greedy, aligned=True, on_device=self.overlap)
        self.land()  # the previous step's tokens, while the device computes this step's
        if launched is None:
            launched = [row for row in by_slot if row is not None]
        self.flight = Flight.launched(launched, tokens, logprobs, self._readback)
        if self.flight.on_device:
            for row in launched:
                row.pending += 1
        for row in due:  # the tokens their full blocks hold are all on the host now: key them
            if row.slot is not None:
                engine.scheduler.blocks.register(row)
        landed = clock()
        if not self.flight.on_device:
            self.land()
        if engine.phase_seconds is not None:
            for phase, seconds in (("launch", sent - started), ("wait", landed - sent),
                                   ("book", clock() - landed)):
                engine.phase_seconds[phase] = engine.phase_seconds.get(phase, 0.0) + seconds
        engine.observe_step(clock() - started, len(inputs), "graph" if runner.graph_replays > replays else "eager")

    def land(self) -> None:
        """Read back the step in flight, if any: its rows still running take their tokens (a row that ended
        meanwhile, cancelled or past its deadline, drops its one)."""
        flight = self.flight
        if flight is None:
            return
        tokens = flight.read()  # without overlap, the step's one host sync; raises where the device failed
        self.flight = None
        now, accept, logprobs = self.engine.clock(), self.engine.accept, flight.logprobs
        if flight.on_device:
            for row in flight.rows:
                row.pending -= 1
        for row in flight.rows:
            if row.slot is None:  # it ended meanwhile
                continue
            # A row preempted meanwhile (its blocks taken while this token was in flight) takes the token too
            # and recomputes from all its tokens, feeding this one after, as if preempted once it was read.
            preempted = row.next_input is None
            accept(row, tokens[row.slot], now, logprobs[row.slot])
            if preempted:
                row.next_input = None

    def abandon(self, decoding: Sequence[GenerationRow] | None) -> list[GenerationRow]:
        """A failed step's rows and those of the step in flight, which is dropped."""
        flight, self.flight = self.flight, None
        rows = dict.fromkeys(decoding or ())
        if flight is not None:
            rows.update(dict.fromkeys(row for row in flight.rows if row.slot is not None))
        return list(rows)
