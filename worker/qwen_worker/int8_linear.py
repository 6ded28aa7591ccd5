"""nn.Linear with 8-bit weights (QAIO_DTYPE=int8, CPU): a decode step reads a quarter of float32's bytes.

Weight-only, symmetric, one scale per output channel (what gpt-fast's int8 mode and llama.cpp's
Q8_0 do in spirit; Q8_0 has a scale per 32 weights). A few rows (decode) go through torch's int8
weight-packed matmul with bfloat16 activations; its cost grows with the rows (2-3x faster than
float32's oneDNN linear for 1-2 rows, even at 4, slower from 8), so many rows (prefill, a sentiment
pass) instead take a bfloat16 copy of the weight made for that call and one bfloat16 matmul.
Outputs come back in the input's dtype. Measured on the 0.5B shape in docs/cpu-precision.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_linear import replace_linears

# Up to this many rows the int8 matmul beats dequantising the weight for one bf16 matmul (0.5B shape,
# 4864x896 on 2 EPYC cores: 1.1 ms against 1.6 at 16 rows, 3.7 against 2.2 at 64; the LM head's
# dequantisation alone takes 185 ms, and the head never sees more rows than a decode batch).
INT8_ROWS = 32


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weights and float32 scales per output row: w ~= q * scale, |q| <= 127."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def int8_matmul_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """The affine map of an nn.Linear with its weight held as int8 and per-row scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_rows(linear.weight)
        self.register_buffer("weight_int8", q, persistent=False)
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16), persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.to(torch.bfloat16) * self.scale_bf16[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if rows.shape[0] <= INT8_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.weight_int8, self.scale_bf16)
        else:
            y = F.linear(rows, self.dequantized())
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def quantize_linears(model: nn.Module) -> int:
    """Replace every nn.Linear in model (the LM head too) by an Int8Linear; returns how many."""
    return replace_linears(model, lambda linear: True, Int8Linear)
