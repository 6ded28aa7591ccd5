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
    ({"QAIO_MAX_BATCH_SIZE": "0"}, "QAIO_MAX_BATCH_SIZE must be >= 1"),
    ({"QAIO_DTYPE": "int4"}, "QAIO_DTYPE must be one of"),
    ({"QAIO_DEVICE": "tpu"}, "QAIO_DEVICE"),
    ({"QAIO_WARMUP": "maybe"}, "QAIO_WARMUP"),
    ({"QAIO_GENERATION": "dynamic"}, "QAIO_GENERATION must be one of"),
    ({"QAIO_GENERATION": "continuous", "QAIO_CONTINUOUS_CACHE_TOKENS": "4096"}, "must hold one longest request"),
    ({"QAIO_DEFAULT_MAX_TOKENS": "2000"}, "QAIO_DEFAULT_MAX_TOKENS must not exceed"),
    ({"QAIO_DEFAULT_TOP_P": "1.5"}, "QAIO_DEFAULT_TOP_P"),
])
def test_invalid_settings_fail_at_start(env, fragment):
    with pytest.raises(ConfigError, match=fragment):
        WorkerConfig.from_env(env)


def test_unknown_override_is_an_error():
    with pytest.raises(ConfigError, match="unknown"):
        WorkerConfig.from_env({}, modle="x")


def test_local_directory_model_is_named_after_its_folder(tmp_path):
    (tmp_path / "my-model").mkdir()
    assert WorkerConfig.from_env({"QAIO_MODEL": str(tmp_path / "my-model")}).model_name == "my-model"


def test_readme_documents_every_setting():
    readme = (__import__("pathlib").Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    missing = [name for name, _, _ in describe_settings() if f"`{name}`" not in readme]
    assert not missing, f"README's configuration table lacks {missing}"
