"""8-bit weights (QAIO_DTYPE=int8): each layer within a stated distance of float32 (the logits of the
whole model: test_precision.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qwen_worker.config import ConfigError, WorkerConfig
from qwen_worker.int8_kernel import load
from qwen_worker.int8_linear import (INT8_ROWS, KERNEL_ROWS, Int8Embedding, Int8Head, Int8Linear, Int8TiedHead,
                                     int8_matmul_available, needs_reduced_range, quantize_model, quantize_rows)

pytestmark = pytest.mark.skipif(not int8_matmul_available(), reason="this torch has no int8 weight matmul")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).detach().norm() / want.detach().norm())


def test_quantized_rows_round_trip_within_half_a_step():
    torch.manual_seed(0)
    weight = torch.randn(300, 64) * torch.rand(300, 1)  # rows of very different scales
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127 and scale.shape == (300,)
    assert bool(((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-7).all())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 64), (INT8_ROWS, 64), (INT8_ROWS + 1, 64), (2, 150, 64)])
def test_an_int8_linear_is_within_one_percent_of_float32(shape, bias):
    """Both paths: the int8 matmul (up to INT8_ROWS rows) and the dequantised bf16 one (more rows)."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 300, bias=bias)
    x = torch.randn(*shape)
    got = Int8Linear(linear)(x)
    assert got.dtype == torch.float32 and got.shape == linear(x).shape
    assert relative_error(got, linear(x)) < 0.01


@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 64), (16, 64), (24, 64), (25, 64), (30, 64), (65, 64)])
def test_the_own_kernel_takes_up_to_its_rows_and_matches_the_dequantised_weights(shape):
    """The own kernel's int16 activations put it within 1e-3 of the exact product with the int8 weights
    (torch's bfloat16 activations are ~4e-3 off); past its rows the dequantised bf16 matmul serves."""
    kernel, how = load()
    if kernel is None:
        pytest.skip(f"the int8 kernel cannot serve here: {how}")
    torch.manual_seed(0)
    linear = nn.Linear(64, 300, bias=True)
    x = torch.randn(*shape)
    layer = Int8Linear(linear, kernel)
    exact = (x.double() @ (layer.weight_int8.double() * layer.scale.double()[:, None]).T + linear.bias.double())
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == linear(x).shape
    assert relative_error(got, linear(x)) < 0.01
    rows = x.numel() // 64
    if rows <= KERNEL_ROWS[kernel.isa]:
        assert relative_error(got.double(), exact) < 1e-3
    else:  # the kernel's dequantised weight and one bf16 matmul, also below torch's int8 matmul's INT8_ROWS
        assert torch.equal(got, F.linear(x.reshape(rows, 64).bfloat16(), layer.dequantized()).float() + linear.bias)
        assert relative_error(got.double(), exact) > 1e-3


def test_an_int8_embedding_looks_up_the_rows_within_half_a_step():
    torch.manual_seed(0)
    embedding = nn.Embedding(50, 16)
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    got, want = Int8Embedding(embedding)(ids), embedding(ids)
    assert got.shape == want.shape and got.dtype == torch.float32
    step = embedding.weight.detach().abs().amax(dim=1)[ids] / 127
    assert bool(((got - want).abs() <= step[..., None] / 2 + 1e-6).all())


@pytest.mark.parametrize("rows", [1, 16])
def test_the_int8_head_is_within_two_percent_of_float32_its_input_quantised_too(rows):
    """fbgemm's GEMM quantises the input (one scale per call) beside the weights; on a CPU whose int8
    products would saturate at full range (AVX2 without VNNI) the probe picks 7-bit inputs instead."""
    torch.manual_seed(0)
    head = nn.Linear(64, 1000, bias=False)
    x = torch.randn(rows, 64)
    assert isinstance(needs_reduced_range(), bool)
    assert relative_error(Int8Head(head)(x), head(x)) < 0.02
    with pytest.raises(ValueError, match="bias"):
        Int8Head(nn.Linear(64, 10))


def test_quantize_model_replaces_every_linear_and_embedding_and_nothing_else():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)), nn.Embedding(3, 8),
                          nn.LayerNorm(8))
    model.lm_head = nn.Linear(8, 3, bias=False)
    assert quantize_model(model) == 3 and type(model.lm_head) is Int8Head
    assert not any(type(m) in (nn.Linear, nn.Embedding) for m in model.modules())
    assert type(model[3]) is Int8Embedding and type(model[4]) is nn.LayerNorm


class TiedModel(nn.Module):
    """A model whose LM head's weight is its input embedding's, as Qwen2.5-0.5B's and SmolLM2's are."""

    def __init__(self):
        super().__init__()
        self.embed, self.proj = nn.Embedding(300, 64), nn.Linear(64, 64)
        self.lm_head = nn.Linear(64, 300, bias=False)
        self.lm_head.weight = self.embed.weight

    def get_input_embeddings(self):
        return self.embed


def test_a_tied_head_reads_the_embeddings_own_int8_table_on_the_kernel_in_parts_of_its_rows():
    """One table for both (no fbgemm copy); more rows than the kernel takes at once go in parts, and
    each row's answer is the one it gets alone (the kernel quantises and sums each row by itself)."""
    kernel, how = load()
    if kernel is None:
        pytest.skip(f"the int8 kernel cannot serve here: {how}")
    torch.manual_seed(0)
    model = TiedModel()
    reference = nn.Linear(64, 300, bias=False)
    reference.weight = nn.Parameter(model.embed.weight.detach().clone())
    assert quantize_model(model, kernel) == 2 and type(model.lm_head) is Int8TiedHead
    assert model.lm_head.weight_int8 is model.embed.weight_int8 and model.lm_head.scale is model.embed.scale
    rows = KERNEL_ROWS[kernel.isa] * 2 + 3
    x = torch.randn(rows, 64)
    got = model.lm_head(x)
    assert got.shape == (rows, 300) and relative_error(got, reference(x)) < 0.01
    assert torch.equal(got[-1:], model.lm_head(x[-1:])) and torch.equal(got[:1], model.lm_head(x[:1]))
    untied = TiedModel()
    untied.lm_head = nn.Linear(64, 300, bias=False)
    quantize_model(untied, kernel)
    assert type(untied.lm_head) is Int8Head  # its own weight: fbgemm's packed copy is the only one
    without_kernel = TiedModel()
    quantize_model(without_kernel)
    assert type(without_kernel.lm_head) is Int8Head


@pytest.mark.parametrize("other", [{"QAIO_DEVICE": "cuda"}, {"QAIO_KERNELS": "triton"}])
def test_int8_is_refused_on_a_gpu_and_with_the_triton_kernels(other):
    with pytest.raises(ConfigError, match="QAIO_DTYPE=int8"):
        WorkerConfig.from_env({"QAIO_DTYPE": "int8", **other})
