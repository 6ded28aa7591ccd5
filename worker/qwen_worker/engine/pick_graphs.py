"""A decode step's penalties, draw and penalty counting as one pass over fixed buffers for slots [0, n), captured
on a GPU as one CUDA graph per batch bucket: a default chat step (repetition penalty, temperature, top-p) then
replays two graphs (the decode's and this one) where it launched some forty kernels from Python.

The pass reads every slot of the bucket, whatever it holds: a slot with no penalty holds neutral ones, a slot
with no live row is greedy and counts nothing. Rows with a seed of their own or asking for logprobs are not
its (their steps run eagerly, as before), nor is the exactness check of QAIO_SAMPLE_CANDIDATES, which needs
the host: it serves only where the whole vocabulary is sorted (the GPU's default) or QAIO_SAMPLE_PREFILTER cuts
it. The draw is the sampler's own, on the same noise: the same tokens as the eager path for the same seed.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from .buckets import bucket
from .flight import CopyFence
from .inference import inference
from .penalties import AllRows, PenaltyState
from .sampler import sample

log = logging.getLogger(__name__)

TEMPERATURE, TOP_P, COUNTED = range(3)  # the settings' rows
PADDING = np.array([[0.0], [1.0], [0.0]], dtype=np.float32)  # a slot with no live row: greedy, counted nowhere


class PickGraphs:
    def __init__(self, runner, penalties: PenaltyState, prefilter: int = 0):
        self.device, slots = runner.device, runner.slots
        self.penalties = penalties
        self.prefilter = prefilter
        self.batch_sizes = runner.batch_sizes if runner.pad_shapes else None
        on_gpu = self.device.type == "cuda"
        self.logits = torch.zeros((slots, runner.vocab_size), dtype=torch.float32, device=self.device)
        self.settings = torch.zeros((3, slots), dtype=torch.float32, device=self.device)
        self._staging = torch.zeros((3, slots), dtype=torch.float32, pin_memory=on_gpu)
        self.staging = self._staging.numpy()  # written by the picker each step, copied with one transfer
        self.fence = CopyFence()  # active when steps overlap (the host is then a step ahead of the device)
        self.tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.width = runner.max_tokens  # of the penalty tables, read whole
        self._rows: dict[int, AllRows] = {}  # by batch: made at a batch's first pass (on a GPU its warm-up)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replays = 0
        self.capture_seconds = 0.0

    def _pass(self, n: int) -> None:
        """Slots [0, n): their logits penalized in place, one token drawn each, the counted slots' counts kept."""
        rows = self._rows.get(n)
        if rows is None:
            rows = self._rows[n] = AllRows(n, self.width, self.device)
        logits = self.penalties.apply(self.logits[:n], rows)
        settings = self.settings[:, :n]
        tokens = sample(logits, settings[TEMPERATURE], settings[TOP_P], prefilter=self.prefilter)
        self.penalties.count_masked(rows, tokens, settings[COUNTED] > 0)
        self.tokens[:n].copy_(tokens)

    @inference
    def capture(self) -> None:
        """One graph per batch bucket, largest first (the smaller ones reuse its memory pool), each then
        checked against its pass. The settings are padding meanwhile: every slot greedy and counted nowhere,
        so the warm-up, capture and check passes change no penalty table."""
        started = time.monotonic()
        self._pad_all()
        pool, side = None, torch.cuda.Stream(self.device)
        for n in reversed(self.batch_sizes):
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up outside the capture: lazy initialisation, the sort's workspace
                self._pass(n)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._pass(n)
            pool = graph.pool()
            self.graphs[n] = graph
        for n in self.graphs:
            self._check(n)
        self.capture_seconds = time.monotonic() - started
        log.info("captured %d sampling graphs in %.1f s", len(self.graphs), self.capture_seconds)

    def _check(self, n: int) -> None:
        """The graph of batch n against the same pass run as it is, on new logits, greedy (so deterministic):
        a capture that baked in a value instead of reading its buffer fails the start, not a request."""
        self._pad_all()
        self.logits[:n].normal_()
        self.graphs[n].replay()
        captured = self.tokens[:n].clone()
        self._pass(n)  # the staging is padding: neutral penalties, nothing counted, the logits left as they are
        if not torch.equal(captured, self.tokens[:n]):
            raise RuntimeError(f"the sampling graph of batch {n} picks other tokens than its pass run eagerly")

    def _pad_all(self) -> None:
        self.settings.copy_(torch.from_numpy(np.repeat(PADDING, self.settings.shape[1], axis=1)))

    @inference
    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """Tokens for the step's rows [0, width) (logits [width, vocab], row i in slot i), from the staging
        the caller wrote for them: temperature (0: greedy), top_p, counted (1: a live row with penalties).
        They stay on the device, in a buffer the next pick overwrites."""
        width = logits.shape[0]
        n = bucket(width, self.batch_sizes) if self.batch_sizes else width
        self.staging[:, width:n] = PADDING  # greedy, counted nowhere
        self.logits[:width].copy_(logits)  # in float32, as the penalties and the sampler take them
        self.settings[:, :n].copy_(self._staging[:, :n], non_blocking=True)
        self.fence.copied()
        graph = self.graphs.get(n)
        if graph is not None:
            graph.replay()
            self.replays += 1
        else:
            self._pass(n)
        return self.tokens[:width]

    def stage(self, width: int, temperature: np.ndarray, top_p: np.ndarray, counted: np.ndarray) -> None:
        """The settings of slots [0, width) for the next pick."""
        self.fence.wait()
        staging = self.staging
        staging[TEMPERATURE, :width] = temperature
        staging[TOP_P, :width] = top_p
        staging[COUNTED, :width] = counted
