"""Next-token choice for a whole batch on the device: per-row greedy, temperature and top-p as tensors."""
from __future__ import annotations

from typing import Sequence

import torch


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
           generator: torch.Generator | None = None, prefilter: int = 0, candidates: int = 0,
           row_generators: Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
    """One token per row of logits [n, vocab]. Rows with temperature 0 take their argmax; the others
    draw from their temperature-scaled distribution cut to the top-p nucleus.

    The nucleus needs the tokens in order of probability. By default the whole vocabulary is sorted
    (no host sync). candidates k > 0: only the k most likely are ordered (topk), which is exact when
    every sampled row's nucleus ends within them, checked with one host sync; a row whose nucleus does
    not falls back to the full sort for the step. prefilter k > 0: only the k most likely tokens can be
    drawn at all (top-k, then top-p within them; no sync, not exact).

    The draw uses the exponential race (argmax of p / E with E ~ Exp(1) picks index i with probability
    p_i), which needs no cumulative sampling kernel and runs the same on CPU and GPU.

    row_generators: rows with a generator of their own (a request's `seed`) draw their noise from it,
    one value per vocabulary entry, so that what they draw depends on their own logits and seed alone,
    not on the other rows, nor on whether this step took the candidates or the full sort.
    """
    logits = logits.float()
    greedy_tokens = logits.argmax(dim=-1)
    greedy = temperature <= 0
    scale = torch.where(greedy, 1.0, temperature)[:, None]
    vocab = logits.shape[-1]
    if 0 < prefilter < vocab:
        top, order = logits.topk(prefilter, dim=-1)  # sorted, most likely first
        probs = (top / scale).softmax(dim=-1)
    else:
        full = (logits / scale).softmax(dim=-1)
        probs = order = None
        if 0 < candidates < vocab:
            probs, order = full.topk(candidates, dim=-1)
            if not bool(((probs.sum(dim=-1) >= top_p) | greedy).all()):
                probs = None  # some nucleus reaches past the candidates
        if probs is None:
            probs, order = full.sort(dim=-1, descending=True)
    # Drop a token once the mass before it already reaches top_p; the most likely token always stays.
    probs = probs.masked_fill((probs.cumsum(dim=-1) - probs) >= top_p[:, None], 0.0)
    if row_generators is not None and any(g is not None for g in row_generators):
        noise = torch.empty_like(logits).exponential_(generator=generator)
        for i, row_generator in enumerate(row_generators):
            if row_generator is not None:
                noise[i].exponential_(generator=row_generator)
        race = noise.gather(1, order)
    else:
        race = torch.empty_like(probs).exponential_(generator=generator)
    picked = order.gather(1, (probs / race).argmax(dim=-1, keepdim=True))[:, 0]
    return torch.where(greedy, greedy_tokens, picked)
