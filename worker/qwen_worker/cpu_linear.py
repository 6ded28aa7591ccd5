"""nn.Linear on oneDNN with the weight prepacked once: the fast CPU kernel path for small batches.

On this project's CPUs (AVX2 EPYC, torch 2.13 with MKL), F.linear's MKL sgemm with the transposed
weight runs 2-3x slower for 2-16 rows than for one, which is exactly decode with a batch. oneDNN's
linear with a weight reordered into its blocked layout once (what torch.compile's CPU freezing
emits) does not have that cliff: 19-45 ms instead of 74-104 ms for the 151,936-wide head at 2-16
rows, and it equals F.linear within float32 rounding. See docs/benchmarks.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def row_bucket(rows: int) -> int:
    """The row count a oneDNN linear runs with: a few fixed sizes instead of every count.

    oneDNN builds (JIT-compiles) a primitive per input shape and torch keeps up to 1,024 of them in
    each of two caches (ideep's LRU_CACHE_CAPACITY, oneDNN's ONEDNN_PRIMITIVE_CACHE_CAPACITY). With
    every prompt length a new shape, a worker's memory in use grew by the cached primitives (+200 MB
    in 6 minutes of mixed traffic on the 0.5B shape) and each new shape paid a JIT compile. Padding
    the rows to these buckets bounds both; the padded rows cost little (decode at small batches is
    bound by reading the weights; beyond 16 rows a count pads by fewer than 16 rows or a quarter of
    itself, whichever is more, 1/8 of the next power of two). Measured in-process on the
    0.5B shape: a sentiment pass of 16 texts 5-9 % slower than with exact sizes whose primitives are
    already cached, decode 2-4 %; buckets of 1/16 cost ~1-3 % but grew the memory in use twice as
    much before levelling off.
    """
    if rows <= 16:
        return 1 << (rows - 1).bit_length() if rows > 1 else 1
    step = 1 << max(4, (rows - 1).bit_length() - 3)  # 1/8 of the next power of two: 16, 32, 64, ...
    return -(-rows // step) * step


def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether torch has oneDNN's linear for `dtype` on this CPU: bfloat16's needs AVX512 (BW, VL, DQ) or
    AVX-NE-CONVERT, which an AVX2-only CPU lacks (torch then fails to pack the weight)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    return dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedLinear(nn.Module):
    """The same affine map as a float32 nn.Linear, computed by oneDNN on a prepacked weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.register_buffer("packed_weight", packed, persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        count = rows.shape[0]
        padded = row_bucket(count)
        if padded != count:
            rows = F.pad(rows, (0, 0, 0, padded - count))
        elif not rows.is_contiguous():
            rows = rows.contiguous()
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
        return y[:count].reshape(*x.shape[:-1], self.out_features)


def replace_modules(model: nn.Module, chosen, make, kind: type = nn.Linear) -> int:
    """Replace every module of type `kind` (nn.Linear) of model that chosen(module) accepts by
    make(module); returns how many."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is kind and chosen(child):
                setattr(parent, name, make(child))
                replaced += 1
    return replaced


def pack_linears(model: nn.Module) -> int:
    """Replace every float32 or bfloat16 CPU nn.Linear in model that oneDNN can run here by a PackedLinear;
    returns how many."""
    return replace_modules(model, lambda linear: linear.weight.dtype in (torch.float32, torch.bfloat16)
                           and linear.weight.device.type == "cpu" and onednn_available(linear.weight.dtype),
                           PackedLinear)
