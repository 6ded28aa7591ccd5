"""make soak's verdict (loadtest/soak.py): memory past its limit, an error or no answer at all fails it."""
from loadtest.soak import verdict


def results(growth_mb=(3.0, 5.0), answers=None, limit=50.0):
    return {"max_growth_mb": limit, "answers": {"sentiment 200": 40, "chat 200": 9} if answers is None else answers,
            "growth": {f"worker-{i}": {"growth_mb": g} for i, g in enumerate(growth_mb)}}


def test_a_soak_within_its_memory_limit_with_every_answer_200_passes():
    assert verdict(results()) == []
    assert verdict(results(growth_mb=(50.0, -20.0))) == []  # at the limit, and shrinking


def test_a_worker_growing_past_the_limit_fails_the_soak_by_name():
    assert verdict(results(growth_mb=(3.0, 50.1))) == ["worker-1 grew +50.1 MB after the warm-up (limit 50.0 MB)"]


def test_an_error_answer_or_no_answer_fails_the_soak():
    assert verdict(results(answers={"sentiment 200": 40, "chat 503": 2})) == ["2 answers chat 503"]
    assert verdict(results(answers={})) == ["no answers"]
