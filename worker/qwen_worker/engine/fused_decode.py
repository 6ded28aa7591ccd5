"""The decode step through the engine's Triton kernels (QAIO_KERNELS=triton).

Per layer: add + RMSNorm, the fused qkv matmul, RoPE with the K/V write, split-KV attention, o_proj,
add + RMSNorm, the fused gate/up matmul, SiLU x mul, down_proj: 10 launches where the torch path
takes ~19. Attention reads each row's length on the device, so the step's shapes depend on the batch
size alone (one CUDA graph per batch size). Keys and values are reached through a table of token
locations, so a cache in blocks would need a different table, not a different kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .forward import DecoderStack, UnsupportedModel, _eps
from .kernels.attention import decode_attention
from .kernels.norm import add_rms_norm, silu_mul
from .kernels.rope import rope_and_write_kv
from .kv_cache import SlotKVCache


class KernelDecode:
    """Callable like DecoderStack.decode (`attend` is ignored: lengths bound each row's keys)."""

    def __init__(self, stack: DecoderStack, kv: SlotKVCache):
        if stack.fused is None:
            stack.fuse()
        if stack.fused is None:
            raise UnsupportedModel("the Triton decode path needs the fused q/k/v and gate/up layout")
        self.stack = stack
        slots, page = kv.keys.shape[1], kv.keys.shape[3]
        # Slot s is one page of `page` tokens: token j of slot s lives at location s * page + j.
        self.table = (torch.arange(slots, device=kv.keys.device)[:, None] * page
                      + torch.arange(page, device=kv.keys.device)[None]).to(torch.int32)
        self.final_norm = (stack.norm.weight, _eps(stack.norm))

    def __call__(self, kv: SlotKVCache, tokens: torch.Tensor, positions: torch.Tensor, write_at: torch.Tensor,
                 lengths: torch.Tensor, attend: int = 0) -> torch.Tensor:
        s = self.stack
        n = tokens.shape[0]
        table = self.table[:n]
        locs = table.gather(1, write_at[:, None].to(torch.int64))[:, 0]
        x = s.embed(tokens)
        residual = None
        for i, layer in enumerate(s.layers):
            f = s.fused[i]
            h = add_rms_norm(x, residual, *f["ln1"])
            residual = x if residual is None else residual
            qkv = F.linear(h, f["qkv_weight"], f["qkv_bias"])
            q = rope_and_write_kv(qkv, positions, locs, s.cos, s.sin, kv.keys[i], kv.values[i], s.heads)
            out = decode_attention(q, kv.keys[i], kv.values[i], table, lengths, s.scale)
            x = layer.self_attn.o_proj(out.view(n, -1))
            h = add_rms_norm(x, residual, *f["ln2"])
            x = layer.mlp.down_proj(silu_mul(F.linear(h, f["gate_up_weight"])))
        return s.lm_head(add_rms_norm(x, residual, *self.final_norm))
