"""Continuous batching (`QAIO_GENERATION=continuous`): generation rows run by transformers'
ContinuousBatchingManager, which admits a new row into the running batch at the next decode step
and retires each row the step it finishes, instead of running a batch to its longest member.

The manager owns a paged KV cache of a fixed size and its own generation thread. This module feeds
it GenerationRows, and one dispatcher thread routes its outputs back: new tokens to the row's
stream, the end to the row's `on_done`. Deadlines and cancellations are enforced by that thread,
which cancels the row in the manager and answers at once.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable, Iterator

from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from .generation import GenerationRow

log = logging.getLogger(__name__)

# The manager samples every row (do_sample) with per-request temperature and top_p. A greedy row gets
# a vanishing top_p: the nucleus is then the most likely token alone, so sampling returns the argmax.
GREEDY_TOP_P = 1e-6
# Tokens one forward step may hold: long prompts are prefilled in chunks of this size, so a long
# prompt delays the decode steps of running rows by at most one chunk.
MAX_STEP_TOKENS = 2048
SWEEP_S = 0.05  # how often deadlines and cancellations are checked while no output arrives


class RowFailed(RuntimeError):
    """The manager reported an error for one row."""


OnDone = Callable[[GenerationRow, Exception | None], None]


class ContinuousGeneration:
    """Rows submitted here generate in one continuously batched stream; `on_done` reports each end."""

    def __init__(self, model, max_rows: int, cache_tokens: int):
        self.model_service = model
        self.max_rows = max_rows
        # Placeholder sampling settings: they only make the manager build its per-request temperature
        # and top-p processors (it builds none for 1.0); every row passes its own values.
        generation_config = GenerationConfig(
            do_sample=True, temperature=0.5, top_p=0.5, max_new_tokens=16,
            eos_token_id=sorted(model.eos_token_ids), pad_token_id=model.pad_token_id)
        page_size = ContinuousBatchingConfig.page_size
        batching_config = ContinuousBatchingConfig(
            num_blocks=-(-cache_tokens // page_size), max_batch_tokens=MAX_STEP_TOKENS,
            max_requests_per_batch=max_rows, per_request_processors=True,
            # Our prompts are much shorter than a page, so shared pages would rarely complete.
            allow_block_sharing=False,
            # Keep the model's attention implementation: sentiment passes share the model between steps.
            auto_switch_to_flash=False)
        self.manager = model.model.init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=batching_config)
        # transformers' continuous batching logs through a handler of its own: route it to ours (JSON).
        batching_logger = logging.getLogger("ContinuousBatchingLogger")
        batching_logger.handlers.clear()
        batching_logger.propagate = True
        self._rows: dict[str, tuple[GenerationRow, OnDone]] = {}
        self._lock = threading.Lock()
        self._counter = 0
        self._stopping = threading.Event()
        self._dispatcher: threading.Thread | None = None

    # ---- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self.manager.start()
        self._dispatcher = threading.Thread(target=self._dispatch, name="continuous-dispatch", daemon=True)
        self._dispatcher.start()

    def stop(self) -> None:
        self._stopping.set()
        if self.manager.is_running():
            self.manager.stop(block=True, timeout=10, hard_stop=True)
        if self._dispatcher is not None:
            self._dispatcher.join(timeout=10)
        self._fail_all(RowFailed("the worker is stopping"))

    # ---- rows ----------------------------------------------------------------------------------
    def in_flight(self) -> int:
        with self._lock:
            return len(self._rows)

    def free_slots(self) -> int:
        return max(self.max_rows - self.in_flight(), 0)

    def submit(self, row: GenerationRow, on_done: OnDone) -> None:
        with self._lock:
            self._counter += 1
            request_id = f"row-{self._counter}"
            self._rows[request_id] = (row, on_done)
        greedy = row.temperature <= 0
        added = self.manager.add_request(
            row.prompt_ids, request_id=request_id, max_new_tokens=row.max_new_tokens, streaming=True,
            temperature=1.0 if greedy else float(row.temperature),
            top_p=GREEDY_TOP_P if greedy else float(row.top_p))
        if added is None:  # the manager refuses rows once its loop is stopping or dead
            self._finish(request_id, RowFailed("the generation loop is not running"))

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Holds the generation loop between two steps so the caller may run the model itself."""
        if not self.manager.is_running():
            yield
            return
        with self.manager.pause():
            yield

    # ---- dispatcher thread ---------------------------------------------------------------------
    def _dispatch(self) -> None:
        while not self._stopping.is_set():
            output = self.manager.get_result(timeout=SWEEP_S)
            if output is not None:
                self._route(output)
            self._sweep()
            if not self.manager.is_running() and not self._stopping.is_set():
                self._fail_all(RowFailed("the generation loop stopped"))
                time.sleep(SWEEP_S)  # nothing will produce outputs any more; do not spin

    def _route(self, output) -> None:
        with self._lock:
            entry = self._rows.get(output.request_id)
        if entry is None:  # already answered (deadline or cancellation) before this output came
            return
        row, _ = entry
        if output.error is not None:
            self._finish(output.request_id, RowFailed(output.error))
            return
        eos = self.model_service.eos_token_ids
        generated = output.generated_tokens
        ended_by_eos = output.is_finished() and bool(generated) and generated[-1] in eos
        for token in generated[len(row.tokens):len(generated) - ended_by_eos]:
            row.tokens.append(token)
            if row.on_token is not None:
                row.on_token(token)
        if output.is_finished():
            row.finish_reason = "stop" if ended_by_eos else "length"
            self._finish(output.request_id, None)

    def _sweep(self) -> None:
        now = time.monotonic()
        with self._lock:
            entries = list(self._rows.items())
        for request_id, (row, _) in entries:
            if row.cancelled.is_set():
                row.finish_reason = "cancelled"
            elif now >= row.deadline:
                row.finish_reason = "deadline"
            else:
                continue
            self.manager.cancel_request(request_id)
            self._finish(request_id, None)

    def _finish(self, request_id: str, error: Exception | None) -> None:
        with self._lock:
            entry = self._rows.pop(request_id, None)
        if entry is None:
            return
        row, on_done = entry
        try:
            on_done(row, error)
        except Exception:  # a failing callback must not stop the dispatcher serving other rows
            log.exception("continuous batching: completion callback failed")

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            request_ids = list(self._rows)
        for request_id in request_ids:
            self._finish(request_id, error)
