"""Which model the local stack serves: the real one, else the stand-in, else the demo model; loudly."""
from pathlib import Path

from qaio_models.source import resolve


def test_an_explicit_model_is_used_as_given(tmp_path):
    assert resolve("/models/mine", tmp_path / "demo", "tiny") == "/models/mine"


def test_without_cache_or_hub_the_demo_model_is_built_and_announced(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine with no network
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    chosen = resolve(None, tmp_path / "demo", "tiny")
    assert chosen == str(tmp_path / "demo")
    assert (tmp_path / "demo" / "qaio_demo_model.json").is_file()
    assert "DEMO MODEL" in capsys.readouterr().err


def test_without_cache_or_hub_the_stand_in_is_served_before_the_demo(stand_in_model_dir, tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    chosen = resolve(None, tmp_path / "demo", "tiny", stand_in_dir=Path(stand_in_model_dir))
    assert chosen == stand_in_model_dir
    assert not (tmp_path / "demo").exists(), "the random demo model is only the last resort"
    err = capsys.readouterr().err
    assert "STAND-IN MODEL" in err and "NOT Qwen" in err


def test_when_the_stand_in_cannot_be_built_the_demo_model_still_serves(tmp_path, monkeypatch, capsys):
    from qaio_models import stand_in as stand_in_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))

    def no_pypi(out):
        raise OSError("no PyPI here")

    monkeypatch.setattr(stand_in_model, "build", no_pypi)
    chosen = resolve(None, tmp_path / "demo", "tiny", stand_in_dir=tmp_path / "stand-in")
    assert chosen == str(tmp_path / "demo")
    err = capsys.readouterr().err
    assert "could not be built either" in err and "DEMO MODEL" in err
