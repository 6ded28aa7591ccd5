"""Each row's next token from a step's logits, on the device: plain greedy steps by one argmax,
penalized and sampled rows through the penalties' state, the sampler and the rows' own generators."""
from __future__ import annotations

from typing import Sequence

import torch

from .logprobs import TokenLogprob, token_logprobs
from .penalties import PenaltyState
from .sampler import sample
from .sequence import GenerationRow


class TokenPicker:
    def __init__(self, runner, sample_prefilter: int = 0, sample_candidates: int = 0):
        self.runner = runner
        self.sample_prefilter = sample_prefilter
        self.sample_candidates = sample_candidates
        self.penalties: PenaltyState | None = None  # made for the first penalized row

    def admit(self, row: GenerationRow) -> None:
        """A row joins: its penalties' state starts from its prompt."""
        if row.sampling.penalized:
            if self.penalties is None:
                self.penalties = PenaltyState(self.runner.slots, self.runner.max_tokens, self.runner.vocab_size,
                                              self.runner.device)
            self.penalties.reset(row)

    @torch.inference_mode()  # the penalties change the step's logits (inference tensors) in place
    def pick(self, rows: Sequence[GenerationRow | None], logits: torch.Tensor,
             greedy: torch.Tensor | None) -> tuple[list[int], Sequence[TokenLogprob | None]]:
        """Each row's next token (and its logprobs, for rows asking) from logits aligned with rows (None:
        padding), chosen on the device and copied to the host once (twice with logprobs). Steps where
        every row is plainly greedy take the logits' argmax: the decode graph's own where it computed one
        (greedy), else one pass over the logits, never a second. A runner that picks its own tokens (the
        null model) passes them as `greedy`, with no logits."""
        if logits is None:
            return self._picked(rows, greedy)
        if all(row is None or row.sampling.plain_greedy for row in rows):
            return (logits.argmax(dim=-1) if greedy is None else greedy).tolist(), [None] * len(rows)
        penalized = self.penalties.select(rows) if self.penalties is not None else None
        if penalized is not None:
            logits = self.penalties.apply(logits, penalized)
        if all(row is None or row.sampling.greedy for row in rows):  # penalized, or with logprobs: no draw
            tokens = logits.argmax(dim=-1)
            if penalized is not None:
                self.penalties.count(penalized, tokens)
            return tokens.tolist(), token_logprobs(logits, tokens, rows)
        temperature = torch.tensor([0.0 if row is None or row.sampling.greedy else row.sampling.temperature
                                    for row in rows], dtype=torch.float32)
        top_p = torch.tensor([row.sampling.top_p if row else 1.0 for row in rows], dtype=torch.float32)
        to = dict(device=logits.device, non_blocking=True)
        generators = [self._generator(row, logits.device) if row is not None and row.sampling.seed is not None
                      and not row.sampling.greedy else None for row in rows]
        tokens = sample(logits, temperature.to(**to), top_p.to(**to), prefilter=self.sample_prefilter,
                        candidates=self.sample_candidates, row_generators=generators)
        if penalized is not None:
            self.penalties.count(penalized, tokens)
        return tokens.tolist(), token_logprobs(logits, tokens, rows)

    def _picked(self, rows: Sequence[GenerationRow | None], tokens: torch.Tensor):
        """Tokens the runner chose: the penalties' counts kept as for drawn ones; rows asking for
        logprobs get the token itself at log-probability 0 (there is no distribution)."""
        penalized = self.penalties.select(rows) if self.penalties is not None else None
        if penalized is not None:
            self.penalties.count(penalized, tokens)
        ids = tokens.tolist()
        return ids, [None if row is None or row.sampling.logprobs < 0 else
                     (0.0, (token,)[:row.sampling.logprobs], (0.0,)[:row.sampling.logprobs])
                     for row, token in zip(rows, ids)]

    @staticmethod
    def _generator(row: GenerationRow, device: torch.device) -> torch.Generator:
        if row.generator is None:
            row.generator = torch.Generator(device=device).manual_seed(row.sampling.seed)
        return row.generator

