"""The SLA verdict of a load level, from a k6 summary's metrics, against the alerts' objectives."""
import pytest

from loadtest import sla
from slo import Objectives


def summary(sentiment_ms=300.0, chat_ms=900.0, failed=0.0, server_errors=0.0):
    return {"http_req_duration{task:sentiment}": {"values": {"p(95)": sentiment_ms}},
            "http_req_duration{task:chat}": {"values": {"p(95)": chat_ms}},
            "http_req_failed": {"values": {"rate": failed}},
            "server_errors": {"values": {"rate": server_errors}}}


def judged(metrics, objectives=Objectives()):
    return sla.verdict(sla.measure(metrics, objectives), objectives)


def test_a_level_within_every_objective_meets_the_sla():
    measured = sla.measure(summary(), Objectives())
    assert measured == {"latency_ms": {"sentiment": 300.0, "chat": 900.0}, "error_rate": 0.0, "availability": 1.0}
    assert judged(summary()) == {"met": True, "missed": []}


@pytest.mark.parametrize("metrics, missed", [
    (summary(sentiment_ms=801), "sentiment p(95) 801 ms > 800 ms"),
    (summary(chat_ms=1600), "chat p(95) 1600 ms > 1500 ms"),
    (summary(failed=0.02), "errors 2.00% >= 1%"),
    (summary(failed=0.002, server_errors=0.002), "availability 99.80% < 99.9%"),
])
def test_each_objective_missed_is_named(metrics, missed):
    assert judged(metrics) == {"met": False, "missed": [missed]}


def test_the_percentile_follows_the_latency_share():
    objectives = Objectives(latency_share=0.99)
    metrics = summary()
    metrics["http_req_duration{task:sentiment}"]["values"]["p(99)"] = 900.0
    assert sla.percentile_stat(objectives) == "p(99)"
    assert judged(metrics, objectives)["missed"] == ["sentiment p(99) 900 ms > 800 ms"]


def test_the_report_says_where_the_sla_stops_holding():
    objectives = Objectives()
    levels = [{"users": users, "sla": sla.measure(m, objectives) | judged(m)}
              for users, m in ((2, summary()), (8, summary()), (16, summary(sentiment_ms=2000)))]
    text = "\n".join(sla.report_lines(levels, objectives))
    assert "| 16 | 2000 | 900 | – | 0.00% | 100.00% | missed: sentiment p(95) 2000 ms > 800 ms |" in text
    assert "The SLA held up to 8 users; at 16 it was missed." in text
    assert ("By objective, the most users before its first miss: sentiment p(95) 8, chat p(95) 16 (every level), "
            "analyze p(95) 16 (every level), errors 16 (every level), availability 16 (every level).") in text
    assert "missed from the first level" in "\n".join(sla.report_lines(levels[2:], objectives))
