"""nn.Linear with 8-bit weights (QAIO_DTYPE=int8, CPU): a decode step reads a quarter of float32's bytes.

Weight-only, symmetric, one scale per output channel (what gpt-fast's int8 mode and llama.cpp's
Q8_0 do in spirit; Q8_0 has a scale per 32 weights). A few rows (decode, a small prompt) go through
the project's own int8 kernel (int8_kernel.py: int16 activations, int32 sums, AVX-512 VNNI or AVX2),
which reads the weights at 1.5x the speed of torch's int8 weight-packed matmul at one row and 2x at
16 rows (24 layers of the 0.5B shape on two Xeon cores: 22 against 33 ms, 53 against 117); where it
is not built, torch's int8 matmul with bfloat16 activations takes up to INT8_ROWS rows. More rows (a
prompt, a sentiment pass; with the kernel, every call past its rows) take a bfloat16 copy of the weight made for that call (by the kernel's
one-pass dequantisation where built: 36 ms for those 24 layers against torch's 98) and one bfloat16
matmul. Outputs come back in the input's dtype. Measured in docs/cpu-precision.md.

The LM head (a fifth of the 0.5B's weights, read at every decode step): where it is the input
embedding's weight (tied, as in Qwen2.5-0.5B and SmolLM2) and the kernel is built, it runs on the
kernel over the embedding's own int8 table (Int8TiedHead: one copy of the table, 140 MB less RSS for
the 0.5B shape, for ~1 ms more per decode step: 6.7 against 5.6 ms at one row). Otherwise it runs on
fbgemm's int8 GEMM from a packed copy, which quantises its input too (one scale per call): 3.7 ms
instead of 9 for one row of the 0.5B's head on a Xeon with VNNI, 10 instead of 47 for 16. Quantising
the input to 8 bits costs the decoder layers up to 10 % error (their inputs have outlier channels), so
only that head does it; its input is the final norm's, and teacher-forced on the stand-in its logits'
error and top-token agreement stay those of a weight-only head (test_precision.py bounds them). The
input embedding is held as int8 rows, dequantised per looked-up token.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_linear import replace_modules
from .int8_kernel import Int8Kernel

# Up to this many rows torch's int8 matmul beats dequantising the weight for one bf16 matmul (0.5B shape,
# 4864x896 on 2 EPYC cores: 1.1 ms against 1.6 at 16 rows, 3.7 against 2.2 at 64; the LM head's
# dequantisation alone takes 185 ms, and the head never sees more rows than a decode batch).
INT8_ROWS = 32
# The same for the own kernel, by its instruction set, against its own one-pass dequantisation and a
# bf16 matmul (24 layers of the 0.5B shape on 2 Xeon cores: AVX-512 VNNI 53 ms at 16 rows and 89 at 32
# against dequantising's 76 and 83; AVX2 82 at 16 against 85).
KERNEL_ROWS = {"avx512_vnni": 24, "avx2": 16}


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weights and float32 scales per output row: w ~= q * scale, |q| <= 127."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def int8_matmul_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm") and "fbgemm" in torch.backends.quantized.supported_engines


def _fbgemm_pack(q: torch.Tensor, scale: torch.Tensor):
    """fbgemm's packed form of int8 rows q with their scales (the quantised tensor is only its input)."""
    with warnings.catch_warnings():  # torch marks its quantised-tensor constructors deprecated (2.13)
        warnings.simplefilter("ignore")
        zero_points = torch.zeros(q.shape[0], dtype=torch.long)
        qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero_points, 0)
        return torch.ops.quantized.linear_prepack(qweight, None)


@functools.cache
def needs_reduced_range() -> bool:
    """Whether this CPU's int8 GEMM saturates full-range products (AVX2 without VNNI adds pairs of
    uint8 x int8 products in 16 bits, which 255 * 127 * 2 overflows): then inputs are quantised to 7
    bits. Found by a product whose exact value is known, not from the CPU's flags."""
    x = torch.full((1, 64), 255.0)
    x[0, 0] = 0.0  # a zero point of 0, the rest at the top of the range
    got = float(torch.ops.quantized.linear_dynamic(x, _fbgemm_pack(torch.full((1, 64), 127, dtype=torch.int8),
                                                                    torch.ones(1)), False)[0, 0])
    want = float(x.sum()) * 127
    return abs(got - want) > 0.01 * want


