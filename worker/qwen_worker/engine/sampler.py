"""Next-token choice for a whole batch on the device: per-row greedy, temperature and top-p as tensors."""
from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
           generator: torch.Generator | None = None, prefilter: int = 0) -> torch.Tensor:
    """One token per row of logits [n, vocab]. Rows with temperature 0 take their argmax; the others
    draw from their temperature-scaled distribution cut to the top-p nucleus. No host sync.

    prefilter k > 0: only each row's k most likely tokens can be drawn (top-k, then top-p within
    them), so the sort covers k entries instead of the whole vocabulary; 0 is exact.

    The draw uses the exponential race (argmax of p / E with E ~ Exp(1) picks index i with probability
    p_i), which needs no cumulative sampling kernel and runs the same on CPU and GPU.
    """
    logits = logits.float()
    greedy_tokens = logits.argmax(dim=-1)
    greedy = temperature <= 0
    if 0 < prefilter < logits.shape[-1]:
        logits, order = logits.topk(prefilter, dim=-1)  # sorted, most likely first
        probs = (logits / torch.where(greedy, 1.0, temperature)[:, None]).softmax(dim=-1)
    else:
        scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
        probs, order = scaled.softmax(dim=-1).sort(dim=-1, descending=True)
    # Drop a token once the mass before it already reaches top_p; the most likely token always stays.
    probs = probs.masked_fill((probs.cumsum(dim=-1) - probs) >= top_p[:, None], 0.0)
    race = torch.empty_like(probs).exponential_(generator=generator)
    picked = order.gather(1, (probs / race).argmax(dim=-1, keepdim=True))[:, 0]
    return torch.where(greedy, greedy_tokens, picked)
