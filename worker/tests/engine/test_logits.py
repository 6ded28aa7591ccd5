"""The engine's logits against transformers' own forward pass, teacher-forced, in float32 on this
CPU: prefill then one decode step per token, two rows of different lengths sharing the steps. Both
decode paths (torch, the Triton kernels), with the real sizes a CPU uses and with the GPU's padding
and bucketing forced, must agree with transformers within 1e-4."""
import pytest
import torch

from qwen_worker.config import WorkerConfig
from qwen_worker.engine.teacher import reference_logits, teacher_forced_logits
from qwen_worker.model import ModelService
from qwen_worker.prompts import Message

TOLERANCE = 1e-4


def load(model_dir: str, kernels: str, **settings) -> ModelService:
    config = WorkerConfig.from_env({}, dtype="float32", model=model_dir, max_batch_size=4, max_prompt_tokens=256,
                                   max_tokens_limit=64, default_max_tokens=16, kernels=kernels, cpu_linear="default",
                                   **settings)
    service = ModelService(config)
    service.load()
    return service


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return load(tiny_model_dir, "torch")


def sequences(service) -> list[list[int]]:
    """Two chat prompts followed by tokens to force (any ids: teacher forcing needs no model choice)."""
    generator = torch.Generator().manual_seed(5)
    out = []
    for text, forced in (("你好，今天怎么样？", 12), ("a much longer question about the weather " * 3, 20)):
        prompt = service.prompter.chat_ids([Message("user", text)])
        out.append(prompt + torch.randint(0, 150000, (forced,), generator=generator).tolist())
    return out


def assert_logits_equal_transformers(service, model) -> None:
    """The engine's teacher-forced logits of sequences(service) equal transformers' `model` within TOLERANCE."""
    rows = sequences(service)
    prompt_lengths = [len(service.prompter.chat_ids([Message("user", t)]))
                      for t in ("你好，今天怎么样？", "a much longer question about the weather " * 3)]
    got = teacher_forced_logits(service.engine, rows, prompt_lengths)
    for row, n, logits in zip(rows, prompt_lengths, got):
        want = reference_logits(model, row, n)
        assert logits.shape == want.shape
        assert (logits - want).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("padded", [False, True], ids=["real sizes", "GPU padding forced"])
def test_teacher_forced_logits_equal_transformers_in_float32(tiny_model_dir, reference, kernels, padded):
    service = reference if kernels == "torch" else load(tiny_model_dir, kernels)
    service.engine.runner.pad_shapes = padded
    try:
        assert_logits_equal_transformers(service, reference.model)
    finally:
        service.engine.runner.pad_shapes = False


def test_the_triton_passes_generate_what_the_torch_path_does_with_chunked_prefill_and_rows_joining(tiny_model_dir,
                                                                                                   reference):
    from qwen_worker.engine import GenerationRow

    kernels = load(tiny_model_dir, "triton", prefill_chunk_tokens=16)
    texts = ["a much longer question about the weather " * 3, "你好", "短", "🍜 ok"]

    def run(service):
        rows = [GenerationRow(service.prompter.chat_ids([Message("user", t)]), n) for t, n in zip(texts[:2], (9, 5))]
        for row in rows:
            service.engine.add(row, lambda row, error: None)
        service.engine.step()  # the first rows are under way when the next join
        rows += [GenerationRow(service.prompter.chat_ids([Message("user", t)]), n) for t, n in zip(texts[2:], (7, 3))]
        for row in rows[2:]:
            service.engine.add(row, lambda row, error: None)
        while service.engine.has_work():
            service.engine.step()
        return [row.tokens for row in rows]

    assert run(kernels) == run(reference)


@pytest.mark.parametrize("architecture", ["qwen3", "llama"])
def test_other_decoder_architectures_give_transformers_logits_and_generate_its_greedy_tokens(architecture, tmp_path):
    """README's claim that the engine runs Qwen3 and Llama layers (Qwen3 normalises q and k per head;
    Llama has no attention bias): a tiny random model of each through the engine, as transformers runs it."""
    from qaio_models.demo import build
    from qwen_worker.engine import GenerationRow

    model_dir = str(build("tiny", tmp_path / architecture, architecture=architecture))
    service = load(model_dir, "torch")
    assert_logits_equal_transformers(service, service.model)
    prompt = service.prompter.chat_ids([Message("user", "hello")])
    row = GenerationRow(prompt, 8)
    service.engine.run([row])
    with torch.inference_mode():
        expected = service.model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):]
    expected = expected.tolist()
    ends = [i for i, t in enumerate(expected) if t in (151645, 151643)]
    assert row.tokens == expected[:ends[0] if ends else None]