class Int8Linear(nn.Module):
    """The affine map of an nn.Linear with its weight held as int8 and per-row scales."""

    def __init__(self, linear: nn.Linear, kernel: Int8Kernel | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernel = kernel
        self.kernel_rows = KERNEL_ROWS[kernel.isa] if kernel else 0
        q, scale = quantize_rows(linear.weight)
        self.register_buffer("weight_int8", q, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16), persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        if self.kernel is not None:  # one pass instead of torch's two (2.7x here)
            return self.kernel.dequantize(self.weight_int8, self.scale)
        return self.weight_int8.to(torch.bfloat16) * self.scale_bf16[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= self.kernel_rows:
            y = self.kernel.linear(rows, self.weight_int8, self.scale)
        elif self.kernel is None and rows.shape[0] <= INT8_ROWS:  # the kernel's dequantisation beats it
            y = torch.ops.aten._weight_int8pack_mm(rows.to(torch.bfloat16).contiguous(), self.weight_int8,
                                                   self.scale_bf16)
        else:
            y = F.linear(rows.to(torch.bfloat16), self.dequantized())
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class Int8Head(nn.Module):
    """The LM head's map with its weight as int8 rows and scales, on fbgemm's int8 GEMM (see above)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("an output layer with a bias is not supported")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = _fbgemm_pack(*quantize_rows(linear.weight))
        self.reduce_range = needs_reduced_range()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        y = torch.ops.quantized.linear_dynamic(rows, self.packed, self.reduce_range)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class Int8TiedHead(nn.Module):
    """The LM head of a model whose output embedding is its input embedding, on the own kernel over the
    embedding's own int8 table and scales: no second copy of the table (fbgemm's packed one is 136 MB
    for the 0.5B shape), at ~1 ms more per decode step (6.7 against 5.6 for one row read from memory)."""

    def __init__(self, embedding: "Int8Embedding", kernel: Int8Kernel):
        super().__init__()
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self.register_buffer("weight_int8", embedding.weight_int8, persistent=False)  # the same tensors
        self.register_buffer("scale", embedding.scale, persistent=False)
        self.kernel, self.rows = kernel, KERNEL_ROWS[kernel.isa]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # More rows than the kernel's go through it in parts (never a dequantised 272 MB bf16 table).
        parts = [self.kernel.linear(part, self.weight_int8, self.scale)
                 for part in x.reshape(-1, self.in_features).split(self.rows)]
        y = parts[0] if len(parts) == 1 else torch.cat(parts)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class Int8Embedding(nn.Module):
    """An nn.Embedding's table as int8 rows with a scale per row: a lookup dequantises the rows it takes."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.out_dtype = embedding.weight.dtype
        q, scale = quantize_rows(embedding.weight)
        self.register_buffer("weight_int8", q, persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.weight_int8[ids].float() * self.scale[ids].unsqueeze(-1)).to(self.out_dtype)


def quantize_model(model: nn.Module, kernel: Int8Kernel | None = None) -> int:
    """Every nn.Embedding to an Int8Embedding; the LM head (`lm_head`, where the model has one) to an
    Int8TiedHead over the input embedding's table where the two share their weight and `kernel` is
    given, else to an Int8Head; every other nn.Linear to an Int8Linear (on `kernel` for few rows, where
    given); returns how many linears."""
    head = getattr(model, "lm_head", None)
    head = head if type(head) is nn.Linear else None
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    shared = kernel is not None and head is not None and type(embedding) is nn.Embedding \
        and head.weight is embedding.weight
    if head is not None and not shared:
        model.lm_head = Int8Head(head)
    replace_modules(model, lambda embedding: True, Int8Embedding, kind=nn.Embedding)
    if shared:
        model.lm_head = Int8TiedHead(model.get_input_embeddings(), kernel)
    return int(head is not None) + replace_modules(model, lambda linear: True,
                                                   lambda linear: Int8Linear(linear, kernel))
