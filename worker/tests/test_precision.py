"""QAIO_DTYPE=auto on a CPU: each precision measured in a child process, the fastest served."""
from qwen_worker import precision
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
