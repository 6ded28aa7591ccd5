"""The step loop's body: waiting rows take the free slots, prefill what the scheduler picks (prompts of
generations and of sentiment texts alike), score the sentiment rows whose prompt is in, decode every
generating row once, then on the host (from one device-to-host copy of the new tokens) stream, stop, and
free the slots and blocks of finished rows. With overlapped steps (decode_step.py) that host part is the
previous step's, done while the device runs this one."""
from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

from .errors import RowFailed, StepFailed
from .decode_step import DecodeSteps
from .logprobs import TokenLogprob, label_probabilities
from .model_runner import ModelRunner
from .picking import TokenPicker
from .scheduler import Scheduler
from .sequence import GenerationRow

log = logging.getLogger(__name__)

OnDone = Callable[[GenerationRow, Exception | None], None]


class Engine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, eos_token_ids: set[int],
                 observe_step: Callable[[float, int, str], None] | None = None, clock=time.monotonic,
                 sample_prefilter: int = 0, sample_candidates: int = 0, overlap_steps: bool = False):
        self.runner = runner
        self.picker = TokenPicker(runner, sample_prefilter, sample_candidates)
        # Host seconds per phase of the decode part of a step, summed, when a benchmark sets a dict:
        # launch (inputs built, graph launched), wait (the host sync: device time not hidden), book (the rows).
        self.phase_seconds: dict[str, float] | None = None
        self.scheduler = scheduler
        self.eos = eos_token_ids
        self.observe_step = observe_step or (lambda seconds, live, path: None)
        self.clock = clock
        self.scoring_tokens = 0  # prompt tokens prefilled for scoring rows, a running total
        # Called between a step's prefill and its decode when a prompt was completed: whoever streams the
        # outputs sends first tokens and scores then, not a whole decode pass later (at c=1, a pass is
        # half the time to first token).
        self.after_prefill: Callable[[], None] | None = None
        self.decoder = DecodeSteps(self, overlap_steps)

    # ---- rows ----------------------------------------------------------------------------------
    def free_slots(self) -> int:
        return self.scheduler.free_slots()

    def free_score_slots(self) -> int:
        return self.scheduler.free_score_slots()

    def live(self) -> int:
        """Generating rows (scoring rows hold slots of their own)."""
        return self.scheduler.live()

    def has_work(self) -> bool:
        """Rows running or waiting for a slot."""
        return self.scheduler.has_rows()

    def add(self, row: GenerationRow, on_done: OnDone, on_start: Callable[[GenerationRow], None] | None = None) -> None:
        """The row waits for a free slot of its kind (the scheduler admits it at a step). Bad rows fail here,
        not on the device (an out-of-range token id on a GPU would kill the whole CUDA context)."""
        self._check_token_ids(row.prompt_ids)
        self._check_positions(row.total_tokens(), f"a sentiment prompt's {len(row.prompt_ids)} tokens" if row.score
                              else f"a row's {len(row.prompt_ids)} prompt + {row.max_new_tokens} new tokens")
        row.on_done, row.on_start = on_done, on_start
        row.admitted_at = self.clock()
        self.scheduler.add(row)

    def withdraw(self, row: GenerationRow, error: Exception) -> bool:
        """A waiting row leaves with `error` (its on_done is told); False if it already holds a slot."""
        if not self.scheduler.withdraw(row):
            return False
        self._finish(row, error)
        return True

    def _check_token_ids(self, ids: Sequence[int]) -> None:
        vocab = self.runner.vocab_size
        if not ids or min(ids) < 0 or max(ids) >= vocab:
            raise RowFailed("invalid_token_id", f"prompt token ids must be in [0, {vocab})")

    def _check_positions(self, tokens: int, what: str) -> None:
        """A row's positions must fit the RoPE table and a KV slot (both hold runner.max_tokens)."""
        if tokens > self.runner.max_tokens:
            raise RowFailed("prompt_too_long", f"{what} exceed the {self.runner.max_tokens} positions the engine holds")

    def run(self, rows: Sequence[GenerationRow]) -> None:
        """Add the rows and step until every one is done (the scheduler admits them as slots of their kind
        free up); raises the first row's error. For benchmarks, tests, warm-up and scoring at load: in the
        worker, only the engine thread steps."""
        errors: list[Exception] = []

        def done(row, error):
            if error is not None:
                errors.append(error)

        for row in rows:
            self.add(row, done)
        while self.has_work():
            try:
                self.step()
            except StepFailed:
                pass  # its rows' errors are in `errors`
        if errors:
            raise errors[0]

    def fail_all(self, error: Exception) -> None:
        self.decoder.flight = None
        for row in self.scheduler.all_rows():
            self.scheduler.withdraw(row)
            self._finish(row, error)

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> None:
        """Prefill a budget of prompt chunks, then one decode step for all rows. A failing device pass
        raises StepFailed after failing only the rows it carried."""
        self._sweep()
        self._admit()
        chunks = self.scheduler.prefill_chunks(self.clock())
        if chunks:
            self._prefill(chunks)
            if self.after_prefill is not None and any(row.prefilled for row, _ in chunks):
                self.after_prefill()
        decoding: list[GenerationRow] = []
        try:
            decoding = self.scheduler.make_room_to_decode()
            self._sync_tables()
            self.decoder.step(decoding)
        except StepFailed:
            raise
        except Exception as exc:
            self._fail(self.decoder.abandon(decoding), exc)

    def _admit(self) -> None:
        """Waiting rows take the free slots; each is told (on_start) once it holds one."""
        for row in self.scheduler.admit_waiting(self.clock()):
            if not row.score:
                self.picker.admit(row)
            if row.on_start is not None:
                try:
                    row.on_start(row)
                except Exception:  # as for on_done: the engine goes on serving the other rows
                    log.exception("engine: start callback failed")

    def _prefill(self, chunks) -> None:
        """Run the chunks; rows whose known tokens are all in their blocks now pick their first token (a
        row recomputed after a preemption already has it: it goes on decoding), or, scoring, end with
        their label probabilities."""
        self._sync_tables()
        rows = [row for row, _ in chunks]
        self.scoring_tokens += sum(len(chunk.tokens) for row, chunk in chunks if row.score)
        try:
            hidden = self.runner.prefill([chunk for _, chunk in chunks])
        except Exception as exc:
            self._fail(rows, exc)
        for row, chunk in chunks:
            row.cached = chunk.start + len(chunk.tokens)
            self.scheduler.blocks.register(row)
            if row.prefilled and row.tokens:
                row.next_input = row.tokens[-1]
        scoring = [i for i, row in enumerate(rows) if row.prefilled and row.score]
        sampling = [i for i, row in enumerate(rows) if row.prefilled and not row.tokens and not row.score]
        try:
            if scoring:
                probabilities = label_probabilities(self.runner.label_logits(hidden, scoring))
                for i, probs in zip(scoring, probabilities.tolist()):
                    rows[i].label_probs, rows[i].finish_reason = tuple(probs), "scored"
                    self._finish(rows[i], None)
            if sampling:
                picked_rows, picked = [rows[i] for i in sampling], self.runner.token_logits(hidden, sampling)
                tokens, logprobs = self.picker.pick(picked_rows, None, picked) if self.runner.picks_tokens \
                    else self.picker.pick(picked_rows, picked, None)
                now = self.clock()
                for row, token, logprob in zip(picked_rows, tokens, logprobs):
                    self.accept(row, token, now, logprob)
        except Exception as exc:
            self._fail([rows[i] for i in scoring + sampling if rows[i].slot is not None], exc)

    def _sync_tables(self) -> None:
        """Run the block copies the prefix cache asked for, and tell the runner the block lists that changed."""
        copies = self.scheduler.blocks.copied()
        if copies:
            self.runner.copy_blocks(copies)
        changed, rows = self.scheduler.changed, self.scheduler.rows
        for slot in changed:
            row = rows.get(slot)
            self.runner.set_blocks(slot, row.blocks if row is not None else ())
        changed.clear()

    def kv_stats(self) -> dict[str, int]:
        """The KV pool and the prefix cache: blocks by state, bytes per block, running totals."""
        blocks = self.scheduler.blocks
        return {"blocks_total": blocks.total, "blocks_used": blocks.used(), "blocks_cached": blocks.cached(),
                "block_bytes": self.runner.block_bytes, "prefix_hit_tokens": blocks.hit_tokens,
                "prefix_query_tokens": blocks.query_tokens, "preemptions": self.scheduler.preemptions,
                "evictions": blocks.evictions}

    def _fail(self, rows: Sequence[GenerationRow], exc: Exception):
        for row in rows:
            self._finish(row, exc)
        raise StepFailed(exc, rows) from exc

    def accept(self, row: GenerationRow, token: int, now: float, logprob: TokenLogprob | None = None) -> None:
        if token in self.eos:
            row.finish_reason = "stop"
        else:
            row.tokens.append(token)
            if logprob is not None:
                row.token_logprobs.append(logprob)
            row.next_input = token
            if row.on_token is not None:
                row.on_token(token)
            if len(row.tokens) >= row.max_new_tokens:
                row.finish_reason = "length"
            elif row.cancelled.is_set():
                row.finish_reason = "cancelled"
            elif now >= row.deadline:
                row.finish_reason = "deadline"
        if row.finish_reason is not None:
            self._finish(row, None)

    def _sweep(self) -> None:
        """Stop rows whose client left or whose deadline passed, also those prefilling or waiting for a slot."""
        now = self.clock()
        for row in self.scheduler.all_rows():
            if row.cancelled.is_set():
                row.finish_reason = "cancelled"
            elif now >= row.deadline:
                row.finish_reason = "deadline"
            else:
                continue
            self.scheduler.withdraw(row)
            self._finish(row, None)

    def _finish(self, row: GenerationRow, error: Exception | None) -> None:
        self.scheduler.release(row)
        callback, row.on_done = row.on_done, None
        if callback is None:
            return
        try:
            callback(row, error)
        except Exception:  # a failing callback must not stop the engine serving other rows
            log.exception("engine: completion callback failed")
