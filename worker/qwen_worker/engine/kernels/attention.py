"""Decode attention: one query token per row against that row's keys, found through a table of token
locations, in two passes (split-KV): each split of a row's keys yields a partial softmax, then the
splits are merged. Lengths are read on the device, so one launch (and one CUDA graph) serves every
length; there is no mask tensor.

The cache is [pages, kv_heads, page_size, head_dim]; token j of row b sits at location
table[b, j] = page * page_size + offset. The slot cache is one page per slot (page_size = its
length); a block cache would be many small pages, read by the same kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

SPLIT_TOKENS = 256  # keys per split: short rows use one program per KV head, long rows many
BLOCK_N = 64  # keys per inner iteration


@triton.jit
def _split_pass(Q, K, V, Table, Lengths, MidO, MidL, scale, page_size,
                stride_qb, stride_qh, stride_kp, stride_kh, stride_kt, stride_vp, stride_vh, stride_vt,
                stride_tb, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
                GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(Lengths + b)
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, length)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + g
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None] & d_ok[None, :],
                other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        loc = tl.load(Table + b * stride_tb + n, mask=n_ok, other=0).to(tl.int64)
        page = loc // page_size
        offset = loc % page_size
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + page[:, None] * stride_kp + kvh * stride_kh + offset[:, None] * stride_kt + d[None, :],
                    mask=kv_ok, other=0.0)
        scores = tl.dot(q, tl.trans(k)) * scale
        scores = tl.where(n_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        v = tl.load(V + page[:, None] * stride_vp + kvh * stride_vh + offset[:, None] * stride_vt + d[None, :],
                    mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    # A split past the row's end (total 0: guarded, so it computes no NaN) stores nothing, and the
    # merge reads only the splits that held keys.
    out = acc / tl.maximum(total, 1e-30)[:, None]
    lse = m + tl.log(tl.maximum(total, 1e-30))
    g_used = g_ok & ((tl.zeros([BLOCK_G], tl.int32) + start) < length)
    tl.store(MidO + b * stride_mb + heads[:, None] * stride_mh + split * stride_ms + d[None, :], out,
             mask=g_used[:, None] & d_ok[None, :])
    tl.store(MidL + b * stride_lb + heads * stride_lh + split, lse, mask=g_used)


@triton.jit
def _merge_pass(MidO, MidL, Out, Lengths, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ob,
                stride_oh, SPLIT: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < tl.cdiv(tl.load(Lengths + b), SPLIT)  # the splits that held keys of this row
    lse = tl.load(MidL + b * stride_lb + h * stride_lh + s, mask=s_ok, other=float("-inf"))
    weight = tl.where(s_ok, tl.exp(lse - tl.max(lse, 0)), 0.0)
    parts = tl.load(MidO + b * stride_mb + h * stride_mh + s[:, None] * stride_ms + d[None, :],
                    mask=s_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(Out + b * stride_ob + h * stride_oh + d, out.to(Out.dtype.element_ty), mask=d < HEAD_DIM)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor,
                     lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, heads, D] attends to the first lengths[b] tokens of table[b] in keys/values
    [pages, kv_heads, page_size, D]; returns [B, heads, D] in q's dtype. Every length >= 1."""
    batch, heads, dim = q.shape
    kv_heads, page_size = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    splits = triton.cdiv(table.shape[1], SPLIT_TOKENS)
    mid_o = torch.empty((batch, heads, splits, dim), dtype=torch.float32, device=q.device)
    mid_l = torch.empty((batch, heads, splits), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    block_d = triton.next_power_of_2(dim)
    _split_pass[(batch, kv_heads, splits)](
        q, keys, values, table, lengths, mid_o, mid_l, scale, page_size,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), table.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_l.stride(0), mid_l.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim, BLOCK_D=block_d,
        SPLIT=SPLIT_TOKENS, BLOCK_N=BLOCK_N)
    _merge_pass[(batch, heads)](
        mid_o, mid_l, out, lengths, mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_l.stride(0),
        mid_l.stride(1), out.stride(0), out.stride(1), SPLIT=SPLIT_TOKENS, BLOCK_S=triton.next_power_of_2(splits),
        HEAD_DIM=dim, BLOCK_D=block_d)
    return out
