"""Each row's next token from a step's logits, on the device: plain greedy steps by one argmax,
penalized and sampled rows through the penalties' state, the sampler and the rows' own generators.

What a step needs of each row's sampling settings is kept per slot in numpy arrays, written when the
row takes its slot: a step reads them for all its rows at once (one pass over the rows for their
slots), instead of asking every row's settings several times per step (at 256 rows, a fifth of the
step's host time, make bench-host)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .inference import inference
from .flight import CopyFence
from .logprobs import TokenLogprob, token_logprobs
from .penalties import PenaltyState
from .pick_graphs import PickGraphs
from .sampler import sample
from .sequence import GenerationRow


class TokenPicker:
    def __init__(self, runner, sample_prefilter: int = 0, sample_candidates: int = 0):
        self.runner = runner
        self.sample_prefilter = sample_prefilter
        self.sample_candidates = sample_candidates
        self.penalties: PenaltyState | None = None  # made for the first penalized row
        self.graphs: PickGraphs | None = None  # decode steps' picks as captured passes (use_graphs)
        slots = runner.slots + getattr(runner, "score_slots", 0)
        self.plain = np.ones(slots, dtype=bool)  # plain greedy: the argmax of the logits as they are
        self.temperature = np.zeros(slots, dtype=np.float32)  # 0: greedy
        self.top_p = np.ones(slots, dtype=np.float32)
        self.penalized = np.zeros(slots, dtype=bool)
        self.seeded = np.zeros(slots, dtype=bool)  # draws from a generator of the row's own
        self.logprobs = np.full(slots, -1, dtype=np.int64)
        self.fence = CopyFence()

    @inference
    def use_graphs(self, capture: bool = True) -> None:
        """Decode steps pick through PickGraphs: captured on a GPU when `capture`, run as passes otherwise."""
        self.penalties = self.penalties or self._penalty_state()
        self.graphs = PickGraphs(self.runner, self.penalties, self.sample_prefilter)
        self.graphs.fence = self.fence
        if capture:
            self.graphs.capture()

    def fence_copies(self) -> None:
        """Steps overlap: the sampling graphs' pinned settings wait for their last copy before a rewrite."""
        self.fence = CopyFence(self.runner.device.type == "cuda")
        if self.graphs is not None:
            self.graphs.fence = self.fence

    def _penalty_state(self) -> PenaltyState:
        runner = self.runner
        return PenaltyState(runner.slots, runner.max_tokens, runner.vocab_size, runner.device)

    @inference  # the penalties' tables are made and changed in the mode that changes them in a step
    def admit(self, row: GenerationRow) -> None:
        """A row joins: its slot's settings are written, its penalties' state starts from its prompt."""
        sampling, slot = row.sampling, row.slot
        if self.penalized[slot] and not sampling.penalized and self.penalties is not None:
            # The sampling graphs' pass reads every slot's penalties; kept neutral also while they are off,
            # so that turning them on (the GPU run's A/B does) finds no stale ones.
            self.penalties.neutral(slot)
        self.plain[slot] = sampling.plain_greedy
        self.temperature[slot] = 0.0 if sampling.greedy else sampling.temperature
        self.top_p[slot] = sampling.top_p
        self.penalized[slot] = sampling.penalized
        self.seeded[slot] = sampling.seed is not None and not sampling.greedy
        self.logprobs[slot] = sampling.logprobs
        if sampling.penalized:
            self.penalties = self.penalties or self._penalty_state()
            self.penalties.reset(row)

    @inference  # the penalties change the step's logits (inference tensors) in place
    def pick(self, rows: Sequence[GenerationRow | None], logits: torch.Tensor, greedy: torch.Tensor | None,
             aligned: bool = False, on_device: bool = False) -> tuple[list[int] | torch.Tensor,
                                                                        Sequence[TokenLogprob | None]]:
        """Each row's next token (and its logprobs, for rows asking) from logits aligned with rows (None:
        padding), chosen on the device and copied to the host once (twice with logprobs). Steps where
        every row is plainly greedy take the logits' argmax: the decode graph's own where it computed one
        (greedy), else one pass over the logits, never a second. A runner that picks its own tokens (the
        null model) passes them as `greedy`, with no logits. aligned: row i holds slot i (a decode step), which
        the pick graphs need. on_device: the tokens are returned as the device tensor they are chosen in,
        not read back (overlapped steps), unless a row asks for logprobs (their reading needs the host)."""
        slots = np.fromiter((-1 if row is None else row.slot for row in rows), dtype=np.int64, count=len(rows))
        live = slots >= 0
        if logits is not None and self.plain[slots[live]].all():  # (a plain row asks for no logprobs)
            return _out(logits.argmax(dim=-1) if greedy is None else greedy, on_device), [None] * len(rows)
        asking = live & (self.logprobs[slots] >= 0)
        on_device = on_device and not asking.any()
        if logits is None:
            return self._picked(rows, slots, live, greedy, on_device)
        seeded = live & self.seeded[slots]
        temperature = np.where(live, self.temperature[slots], np.float32(0.0))
        top_p = np.where(live, self.top_p[slots], np.float32(1.0))
        if aligned and self.graphs is not None and not (asking | seeded).any():
            return self._pick_in_graph(live, temperature, top_p, logits, on_device)
        asking = np.flatnonzero(asking)
        penalized = self._penalized(slots, live)
        if penalized is not None:
            logits = self.penalties.apply(logits, penalized)
        if not temperature.any():  # penalized, or with logprobs: no draw
            tokens = logits.argmax(dim=-1)
            if penalized is not None:
                self.penalties.count(penalized, tokens)
            return _out(tokens, on_device), token_logprobs(logits, tokens, rows, asking)
        to = dict(device=logits.device, non_blocking=True)
        generators: list[torch.Generator | None] = [None] * len(rows)
        for i in np.flatnonzero(seeded).tolist():
            generators[i] = self._generator(rows[i], logits.device)
        tokens = sample(logits, torch.from_numpy(temperature).to(**to), torch.from_numpy(top_p).to(**to),
                        prefilter=self.sample_prefilter, candidates=self.sample_candidates,
                        row_generators=generators)
        if penalized is not None:
            self.penalties.count(penalized, tokens)
        return _out(tokens, on_device), token_logprobs(logits, tokens, rows, asking)

    def _pick_in_graph(self, live: np.ndarray, temperature: np.ndarray, top_p: np.ndarray, logits: torch.Tensor,
                       on_device: bool):
        """A decode step's tokens through the sampling graphs (row i in slot i: the slots' own settings)."""
        width = len(live)
        counted = live & self.penalized[:width]
        self.graphs.stage(width, temperature, top_p, counted)
        tokens = self.graphs.pick(logits)
        self.penalties.bound[np.flatnonzero(counted)] += 1
        return _out(tokens, on_device), [None] * width

    def _penalized(self, slots: np.ndarray, live: np.ndarray):
        if self.penalties is None:
            return None
        at = np.flatnonzero(live & self.penalized[slots])
        return self.penalties.select(at, slots[at]) if len(at) else None

    def _picked(self, rows: Sequence[GenerationRow | None], slots: np.ndarray, live: np.ndarray,
                tokens: torch.Tensor, on_device: bool):
        """Tokens the runner chose: the penalties' counts kept as for drawn ones; rows asking for
        logprobs get the token itself at log-probability 0 (there is no distribution)."""
        penalized = self._penalized(slots, live)
        if penalized is not None:
            self.penalties.count(penalized, tokens)
        if on_device:
            return tokens, [None] * len(rows)
        ids = tokens.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(rows)
        for i in np.flatnonzero(live & (self.logprobs[slots] >= 0)).tolist():
            want = int(self.logprobs[slots[i]])
            logprobs[i] = (0.0, (ids[i],)[:want], (0.0,)[:want])
        return ids, logprobs

    @staticmethod
    def _generator(row: GenerationRow, device: torch.device) -> torch.Generator:
        if row.generator is None:
            row.generator = torch.Generator(device=device).manual_seed(row.sampling.seed)
        return row.generator


def _out(tokens: torch.Tensor, on_device: bool) -> list[int] | torch.Tensor:
    """A step's tokens as the caller asked: left where they are, or read to the host."""
    return tokens if on_device else tokens.tolist()
