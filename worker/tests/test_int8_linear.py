"""8-bit weights (QAIO_DTYPE=int8): each layer and the whole model within a stated distance of float32."""
import pytest
import torch
from torch import nn

from qwen_worker.config import ConfigError, WorkerConfig
from qwen_worker.engine import GenerationRow
from qwen_worker.engine.teacher import teacher_forced_logits
from qwen_worker.int8_linear import (INT8_ROWS, Int8Embedding, Int8Linear, int8_matmul_available, quantize_model,
                                     quantize_rows)
from qwen_worker.model import ModelService
from qwen_worker.prompts import Message

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


def test_an_int8_embedding_looks_up_the_rows_within_half_a_step():
    torch.manual_seed(0)
    embedding = nn.Embedding(50, 16)
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    got, want = Int8Embedding(embedding)(ids), embedding(ids)
    assert got.shape == want.shape and got.dtype == torch.float32
    step = embedding.weight.detach().abs().amax(dim=1)[ids] / 127
    assert bool(((got - want).abs() <= step[..., None] / 2 + 1e-6).all())


def test_quantize_model_replaces_every_linear_and_embedding_and_nothing_else():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)), nn.Embedding(3, 8),
                          nn.LayerNorm(8))
    assert quantize_model(model) == 2
    assert not any(type(m) in (nn.Linear, nn.Embedding) for m in model.modules())
    assert type(model[3]) is Int8Embedding and type(model[4]) is nn.LayerNorm


@pytest.mark.parametrize("other", [{"QAIO_DEVICE": "cuda"}, {"QAIO_KERNELS": "triton"}])
def test_int8_is_refused_on_a_gpu_and_with_the_triton_kernels(other):
    with pytest.raises(ConfigError, match="QAIO_DTYPE=int8"):
        WorkerConfig.from_env({"QAIO_DTYPE": "int8", **other})


@pytest.fixture(scope="module")
def models(stand_in_model_dir):
    """The stand-in (real weights: int8's error shows as it would on the real model) in both precisions."""
    loaded = {}
    for dtype in ("float32", "int8"):
        service = ModelService(WorkerConfig.from_env({}, model=stand_in_model_dir, dtype=dtype))
        service.load()
        loaded[dtype] = service
    return loaded


def test_the_stand_ins_int8_logits_stay_close_to_float32_and_pick_the_same_tokens(models):
    """Teacher-forced over a reply: the logits' error within 5 % of their spread, the top token the same
    at 9 positions in 10 at least, and the model says int8 in what it describes."""
    fp32, int8 = models["float32"], models["int8"]
    assert int8.int8_linears > 0 and int8.describe()["dtype"] == "int8" and fp32.describe()["dtype"] == "float32"
    prompt = fp32.prompter.chat_ids([Message("user", "Tell me about the weather in spring.")])
    row = GenerationRow(list(prompt), max_new_tokens=24)  # float32's greedy reply, fed to both
    fp32.engine.run([row])
    sequence = list(prompt) + row.tokens
    want = teacher_forced_logits(fp32.engine, [sequence], [len(prompt)])[0]
    got = teacher_forced_logits(int8.engine, [sequence], [len(prompt)])[0]
    error = float((got - want).abs().mean() / want.std())
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
    print(f"int8 logit error / std {error:.4f}, top-1 agreement {agree:.1%}")
    assert error < 0.05
    assert agree >= 0.9, f"top tokens agree at {agree:.0%} of positions"
