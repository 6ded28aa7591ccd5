"""The SLA verdict of a load level: each task's latency percentile against its objective, the error rate
and the availability, with the objectives the alerts use (QAIO_SLO_*, deploy/alerts/slo.py)."""
from __future__ import annotations

import os
import sys
from typing import Callable

from qaio_testing import REPO

sys.path.insert(0, str(REPO / "deploy" / "alerts"))
from slo import Objectives  # noqa: E402

TASKS = ("sentiment", "chat", "analyze")


def objectives() -> Objectives:
    return Objectives.from_env(os.environ)


def percentile(objectives: Objectives) -> str:
    """The SLA's latency percentile: 95 for a 95 % latency share (qaio.js's QAIO_SLA_PERCENTILE)."""
    return f"{objectives.latency_share * 100:g}"


def percentile_stat(objectives: Objectives) -> str:
    """k6's summary stat of the SLA's percentile: p(95)."""
    return f"p({percentile(objectives)})"


def measure(metrics: dict, objectives: Objectives) -> dict:
    """What the SLA looks at, from a k6 summary's metrics (qaio.js)."""
    stat = percentile_stat(objectives)
    latency = {task: metrics.get(f"http_req_duration{{task:{task}}}", {}).get("values", {}).get(stat)
               for task in TASKS}
    served = metrics.get("server_errors", {}).get("values", {})
    return {"latency_ms": {t: v for t, v in latency.items() if v is not None},
            "error_rate": metrics["http_req_failed"]["values"]["rate"],
            "availability": 1 - served["rate"] if served else None}


def checks(objectives: Objectives) -> list[tuple[str, Callable[[dict], bool], Callable[[dict], str]]]:
    """(objective, whether a measurement meets it, how a miss reads): the verdict's and the report's."""
    stat = percentile_stat(objectives)

    def latency(task: str):
        bound_ms = objectives.bound_of(task) * 1000
        return (f"{task} {stat}", lambda m: m["latency_ms"].get(task, 0) <= bound_ms,
                lambda m: f"{task} {stat} {m['latency_ms'][task]:.0f} ms > {bound_ms:.0f} ms")

    return [*(latency(task) for task in TASKS),
            ("errors", lambda m: m["error_rate"] < objectives.error_rate,
             lambda m: f"errors {m['error_rate']:.2%} >= {objectives.error_rate:.0%}"),
            ("availability", lambda m: m["availability"] is None or m["availability"] >= objectives.availability,
             lambda m: f"availability {m['availability']:.2%} < {objectives.availability:.1%}")]


def verdict(measured: dict, objectives: Objectives) -> dict:
    """Met, or which objectives were missed (each as a short phrase)."""
    missed = [miss(measured) for _, ok, miss in checks(objectives) if not ok(measured)]
    return {"met": not missed, "missed": missed}


def report_lines(levels: list[dict], objectives: Objectives) -> list[str]:
    """The report's SLA section: a row per level, and the highest load that met it."""
    stat = percentile_stat(objectives)
    head = " | ".join(f"{t} {stat} ms (≤ {objectives.bound_of(t) * 1000:.0f})" for t in TASKS)
    lines = ["## SLA verdict", "",
             f"Each level against the objectives (`QAIO_SLO_*`, the same as the alerts': docs/alerts.md): {stat} "
             f"latency per task, error rate below {objectives.error_rate:.0%} (any failed answer), availability "
             f"at least {objectives.availability:.1%} (answers that are not 5xx, 429s left out).", "",
             f"| users | {head} | errors (< {objectives.error_rate:.0%}) | availability | SLA |",
             "| --- |" + " --- |" * (len(TASKS) + 3)]
    for level in levels:
        sla = level["sla"]
        cells = [f"{sla['latency_ms'][t]:.0f}" if t in sla["latency_ms"] else "–" for t in TASKS]
        available = "–" if sla["availability"] is None else f"{sla['availability']:.2%}"
        outcome = "met" if sla["met"] else "missed: " + "; ".join(sla["missed"])
        lines.append(f"| {level['users']} | {' | '.join(cells)} | {sla['error_rate']:.2%} | {available} | {outcome} |")
    first_miss = next((i for i, level in enumerate(levels) if not level["sla"]["met"]), None)
    if first_miss is None:
        lines += ["", f"Every level met the SLA, up to {levels[-1]['users']} users."]
    elif first_miss == 0:
        lines += ["", f"The SLA was missed from the first level ({levels[0]['users']} users) on."]
    else:
        lines += ["", f"The SLA held up to {levels[first_miss - 1]['users']} users; at {levels[first_miss]['users']} "
                      "it was missed."]
    held = ", ".join(f"{name} {held_up_to(levels, ok)}" for name, ok, _ in checks(objectives))
    return lines + ["", f"By objective, the most users before its first miss: {held}.", ""]


def held_up_to(levels: list[dict], ok) -> str:
    users = None
    for level in levels:
        if not ok(level["sla"]):
            break
        users = level["users"]
    return "none" if users is None else f"{users}" + (" (every level)" if users == levels[-1]["users"] else "")
