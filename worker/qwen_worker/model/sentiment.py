"""Sentiment scoring: label probabilities after each prompt, the fixed prompt prefix's keys and values
computed once and reused."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..prompts import LABELS

# A sentiment sub-batch is cut when padding would exceed this share of its real tokens, once it
# already holds enough tokens to keep the matrix multiplies efficient.
MAX_PADDING_SHARE = 0.3
MIN_BUCKET_TOKENS = 64

PrefixKV = list[tuple[torch.Tensor, torch.Tensor]]


def length_buckets(lengths: Sequence[int]) -> list[list[int]]:
    """Indices grouped so that left-padding each group to its longest member wastes little compute."""
    buckets: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        padded = (len(current) + 1) * lengths[i]  # sorted: the newcomer is the longest
        if current and real >= MIN_BUCKET_TOKENS and padded > (1 + MAX_PADDING_SHARE) * (real + lengths[i]):
            buckets.append(current)
            current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        buckets.append(current)
    return buckets


def label_softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over each row's few label logits, in numpy: torch's CPU softmax starts its OpenMP threads
    even for [n, 3], and they spin after it (~0.9 ms of CPU per call measured, make bench-host)."""
    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def compute_prefix_kv(model, prefix: Sequence[int], device: torch.device) -> PrefixKV:
    """The fixed prefix's per-layer (key, value) [1, kv_heads, len, head_dim], by the model itself."""
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([list(prefix)], device=device), use_cache=True)
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers]


class SentimentScorer:
    def __init__(self, engine, device: torch.device, prefix_kv: dict[tuple[int, ...], PrefixKV]):
        self.engine = engine
        self.device = device
        self.prefix_kv = prefix_kv  # fixed prompt prefix (token ids) -> its keys and values, batch size 1

    def _cached_prefix(self, prompt: Sequence[int]) -> tuple[int, ...] | None:
        for prefix in self.prefix_kv:
            if len(prompt) > len(prefix) and tuple(prompt[:len(prefix)]) == prefix:
                return prefix
        return None

    def pass_tokens(self, prompt: Sequence[int]) -> int:
        """The tokens a pass computes for `prompt`: those after its cached prefix."""
        prefix = self._cached_prefix(prompt)
        return len(prompt) - (len(prefix) if prefix else 0)

    def score(self, prompts: Sequence[Sequence[int]]) -> list[dict[str, float]]:
        """Softmax over the label tokens' logits after each prompt.

        Prompts starting with a cached prefix run only their own tokens on top of the prefix's keys and
        values; the rest run whole. Each group is one padded, fixed-shape pass.
        """
        groups: dict[tuple[int, ...] | None, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(self._cached_prefix(prompt), []).append(i)
        logits = torch.empty((len(prompts), len(LABELS)), dtype=torch.float32)
        for prefix, rows in groups.items():
            skip = len(prefix) if prefix else 0
            cached = self.prefix_kv[prefix] if prefix else None
            # On a CPU every padded token costs compute, so similar lengths share a pass; on a GPU one
            # pass is faster than several smaller ones (launches, not arithmetic, bound it there).
            parts = length_buckets([len(prompts[i]) - skip for i in rows]) if self.device.type == "cpu" \
                else [list(range(len(rows)))]
            for part in parts:
                members = [rows[j] for j in part]
                logits[members] = self.engine.score(cached, [prompts[i][skip:] for i in members])
        return [dict(zip(LABELS, row)) for row in label_softmax(logits.numpy()).tolist()]
