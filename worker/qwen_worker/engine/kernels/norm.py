"""The residual add fused with the RMSNorm after it, and SiLU(gate) x up: the small element-wise
kernels between a layer's matmuls, one launch each instead of several. Rounding follows the model's
own modules (the sum and the normalised value are rounded to the model's dtype before the weight)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm(X, R, W, Out, stride_x, stride_r, stride_o, cols, eps,
                  HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    ok = c < cols
    x = tl.load(X + row * stride_x + c, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(R + row * stride_r + c, mask=ok, other=0.0).to(tl.float32))
        x = x.to(R.dtype.element_ty)
        tl.store(R + row * stride_r + c, x, mask=ok)
    xf = x.to(tl.float32)
    normed = (xf * tl.rsqrt(tl.sum(xf * xf, 0) / cols + eps)).to(Out.dtype.element_ty)
    w = tl.load(W + c, mask=ok, other=0.0)
    tl.store(Out + row * stride_o + c, (normed.to(tl.float32) * w.to(tl.float32)).to(Out.dtype.element_ty), mask=ok)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x + residual) * weight for x [T, H]; the sum is written back into `residual` (the
    stream the next layer adds to). residual None: RMSNorm(x) * weight."""
    out = torch.empty_like(x)
    r = x if residual is None else residual
    _add_rms_norm[(x.shape[0],)](x, r, weight, out, x.stride(0), r.stride(0), out.stride(0), x.shape[1], eps,
                                 HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(x.shape[1]))
    return out


@triton.jit
def _silu_mul(GU, Out, stride_gu, stride_o, cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < cols
    gate = tl.load(GU + row * stride_gu + c, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(GU + row * stride_gu + cols + c, mask=ok, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(Out.dtype.element_ty).to(tl.float32)
    tl.store(Out + row * stride_o + c, (act * up).to(Out.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate, then up) -> SiLU(gate) * up [T, I]."""
    tokens, cols = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((tokens, cols), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(cols))
    _silu_mul[(tokens, triton.cdiv(cols, block))](gate_up, out, gate_up.stride(0), out.stride(0), cols, BLOCK=block)
    return out
