"""Write the service-level objectives as Prometheus rules, one source for every deployment:

    python deploy/alerts/render.py            # deploy/alerts/qaio-rules.yml, k8s/monitoring/prometheus-rule.yaml,
                                              # and the alert table of docs/alerts.md
    python deploy/alerts/render.py --check    # exit 1 when a written file differs (CI keeps them so)

`make run`'s and compose's Prometheus load qaio-rules.yml; the Prometheus Operator loads the PrometheusRule.
The objectives are settings (QAIO_SLO_*, read here, validated once); the rules hold them as constants.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from slo import BURN_RUNBOOK, BURNS, Objectives, budget_rules, burn_alerts, burned, cause_alerts, sli_rules

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "alerts" / "qaio-rules.yml"
OPERATOR_RULE = REPO / "k8s" / "monitoring" / "prometheus-rule.yaml"
DOC = REPO / "docs" / "alerts.md"
DOC_BEGIN, DOC_END = "<!-- alerts: written by deploy/alerts/render.py -->", "<!-- alerts: end -->"
HEADER = "# Written by deploy/alerts/render.py from QAIO_SLO_* ({objectives}); edit the script, not this file.\n"


def groups(objectives: Objectives) -> list[dict]:
    return [
        {"name": "qaio-sli", "rules": sli_rules(objectives)},
        # Period-long windows are costly to evaluate: once a minute is plenty for a 30-day figure.
        {"name": "qaio-slo-budget", "interval": "1m", "rules": budget_rules(objectives)},
        {"name": "qaio-slo-alerts", "rules": burn_alerts(objectives)},
        {"name": "qaio-cause-alerts", "rules": cause_alerts()},
    ]


def dump(document) -> str:
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=120)


def rule_file(objectives: Objectives) -> str:
    return HEADER.format(objectives=objectives.describe()) + dump({"groups": groups(objectives)})


def operator_rule(objectives: Objectives) -> str:
    document = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "qaio-slo", "namespace": "qaio", "labels": {"app.kubernetes.io/part-of": "qwen-all-in-one"}},
        "spec": {"groups": groups(objectives)},
    }
    return HEADER.format(objectives=objectives.describe()) + dump(document)


def alert_table(objectives: Objectives) -> str:
    """Markdown: every alert with its severity, what it means and what to look at first."""
    lines = ["| Alert | Severity | Fires when | Look first at |", "|---|---|---|---|"]
    for name, _, _, what in burned(objectives):
        for severity in ("page", "ticket"):
            rates = " or ".join(f"{rate}x over {long} and {short}" for s, rate, long, short, _ in BURNS if s == severity)
            lines.append(f"| `{name}` | {severity} | {what} {rates} | {BURN_RUNBOOK[name]} |")
    for rule in cause_alerts():
        a = rule["annotations"]
        lines.append(f"| `{rule['alert']}` | {rule['labels']['severity']} | {a['summary']} | {a['runbook']} |")
    return "\n".join(lines).replace("{{ $labels.", "{").replace(" }}", "}") + "\n"


def document(objectives: Objectives, current: str) -> str:
    head, _, rest = current.partition(DOC_BEGIN)
    _, _, tail = rest.partition(DOC_END)
    return f"{head}{DOC_BEGIN}\n{alert_table(objectives)}{DOC_END}{tail}"


def outputs(objectives: Objectives) -> dict[Path, str]:
    return {RULES: rule_file(objectives), OPERATOR_RULE: operator_rule(objectives),
            DOC: document(objectives, DOC.read_text())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when a written file is not up to date")
    args = parser.parse_args(argv)
    try:
        objectives = Objectives.from_env(os.environ)
    except ValueError as exc:
        parser.error(str(exc))
    stale = []
    for path, text in outputs(objectives).items():
        if (path.read_text() if path.exists() else None) != text:
            stale.append(path.relative_to(REPO))
            if not args.check:
                path.write_text(text)
    if args.check and stale:
        print("not up to date (run python deploy/alerts/render.py): " + ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    print(f"objectives: {objectives.describe()}; " + ("up to date" if not stale else f"wrote {len(stale)} files"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
