import re

import pytest

from qwen_worker.config import ConfigError, WorkerConfig, describe_settings


def test_defaults_need_no_environment():
    config = WorkerConfig.from_env({})
    assert config.model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert config.model_name == "Qwen/Qwen2.5-0.5B-Instruct"
    assert (config.host, config.port, config.workers) == ("127.0.0.1", 8001, 1)
    assert config.instance_id  # the host name when not set


def test_environment_is_read_and_typed():
    config = WorkerConfig.from_env({"QAIO_PORT": "9000", "QAIO_BATCH_WAIT_MS": "2.5", "QAIO_WARMUP": "false",
                                    "QAIO_DEVICE": "cuda:1", "QAIO_INSTANCE_ID": "w7"})
    assert (config.port, config.batch_wait_ms, config.warmup, config.device, config.instance_id) == \
        (9000, 2.5, False, "cuda:1", "w7")


def test_overrides_win_over_environment():
    assert WorkerConfig.from_env({"QAIO_PORT": "9000"}, port=9100).port == 9100


@pytest.mark.parametrize("env, fragment", [
    ({"QAIO_PORT": "eighty"}, "QAIO_PORT"),
    ({"QAIO_MAX_BATCH_SIZE": "-1"}, "QAIO_MAX_BATCH_SIZE must be >= 0"),
    ({"QAIO_DTYPE": "int4"}, "QAIO_DTYPE must be one of"),
    ({"QAIO_DEVICE": "tpu"}, "QAIO_DEVICE"),
    ({"QAIO_WARMUP": "maybe"}, "QAIO_WARMUP"),
    ({"QAIO_CUDA_GRAPHS": "sometimes"}, "QAIO_CUDA_GRAPHS must be one of"),
    ({"QAIO_COMPILE": "auto"}, "QAIO_COMPILE must be one of"),
    ({"QAIO_DEFAULT_MAX_TOKENS": "2000"}, "QAIO_DEFAULT_MAX_TOKENS must not exceed"),
    ({"QAIO_DEFAULT_TOP_P": "1.5"}, "QAIO_DEFAULT_TOP_P"),
    ({"QAIO_HTTP_WORKER": "eventlet"}, "QAIO_HTTP_WORKER must be one of"),
    ({"QAIO_HTTP_WORKER": "gevent", "QAIO_ENGINE_PROCESS": "off"}, "QAIO_HTTP_WORKER=gevent needs an engine process"),
    ({"QAIO_HTTP_WORKER": "gevent", "QAIO_DEVICE": "cpu"}, "QAIO_HTTP_WORKER=gevent needs an engine process"),
])
def test_invalid_settings_fail_at_start(env, fragment):
    with pytest.raises(ConfigError, match=fragment):
        WorkerConfig.from_env(env)


def test_the_triton_kernels_need_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="QAIO_KERNELS=triton needs a GPU"):
        WorkerConfig.from_env({"QAIO_KERNELS": "triton", "QAIO_DEVICE": "cpu"})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert WorkerConfig.from_env({"QAIO_KERNELS": "triton", "QAIO_DEVICE": "cpu"}).kernels == "triton"
    with pytest.raises(ConfigError, match="QAIO_KERNELS must be one of"):
        WorkerConfig.from_env({"QAIO_KERNELS": "cuda"})
    with pytest.raises(ConfigError, match="QAIO_CPU_LINEAR=onednn and QAIO_KERNELS=triton do not combine"):
        WorkerConfig.from_env({"QAIO_KERNELS": "triton", "QAIO_DEVICE": "cpu", "QAIO_CPU_LINEAR": "onednn"})


def test_unknown_override_is_an_error():
    with pytest.raises(ConfigError, match="unknown"):
        WorkerConfig.from_env({}, modle="x")


def test_local_directory_model_is_named_after_its_folder(tmp_path):
    (tmp_path / "my-model").mkdir()
    assert WorkerConfig.from_env({"QAIO_MODEL": str(tmp_path / "my-model")}).model_name == "my-model"


def _rendered(default) -> str:
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)


def test_the_settings_page_documents_every_setting_with_its_default():
    """docs/settings.md holds one row per WorkerConfig field, with the default the code has, and no others."""
    page = (__import__("pathlib").Path(__file__).resolve().parents[2] / "docs" / "settings.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(QAIO_[A-Z0-9_]+)` \| ([^|]+) \|", page, re.M))
    settings = {name: default for name, default, _ in describe_settings()}
    assert sorted(rows) == sorted(settings), "docs/settings.md and WorkerConfig list different settings"
    wrong = {name: (rows[name].strip(), _rendered(default)) for name, default in settings.items()
             if default != "" and rows[name].strip() != f"`{_rendered(default)}`"}
    assert not wrong, f"defaults in docs/settings.md differ from the code's: {wrong}"
    assert "docs/settings.md" in (page and (__import__("pathlib").Path(__file__).resolve().parents[2] / "README.md")
                                  .read_text(encoding="utf-8")), "README links the settings page"


def test_sizes_follow_the_device_unless_set():
    cpu = WorkerConfig.from_env({"QAIO_DEVICE": "cpu"})
    assert (cpu.max_batch_size, cpu.queue_capacity, cpu.threads, cpu.capacity) == (16, 64, 112, 80)
    assert (cpu.engine_process, cpu.workers, cpu.http_worker) == ("off", 1, "gthread")
    gpu = WorkerConfig.from_env({"QAIO_DEVICE": "cuda:1"})
    assert (gpu.max_batch_size, gpu.queue_capacity, gpu.threads, gpu.capacity) == (256, 512, 800, 768)
    assert (gpu.engine_process, gpu.workers, gpu.http_worker) == ("on", 4, "gevent")
    split = WorkerConfig.from_env({"QAIO_DEVICE": "cpu", "QAIO_ENGINE_PROCESS": "on"})
    assert split.http_worker == "gevent"
    assert WorkerConfig.from_env({"QAIO_DEVICE": "cuda", "QAIO_HTTP_WORKER": "gthread"}).http_worker == "gthread"
    set_ = WorkerConfig.from_env({"QAIO_DEVICE": "cuda", "QAIO_MAX_BATCH_SIZE": "64", "QAIO_THREADS": "100"})
    assert (set_.max_batch_size, set_.queue_capacity, set_.threads) == (64, 128, 100)
