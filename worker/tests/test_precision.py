"""Each CPU precision's logits against float32 on the stand-in, and QAIO_DTYPE=auto: each precision
measured in a child process, the fastest served."""
import pytest

from qwen_worker import precision
from qwen_worker.engine.teacher import against_reference
from qwen_worker.config import WorkerConfig
from qwen_worker.engine import GenerationRow
from qwen_worker.model import ModelService
from qwen_worker.prompts import Message


def test_each_candidate_is_timed_at_every_row_count_and_the_fastest_is_chosen():
    chosen, report = precision.choose(64, 256)
    assert set(report["ms"]) == set(precision.CANDIDATES)
    for dtype, times in report["ms"].items():
        assert "error" not in times, f"{dtype}: {times}"
        assert sorted(times) == sorted(str(r) for r in precision.ROWS) and all(ms > 0 for ms in times.values())
    speedups = report["speedup_over_float32"]
    assert speedups["float32"] == 1.0 and chosen == max(speedups, key=speedups.get)


def test_a_candidate_whose_child_fails_is_left_out_and_the_worker_goes_on():
    results = precision.measure(("float32", "float8"), 64, 256)
    assert "exited with 1" in results["float8"]["error"] and "unknown precision" in results["float8"]["error"]
    assert set(precision.speedups(results)) == {"float32"}


def test_a_model_loaded_with_auto_serves_and_describes_the_measured_choice(tiny_model_dir):
    service = ModelService(WorkerConfig.from_env({}, dtype="auto", model=tiny_model_dir, warmup=False))
    service.load()
    described = service.describe()
    assert described["dtype"] == described["dtype_measured"]["chosen"] == service.precision
    assert (service.int8_linears > 0) == (service.precision == "int8")
    row = GenerationRow(list(service.prompter.chat_ids([Message("user", "hello")])), max_new_tokens=4)
    service.engine.run([row])
    assert len(row.tokens) == 4


@pytest.fixture(scope="module")
def stand_ins(stand_in_model_dir):
    """The stand-in (real weights: a precision's error shows as it would on the real model) in each precision."""
    loaded = {}
    for dtype in ("float32", "int8", "bfloat16"):
        service = ModelService(WorkerConfig.from_env({}, model=stand_in_model_dir, dtype=dtype))
        service.load()
        loaded[dtype] = service
    return loaded


# Bounds: the logits' mean error over their spread, and the share of positions whose top token is
# float32's (make cpu-precision measured 0.048 / 95 % for int8 and 0.021 / 99 % for bfloat16).
@pytest.mark.parametrize("dtype,max_error,min_agreement", [("int8", 0.05, 0.9), ("bfloat16", 0.03, 0.95)])
def test_the_stand_ins_logits_in_each_precision_stay_close_to_float32(stand_ins, dtype, max_error, min_agreement):
    """Teacher-forced over float32's greedy reply; the model says its precision in what it describes."""
    fp32, other = stand_ins["float32"], stand_ins[dtype]
    assert other.describe()["dtype"] == dtype and fp32.describe()["dtype"] == "float32"
    assert (other.int8_linears > 0) == (dtype == "int8")
    prompt = fp32.prompter.chat_ids([Message("user", "Tell me about the weather in spring.")])
    error, agreeing, positions = against_reference(fp32.engine, other.engine, prompt, 24)
    agree = agreeing / positions
    assert error < max_error, f"{dtype}: logit error {error:.4f} of their spread"
    assert agree >= min_agreement, f"{dtype}: top tokens agree at {agree:.0%} of positions"
