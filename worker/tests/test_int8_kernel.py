"""The own int8 kernel (native/int8_matmul.cpp): built from scratch, each instruction set the CPU reports
against a float reference, tried in a child before use, and a worker that cannot build it still serving."""
import pytest
import torch

from qwen_worker import int8_kernel
from qwen_worker.config import WorkerConfig
from qwen_worker.engine import GenerationRow
from qwen_worker.int8_linear import int8_matmul_available
from qwen_worker.model import ModelService
from qwen_worker.prompts import Message

pytestmark = pytest.mark.skipif(not int8_matmul_available(), reason="int8 serving needs an x86 build of torch")


@pytest.fixture(scope="module")
def kernel() -> int8_kernel.Int8Kernel:
    built, how = int8_kernel.load()
    if built is None:
        pytest.skip(f"the int8 kernel cannot serve here: {how}")
    return built


@pytest.fixture(scope="module")
def isas(kernel) -> list[str]:
    return list(torch.ops.qaio.int8_isas())


def reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.double() @ (q.double() * scale.double()[:, None]).T


@pytest.mark.tool  # runs the C++ compiler
def test_the_library_builds_from_scratch_and_a_second_build_reuses_it(tmp_path):
    """The default directory may hold an old build: this one starts from nothing."""
    library = int8_kernel.build(tmp_path)
    assert library.exists() and library.name.startswith("qaio_int8-")
    stamp = library.stat().st_mtime_ns
    assert int8_kernel.build(tmp_path) == library and library.stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob("*.tmp"))


def test_each_instruction_set_the_cpu_reports_matches_a_float_reference_on_every_kind_of_tail(isas):
    assert isas, "an x86 CPU that runs torch reports AVX2 at least"
    for isa in isas:
        int8_kernel.check(isa)  # 1-16 rows, columns and outputs that are and are not multiples of the vectors


@pytest.mark.parametrize("isa_index", [0, 1])
def test_the_int32_sums_do_not_overflow_at_full_scale_past_a_chunk(isas, isa_index):
    """Every activation and weight at the top of its range, over more columns than one int32 chunk holds."""
    if isa_index >= len(isas):
        pytest.skip("this CPU reports one instruction set")
    columns = 9000  # the widest int32 chunk is 4096 columns; without chunks a lane would pass 2^31
    x = torch.full((2, columns), 7.5)
    x[1] *= -1
    q = torch.full((5, columns), 127, dtype=torch.int8)
    scale = torch.full((5,), 0.01)
    got = torch.ops.qaio.int8_linear(x, q, scale, isas[isa_index]).double()
    want = reference(x, q, scale)
    assert torch.allclose(got, want, rtol=1e-5), f"{got[:, 0].tolist()} against {want[:, 0].tolist()}"


def test_a_row_that_is_not_finite_gives_nan_a_zero_row_zero_and_the_dtype_is_the_inputs(kernel):
    q = torch.ones(3, 40, dtype=torch.int8)
    scale = torch.ones(3)
    x = torch.zeros(5, 40)
    x[0, 7], x[1, 39], x[2, 0], x[4, 3] = float("nan"), float("inf"), 2.0, 1e-39
    got = kernel.linear(x, q, scale)
    assert bool(got[0].isnan().all()) and bool(got[1].isnan().all())
    assert got[2].tolist() == [2.0] * 3 and got[3].tolist() == [0.0] * 3 and bool((got[4].abs() < 1e-30).all())
    assert kernel.linear(x[2:4].to(torch.bfloat16), q, scale).dtype == torch.bfloat16


def test_an_instruction_set_that_fails_its_trial_is_refused(kernel):
    """The trial runs in a child: an unknown instruction set (or one that faults) is reported, not used."""
    reason = int8_kernel.trial(kernel.library, "avx9000")
    assert reason is not None and "exited with" in reason and "isa is avx512_vnni or avx2" in reason
    assert int8_kernel.trial(kernel.library, kernel.isa) is None


def test_a_worker_that_cannot_build_the_kernel_serves_int8_on_torchs_and_says_why(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    service = ModelService(WorkerConfig.from_env({}, model=tiny_model_dir, dtype="int8", warmup=False,
                                                 kernel_dir=str(tmp_path / "kernels")))
    service.load()
    described = service.describe()["int8_kernel"]
    assert described.startswith("torch (the own kernel is not built: no C++ compiler"), described
    row = GenerationRow(list(service.prompter.chat_ids([Message("user", "hello")])), max_new_tokens=4)
    service.engine.run([row])
    assert len(row.tokens) == 4


def test_a_worker_serves_int8_on_the_kernel_and_reports_its_instruction_set(tiny_model_dir, kernel):
    service = ModelService(WorkerConfig.from_env({}, model=tiny_model_dir, dtype="int8", warmup=False))
    service.load()
    assert service.describe()["int8_kernel"] == kernel.isa
    linears = [m for m in service.model.modules() if type(m).__name__ == "Int8Linear"]
    assert linears and all(m.kernel == kernel for m in linears)
