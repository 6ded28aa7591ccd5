"""Log-probabilities of the drawn tokens and of each row's most likely alternatives, on the device; the
label probabilities of scoring rows, on the host."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .sequence import GenerationRow

MAX_TOP_LOGPROBS = 20
# What a log-probability too small for float32 is reported as (OpenAI's convention): an answer's
# numbers are always finite JSON.
FLOOR = -9999.0

TokenLogprob = tuple[float, tuple[int, ...], tuple[float, ...]]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: Sequence[GenerationRow | None],
                   asking: np.ndarray) -> list[TokenLogprob | None]:
    """Per row asking for them (their positions among rows: `asking`): log-softmax of the logits it was
    served (after penalties, before temperature and top-p, as vLLM and OpenAI report them) at the drawn
    token, and its top k."""
    result: list[TokenLogprob | None] = [None] * len(rows)
    if not len(asking):
        return result
    at = asking.tolist()
    index = torch.tensor(at, dtype=torch.long).to(device=logits.device, non_blocking=True)
    logp = logits.index_select(0, index).float().log_softmax(dim=-1).nan_to_num_(nan=FLOOR).clamp_(min=FLOOR)
    chosen = logp.gather(1, tokens.index_select(0, index)[:, None])[:, 0]
    k = max(rows[i].sampling.logprobs for i in at)
    top_values, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    chosen, top_values, top_ids = chosen.tolist(), top_values.tolist(), top_ids.tolist()
    for j, i in enumerate(at):
        want = rows[i].sampling.logprobs
        result[i] = (chosen[j], tuple(top_ids[j][:want]), tuple(top_values[j][:want]))
    return result


def label_probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over each row's few label logits, in numpy: torch's CPU softmax starts its OpenMP threads
    even for [n, 3], and they spin after it (~0.9 ms of CPU per call measured, make bench-host)."""
    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
