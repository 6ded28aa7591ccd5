"""Decode and prefill through the engine's Triton kernels (QAIO_KERNELS=triton).

Per layer of a decode step: add + RMSNorm, the fused qkv matmul, RoPE with the K/V write, split-KV
attention, o_proj, add + RMSNorm, the fused gate/up matmul, SiLU x mul, down_proj: 10 launches where
the torch path takes ~19. Attention reads each row's length on the device, so the step's shapes depend
on the batch size alone (one CUDA graph per batch size). Keys and values are reached through a table
of token locations, expanded on the device from the rows' block tables.
Prefill uses the same element-wise kernels and K/V write; its attention stays torch's (many queries
per row: a matmul-shaped problem that scaled_dot_product_attention's kernels do well).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .forward import DecoderStack, UnsupportedModel, _eps, _fold_mask, _gqa_attention
from .kernels.attention import decode_attention
from .kernels.norm import add_rms_norm, silu_mul
from .kernels.rope import rope_and_write_kv
from .kv_cache import PagedKVCache


class KernelPasses:
    """`decode` and `prefill` callable like DecoderStack's (decode's `attend` is ignored)."""

    def __init__(self, stack: DecoderStack, kv: PagedKVCache):
        if stack.fused is None:
            stack.fuse()
        if stack.fused is None:
            raise UnsupportedModel("the Triton passes need the fused q/k/v and gate/up layout")
        self.stack = stack
        self.offsets = torch.arange(kv.block_tokens, device=kv.keys.device)
        self.final_norm = (stack.norm.weight, _eps(stack.norm))

    def _layers(self, kv: PagedKVCache, x: torch.Tensor, positions: torch.Tensor, locs: torch.Tensor, attend_fn):
        """x [T, H] through every layer; attend_fn(i, q [T, heads, D]) -> [T, heads, D] after the
        layer's keys and values were written. Returns the final norm's output [T, H]."""
        s = self.stack
        residual = None
        for i, layer in enumerate(s.layers):
            f = s.fused[i]
            h = add_rms_norm(x, residual, *f["ln1"])
            residual = x if residual is None else residual
            q = rope_and_write_kv(F.linear(h, f["qkv_weight"], f["qkv_bias"]), positions, locs, s.cos, s.sin,
                                  kv.keys[i], kv.values[i], s.heads)
            x = layer.self_attn.o_proj(attend_fn(i, q).reshape(x.shape[0], -1))
            h = add_rms_norm(x, residual, *f["ln2"])
            x = layer.mlp.down_proj(silu_mul(F.linear(h, f["gate_up_weight"])))
        return add_rms_norm(x, residual, *self.final_norm)

    def decode(self, kv: PagedKVCache, tokens: torch.Tensor, positions: torch.Tensor, write_at: torch.Tensor,
               lengths: torch.Tensor, attend: int = 0) -> torch.Tensor:
        n = tokens.shape[0]
        # Token j of row b: location block_table[b, j // block_tokens] * block_tokens + j % block_tokens.
        table = (kv.block_table[:n, :, None] * kv.block_tokens + self.offsets).view(n, -1).to(torch.int32)
        s = self.stack
        out = self._layers(kv, s.embed(tokens), positions, write_at,
                           lambda i, q: decode_attention(q, kv.keys[i], kv.values[i], table, lengths, s.scale))
        return s.lm_head(out)

    def prefill(self, kv: PagedKVCache, slots: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                write_at: torch.Tensor, last: torch.Tensor, attend: int) -> torch.Tensor:
        s = self.stack
        batch, width = tokens.shape
        table = kv.block_table[slots, :-(-attend // kv.block_tokens)]
        cols = torch.arange(table.shape[1] * kv.block_tokens, device=tokens.device)
        mask = _fold_mask(cols[None, None] <= positions[:, :, None], s.heads // s.kv_heads, s.cos.dtype)

        def attend_fn(i, q):
            q = q.view(batch, width, s.heads, -1).transpose(1, 2)
            return _gqa_attention(q, *kv.gather(i, table), mask, s.scale).transpose(1, 2)

        out = self._layers(kv, s.embed(tokens).view(batch * width, -1), positions.flatten(), write_at.flatten(),
                           attend_fn)
        rows = torch.arange(batch, device=tokens.device)
        return out.view(batch, width, -1)[rows, last]  # normed hidden states: the caller applies a head
