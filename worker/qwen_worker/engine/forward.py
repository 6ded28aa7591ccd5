"""The model's forward pass over KV slots, written with the model's own modules and weights.

transformers stays the model (its embeddings, projections, norms and MLPs run as they are); only the
attention's cache handling is ours, so that every shape is fixed and a step can be captured as a CUDA
graph. Supports the Llama-style decoder layout (Qwen2, Qwen3, Llama, SmolLM2): checked at load.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kv_cache import PagedKVCache


class UnsupportedModel(ValueError):
    """The model's layers do not have the layout this engine runs."""


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def _fold_mask(mask: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """mask [B, T, L] (True: attend) as an additive [B, 1, group * T, L] mask (0 or -inf) for queries
    folded by _gqa_attention; built once per pass rather than converted by every layer's attention."""
    batch, length, keys = mask.shape
    folded = mask[:, None, None].expand(batch, 1, group, length, keys).reshape(batch, 1, group * length, keys)
    return torch.zeros(folded.shape, dtype=dtype, device=mask.device).masked_fill_(~folded, float("-inf"))


def _eps(norm) -> float:
    return getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)


def _gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, folded_mask: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """q [B, heads, T, D] against k, v [B, kv_heads, L, D]; the mask comes from _fold_mask.

    Query heads sharing a KV head are folded into the query length, so K and V are never repeated.
    """
    batch, heads, length, dim = q.shape
    q = q.reshape(batch, k.shape[1], heads // k.shape[1] * length, dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=folded_mask, scale=scale)
    return out.reshape(batch, heads, length, dim)


class DecoderStack:
    """Runs a causal LM's layers with keys and values in a PagedKVCache."""

    def __init__(self, model, max_positions: int):
        base = getattr(model, "model", None)
        layers = getattr(base, "layers", None)
        if base is None or layers is None or not hasattr(model, "lm_head"):
            raise UnsupportedModel(f"{type(model).__name__} has no model.layers / lm_head")
        config = model.config
        for layer in layers:
            attn = getattr(layer, "self_attn", None)
            if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                    or not all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm", "mlp")):
                raise UnsupportedModel(f"{type(layer).__name__} is not a Llama-style decoder layer")
            if getattr(attn, "sliding_window", None):
                raise UnsupportedModel("sliding-window attention layers are not supported")
        self.embed = base.embed_tokens
        self.layers = list(layers)
        self.norm = base.norm
        self.lm_head = model.lm_head
        attn = layers[0].self_attn
        self.head_dim = attn.head_dim
        self.scale = attn.scaling
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.vocab_size = config.vocab_size
        # Activations' dtype and device: the final norm's (an 8-bit model's embedding and linears hold int8).
        self.dtype, self.device = self.norm.weight.dtype, self.norm.weight.device
        self.hidden_size = config.hidden_size
        # RoPE tables for every position, from the model's own rotary module (its scaling included).
        positions = torch.arange(max_positions + 1, device=self.device)[None]
        with torch.inference_mode():
            cos, sin = base.rotary_emb(torch.empty(1, dtype=self.dtype, device=self.device), positions)
        self.cos, self.sin = cos[0].clone(), sin[0].clone()  # [positions, head_dim]
        self.fused: list[dict] | None = None

    def fuse(self) -> None:
        """Concatenate each layer's q/k/v and gate/up weights, so one matmul does the work of three and
        of two, and use torch's single-kernel RMSNorm: a decode step launches ~20 kernels per layer
        instead of ~50. Costs a second copy of those weights; for GPUs, where launches bind decode."""
        fused = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if hasattr(attn, "q_norm") or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
                return  # a layout this fast path does not know: keep the module-by-module path
            biases = [p.bias for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
            fused.append({
                "qkv_weight": torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach(),
                "qkv_bias": None if any(b is None for b in biases) else torch.cat(biases).detach(),
                "gate_up_weight": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
                "ln1": (layer.input_layernorm.weight, _eps(layer.input_layernorm)),
                "ln2": (layer.post_attention_layernorm.weight, _eps(layer.post_attention_layernorm)),
            })
        self.fused = fused

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, 1, D] for positions [B, T]: gathered once per pass, used by every layer."""
        return self.cos[positions][:, :, None], self.sin[positions][:, :, None]

    def _layer_qkv(self, i: int, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys, values [B, heads, T, D] of x [B, T, H] for layer i, RoPE applied: fused
        weights when fuse() ran, else the layer's own modules."""
        batch, length, hidden = x.shape
        cos, sin = rope
        if self.fused is not None:
            f = self.fused[i]
            h = F.rms_norm(x, (hidden,), *f["ln1"])
            qkv = F.linear(h, f["qkv_weight"], f["qkv_bias"]).view(batch, length, -1, self.head_dim)
            qk = _rope(qkv[:, :, :self.heads + self.kv_heads], cos, sin)  # RoPE once for queries and keys
            q, k = qk[:, :, :self.heads], qk[:, :, self.heads:]
            v = qkv[:, :, self.heads + self.kv_heads:]
        else:
            attn = self.layers[i].self_attn
            h = self.layers[i].input_layernorm(x)
            q = attn.q_proj(h).view(batch, length, -1, self.head_dim)
            k = attn.k_proj(h).view(batch, length, -1, self.head_dim)
            v = attn.v_proj(h).view(batch, length, -1, self.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3 normalises each head before RoPE
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _layer_rest(self, i: int, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Layer i after attention: output projection and residual, then the MLP and its residual."""
        layer = self.layers[i]
        batch, _, length, _ = attn_out.shape
        x = x + layer.self_attn.o_proj(attn_out.transpose(1, 2).reshape(batch, length, -1))
        if self.fused is None:
            return x + layer.mlp(layer.post_attention_layernorm(x))
        gate, up = F.linear(F.rms_norm(x, (x.shape[-1],), *self.fused[i]["ln2"]),
                            self.fused[i]["gate_up_weight"]).chunk(2, dim=-1)
        return x + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)

    def decode(self, kv: PagedKVCache, tokens: torch.Tensor, positions: torch.Tensor, write_at: torch.Tensor,
               lengths: torch.Tensor, attend: int) -> torch.Tensor:
        """One token for each of slots [0, n): logits [n, vocab].

        tokens, positions, write_at (token locations in the pool), lengths: [n]; `lengths` counts the
        keys each row attends to (the new one included), all within the first `attend` positions of
        the blocks in its block table row.
        """
        n = tokens.shape[0]
        table = kv.block_table[:n, :-(-attend // kv.block_tokens)]
        keys = table.shape[1] * kv.block_tokens
        mask = (torch.arange(keys, device=tokens.device)[None] < lengths[:, None])[:, None]  # [n, 1, keys]
        mask = _fold_mask(mask, self.heads // self.kv_heads, self.cos.dtype)
        rope = self._rope_at(positions[:, None])
        x = self.embed(tokens)[:, None]
        for i in range(len(self.layers)):
            q, k, v = self._layer_qkv(i, x, rope)
            kv.write(i, write_at, k[:, :, 0], v[:, :, 0])
            out = _gqa_attention(q, *kv.gather(i, table), mask, self.scale)
            x = self._layer_rest(i, x, out)
        return self.lm_head(self.norm(x[:, 0]))

    def prefill(self, kv: PagedKVCache, slots: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                write_at: torch.Tensor, last: torch.Tensor, attend: int) -> torch.Tensor:
        """A chunk of prompt tokens [B, W] of the rows in slots [B]: writes their keys, returns the final
        norm's output [B, H] at each row's index `last` (its last real token): the heads are applied by
        the caller, to the rows that need them.

        positions [B, W]: each token's position in its sequence (padding repeats the last real one);
        write_at [B, W]: the pool location its key goes to (padding: the scratch location). Each token
        attends to every earlier position of its row, up to `attend` positions.
        """
        x = self.embed(tokens)
        table = kv.block_table[slots, :-(-attend // kv.block_tokens)]
        cols = torch.arange(table.shape[1] * kv.block_tokens, device=tokens.device)
        mask = _fold_mask(cols[None, None] <= positions[:, :, None], self.heads // self.kv_heads, self.cos.dtype)  # causal
        rope = self._rope_at(positions)
        for i in range(len(self.layers)):
            q, k, v = self._layer_qkv(i, x, rope)
            kv.write(i, write_at, k.transpose(1, 2), v.transpose(1, 2))
            out = _gqa_attention(q, *kv.gather(i, table), mask, self.scale)
            x = self._layer_rest(i, x, out)
        rows = torch.arange(x.shape[0], device=x.device)
        return self.norm(x[rows, last])
