"""Which model the local stack serves: the real one when it can be had, else the demo model, loudly."""
from qwen_worker.model_source import resolve


def test_an_explicit_model_is_used_as_given(tmp_path):
    assert resolve("/models/mine", tmp_path / "demo", "tiny") == "/models/mine"


def test_without_cache_or_hub_the_demo_model_is_built_and_announced(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine with no network
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    chosen = resolve(None, tmp_path / "demo", "tiny")
    assert chosen == str(tmp_path / "demo")
    assert (tmp_path / "demo" / "qaio_demo_model.json").is_file()
    assert "DEMO MODEL" in capsys.readouterr().err
