"""oneDNN prepacked linears compute what nn.Linear computes."""
import pytest
import torch
from torch import nn

from qwen_worker.config import WorkerConfig
from qwen_worker.cpu_linear import PackedLinear, onednn_available, pack_linears, row_bucket
from qwen_worker.engine import GenerationRow
from qwen_worker.model import ModelService
from qwen_worker.prompts import Message

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 64), (4, 64), (3, 5, 64), (16, 1, 64), (3, 64), (7, 11, 64), (2, 150, 64)])
def test_packed_linear_equals_linear(shape, bias):
    torch.manual_seed(0)
    linear = nn.Linear(64, 300, bias=bias)
    x = torch.randn(*shape)
    assert torch.allclose(PackedLinear(linear)(x), linear(x), atol=1e-5)


def test_row_counts_fall_into_few_buckets_with_little_padding():
    """Every row count runs as one of a few shapes (bounding oneDNN's per-shape primitive caches)."""
    buckets = [row_bucket(n) for n in range(1, 8193)]
    assert len(set(buckets)) <= 40
    assert all(n <= b for n, b in zip(range(1, 8193), buckets))
    assert all(b - n < max(16, n / 4) for n, b in zip(range(17, 8193), buckets[16:]))
    assert [row_bucket(n) for n in (1, 2, 3, 5, 16, 17, 33)] == [1, 2, 4, 8, 16, 32, 48]


def test_pack_linears_replaces_every_float32_linear():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)), nn.Embedding(3, 8))
    assert pack_linears(model) == 2
    assert not any(type(m) is nn.Linear for m in model.modules())


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    loaded = {}
    for kernel in ("default", "onednn"):
        service = ModelService(WorkerConfig.from_env({}, dtype="float32", model=tiny_model_dir, cpu_linear=kernel))
        service.load()
        loaded[kernel] = service
    return loaded


def test_the_model_gives_the_same_answers_on_either_kernel(models):
    default, onednn = models["default"], models["onednn"]
    assert default.packed_linears == 0 and onednn.packed_linears > 0
    assert default.parameter_count == onednn.parameter_count
    prompts = [default.prompter.sentiment_ids(t, "zh") for t in ("好吃", "太慢了，凉了", "还行吧")]
    for a, b in zip(default.score_sentiment(prompts), onednn.score_sentiment(prompts)):
        assert a == pytest.approx(b, abs=1e-5)
    rows = {k: [GenerationRow(m.prompter.chat_ids([Message("user", t)]), max_new_tokens=12) for t in ("你好", "hi")]
            for k, m in models.items()}
    for kernel, model in models.items():
        model.engine.run(rows[kernel])
    assert [r.tokens for r in rows["default"]] == [r.tokens for r in rows["onednn"]]


def test_bfloat16_linears_are_packed_only_where_this_cpu_has_onednns_bfloat16_linear():
    """An AVX2-only CPU has none (torch fails to pack the weight): those layers stay nn.Linear and still run."""
    model = nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16), nn.Linear(8, 4).to(torch.bfloat16))
    assert pack_linears(model) == (2 if onednn_available(torch.bfloat16) else 0)
    with torch.inference_mode():
        assert model(torch.randn(3, 8, dtype=torch.bfloat16)).shape == (3, 4)
