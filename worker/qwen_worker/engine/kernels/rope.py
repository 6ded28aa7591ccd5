"""RoPE on queries and keys fused with the K/V cache write: one launch per layer reads the qkv
projection once, writes rotated queries out and rotated keys and values to their cache locations
(the same page/offset addressing as attention.py)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_write(QKV, Positions, Locs, Cos, Sin, QOut, K, V, page_size,
                stride_t, stride_qt, stride_qh, stride_cos, stride_kp, stride_kh, stride_kt,
                stride_vp, stride_vh, stride_vt,
                HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)  # queries' heads, then keys' heads
    i = tl.arange(0, BLOCK)
    ok = i < HALF
    pos = tl.load(Positions + t)
    cos1 = tl.load(Cos + pos * stride_cos + i, mask=ok, other=0.0).to(tl.float32)
    cos2 = tl.load(Cos + pos * stride_cos + HALF + i, mask=ok, other=0.0).to(tl.float32)
    sin1 = tl.load(Sin + pos * stride_cos + i, mask=ok, other=0.0).to(tl.float32)
    sin2 = tl.load(Sin + pos * stride_cos + HALF + i, mask=ok, other=0.0).to(tl.float32)
    src = QKV + t * stride_t + h * 2 * HALF
    x1 = tl.load(src + i, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + i, mask=ok, other=0.0).to(tl.float32)
    r1 = x1 * cos1 - x2 * sin1
    r2 = x2 * cos2 + x1 * sin2
    if h < HEADS:
        dst = QOut + t * stride_qt + h * stride_qh
        tl.store(dst + i, r1.to(QOut.dtype.element_ty), mask=ok)
        tl.store(dst + HALF + i, r2.to(QOut.dtype.element_ty), mask=ok)
    else:
        kvh = h - HEADS
        loc = tl.load(Locs + t).to(tl.int64)
        page = loc // page_size
        offset = loc % page_size
        kdst = K + page * stride_kp + kvh * stride_kh + offset * stride_kt
        tl.store(kdst + i, r1.to(K.dtype.element_ty), mask=ok)
        tl.store(kdst + HALF + i, r2.to(K.dtype.element_ty), mask=ok)
        vsrc = QKV + t * stride_t + (HEADS + KV_HEADS + kvh) * 2 * HALF
        vdst = V + page * stride_vp + kvh * stride_vh + offset * stride_vt
        tl.store(vdst + i, tl.load(vsrc + i, mask=ok, other=0.0), mask=ok)
        tl.store(vdst + HALF + i, tl.load(vsrc + HALF + i, mask=ok, other=0.0), mask=ok)


def rope_and_write_kv(qkv: torch.Tensor, positions: torch.Tensor, locs: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, heads: int) -> torch.Tensor:
    """qkv [T, (heads + 2 kv_heads) * D] (queries, keys, values); positions, locs [T]: returns queries
    [T, heads, D] rotated, and writes rotated keys and values at their locations in keys/values
    [pages, kv_heads, page_size, D]. cos, sin [positions, D] (the model's rotate-half layout)."""
    tokens = qkv.shape[0]
    kv_heads, page_size, dim = keys.shape[1], keys.shape[2], keys.shape[3]
    q = torch.empty((tokens, heads, dim), dtype=qkv.dtype, device=qkv.device)
    _rope_write[(tokens, heads + kv_heads)](
        qkv, positions, locs, cos, sin, q, keys, values, page_size,
        qkv.stride(0), q.stride(0), q.stride(1), cos.stride(0), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        HEADS=heads, KV_HEADS=kv_heads, HALF=dim // 2, BLOCK=triton.next_power_of_2(dim // 2))
    return q
