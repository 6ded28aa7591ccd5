"""Calibrated sentiment confidence: the fit itself, a fit found beside a model and applied at serve time,
a fit of another prompt refused, the content-free correction, and every answer saying which applies."""
import json
import math
import random
import shutil

import pytest

from qwen_worker.calibration import FILE_NAME, Calibration, fit, prompt_fingerprint


def ece(scores, truth, bins=10):
    total = 0.0
    for b in range(bins):
        members = [i for i, s in enumerate(scores) if b / bins < max(s.values()) <= (b + 1) / bins]
        if members:
            confidence = sum(max(scores[i].values()) for i in members) / len(members)
            accuracy = sum(max(scores[i], key=scores[i].get) == truth[i] for i in members) / len(members)
            total += len(members) / len(scores) * abs(confidence - accuracy)
    return total


def synthetic(n, seed):
    """Scores of an over-confident classifier biased towards negative, with labels drawn from the truth."""
    rng = random.Random(seed)
    scores, truth = [], []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        signal = rng.gauss(1.0 if label == "positive" else -1.0, 1.5)
        z = {"positive": 3 * signal - 1.0, "negative": -3 * signal, "neutral": -2.0}
        top = max(z.values())
        e = {k: math.exp(v - top) for k, v in z.items()}
        scores.append({k: v / sum(e.values()) for k, v in e.items()})
        truth.append(label)
    return scores, truth


def test_a_fit_on_one_sample_lowers_the_calibration_error_on_another():
    fit_scores, fit_truth = synthetic(600, seed=1)
    params = fit(fit_scores, fit_truth)
    assert params["temperature"] > 1.5  # over-confident: softened
    scores, truth = synthetic(600, seed=2)
    calibrated = [Calibration("fitted", {"zh": params}).apply(s, "zh") for s in scores]
    assert ece(calibrated, truth) < ece(scores, truth) / 2
    assert all(sum(c.values()) == pytest.approx(1) for c in calibrated)
    assert Calibration("fitted", {"zh": params}).apply(scores[0], "en") == scores[0]  # no fit for English


@pytest.fixture()
def calibrated_model(tiny_model_dir, tmp_path):
    """The tiny model in a directory of its own, with a calibration beside it."""
    model = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, model)
    fitted = {"method": "fitted", "languages": {"zh": {"temperature": 2.0, "bias": [0.5, 0.0, -0.5]}},
              "info": {"prompt": prompt_fingerprint(), "fitted_on": "a test"}}
    (model / FILE_NAME).write_text(json.dumps(fitted))
    return model


def test_a_fit_beside_the_model_is_served_and_said(make_app, calibrated_model):
    client = make_app(model=str(calibrated_model)).test_client()
    answer = client.post("/v1/sentiment", json={"text": "很快，好吃"}).get_json()["sentiment"]
    assert answer["calibration"] == {"method": "fitted", "fitted_on": "a test", "source": str(calibrated_model / FILE_NAME),
                                     "applied": True}
    expected = Calibration("fitted", {"zh": {"temperature": 2.0, "bias": [0.5, 0.0, -0.5]}}).apply(
        answer["uncalibrated_scores"], "zh")
    assert answer["scores"] == pytest.approx(expected, abs=1e-5)
    assert answer["confidence"] == max(answer["scores"].values())
    english = client.post("/v1/sentiment", json={"text": "great food"}).get_json()["sentiment"]
    assert english["calibration"]["applied"] is False and english["scores"] == english["uncalibrated_scores"]
    assert client.get("/readyz").get_json()["sentiment_calibration"]["method"] == "fitted"
    assert client.get("/v1/models").get_json()["data"][0]["sentiment_calibration"]["languages"] == ["zh"]
    # QAIO_CALIBRATION=none serves the same model uncalibrated
    plain = make_app(model=str(calibrated_model), calibration="none").test_client()
    assert plain.post("/v1/sentiment", json={"text": "很快，好吃"}).get_json()["sentiment"]["calibration"]["method"] == "none"


def test_a_fit_of_another_prompt_is_not_applied_and_a_model_without_a_fit_says_so(make_app, calibrated_model, client):
    data = json.loads((calibrated_model / FILE_NAME).read_text())
    data["info"]["prompt"] = "another prompt"
    (calibrated_model / FILE_NAME).write_text(json.dumps(data))
    stale = make_app(model=str(calibrated_model)).test_client()
    assert stale.get("/readyz").get_json()["sentiment_calibration"]["method"] == "none"
    assert client.get("/v1/models").get_json()["data"][0]["sentiment_calibration"] == {"method": "none", "languages": []}


def test_the_content_free_correction_divides_by_the_scores_of_a_content_free_text(make_app):
    client = make_app(calibration="content_free").test_client()
    answer = client.post("/v1/sentiment", json={"text": "N/A", "lang": "zh"}).get_json()["sentiment"]
    assert answer["calibration"]["method"] == "content_free" and answer["calibration"]["applied"] is True
    # The content-free text itself comes out uniform: that is the correction's definition.
    assert answer["scores"] == pytest.approx({label: 1 / 3 for label in answer["scores"]}, abs=1e-4)
