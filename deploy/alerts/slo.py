"""The objectives (QAIO_SLO_*), the SLIs as recording rules, and the alerts: multi-window burn-rate pairs
per objective (the SRE workbook's method) and the causes that come before a breach."""
from __future__ import annotations

import dataclasses
from typing import Mapping

from prometheus_client.utils import floatToGoString

from qwen_worker.metrics import LATENCY_BUCKETS

WORKER = 'job=~".*qaio-worker.*"'  # make run and compose name the job so; the operator "<ns>/qaio-worker"
FRONT_DOOR = 'job=~".*qaio-nginx-log.*"'
SLI_WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
# (severity, burn rate, long window, short window, for): 2 % of a 30-day budget in 1 h, 5 % in 6 h
# page; 10 % in 1 d, 10 % in 3 d open a ticket. The short window ends the alert soon after the burn stops.
BURNS = (("page", 14.4, "1h", "5m", "2m"), ("page", 6, "6h", "30m", "15m"),
         ("ticket", 3, "1d", "2h", "1h"), ("ticket", 1, "3d", "6h", "3h"))
SENTIMENT_TASKS = ("sentiment",)
GENERATION_TASKS = ("chat", "analyze", "completion")


@dataclasses.dataclass(frozen=True)
class Objectives:
    availability: float = 0.999  # share of API answers that are not 5xx (429s left out)
    latency_share: float = 0.95  # share of successful answers within their task's bound
    sentiment_latency_s: float = 0.8
    chat_latency_s: float = 1.5  # chat, analyze, completions (a stream counts to its last byte)
    period: str = "30d"  # the error budget's window
    error_rate: float = 0.01  # any failed answer, 4xx included: make loadtest's SLA verdict (no alert)

    SETTINGS = {"availability": "QAIO_SLO_AVAILABILITY", "latency_share": "QAIO_SLO_LATENCY_SHARE",
                "sentiment_latency_s": "QAIO_SLO_SENTIMENT_LATENCY_S", "chat_latency_s": "QAIO_SLO_CHAT_LATENCY_S",
                "period": "QAIO_SLO_PERIOD", "error_rate": "QAIO_SLO_ERROR_RATE"}

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Objectives":
        values = {}
        for field, name in cls.SETTINGS.items():
            if env.get(name):
                values[field] = env[name] if field == "period" else float(env[name])
        objectives = cls(**values)
        objectives.validate()
        return objectives

    def validate(self) -> None:
        for name in ("availability", "latency_share"):
            if not 0.5 <= getattr(self, name) < 1:
                raise ValueError(f"{self.SETTINGS[name]} must be in [0.5, 1): {getattr(self, name)}")
        for name in ("sentiment_latency_s", "chat_latency_s"):
            if getattr(self, name) not in LATENCY_BUCKETS:  # an SLI counts the requests under a bucket's bound
                raise ValueError(f"{self.SETTINGS[name]} must be a bound of qaio_request_duration_seconds' "
                                 f"buckets {LATENCY_BUCKETS}: {getattr(self, name)}")
        if not 0 < self.error_rate < 0.5:
            raise ValueError(f"{self.SETTINGS['error_rate']} must be in (0, 0.5): {self.error_rate}")
        if not (self.period[:-1].isdigit() and self.period[-1] in "hdw"):
            raise ValueError(f"QAIO_SLO_PERIOD must be like 30d, 4w or 720h: {self.period}")

    def describe(self) -> str:
        return (f"availability {self.availability}, {self.latency_share:.0%} of sentiment within "
                f"{self.sentiment_latency_s} s and of chat within {self.chat_latency_s} s, over {self.period}")

    def bound_of(self, task: str) -> float:
        return next(bound for tasks, bound in self.bounds() if task in tasks)

    def bounds(self) -> tuple[tuple[tuple[str, ...], float], ...]:
        return (SENTIMENT_TASKS, self.sentiment_latency_s), (GENERATION_TASKS, self.chat_latency_s)


def error_ratio(window: str, fn: str = "rate") -> str:
    """Front-door 5xx among the answers that count (429s are the client's pacing, not an outage)."""
    return (f'(sum({fn}(qaio_nginx_requests_total{{{FRONT_DOOR},status=~"5.."}}[{window}])) or vector(0))'
            f' / sum({fn}(qaio_nginx_requests_total{{{FRONT_DOOR},status!="429"}}[{window}]))')


def good_latency_ratio(objectives: Objectives, window: str, fn: str = "rate") -> str:
    """Per task: the share of its 200 answers within its bound (worker-side: the front door has no tasks)."""
    parts = []
    for tasks, bound in objectives.bounds():
        selector = f'{WORKER},code="200",task=~"{"|".join(tasks)}"'
        parts.append(f'sum by (task) ({fn}(qaio_request_duration_seconds_bucket{{{selector},'
                     f'le="{floatToGoString(bound)}"}}[{window}])) / sum by (task) '
                     f'({fn}(qaio_request_duration_seconds_count{{{selector}}}[{window}]))')
    return " or ".join(f"({p})" for p in parts)


def sli_rules(objectives: Objectives) -> list[dict]:
    rules = []
    for w in SLI_WINDOWS:
        rules.append({"record": f"qaio:api_errors:ratio_rate{w}", "expr": error_ratio(w)})
        rules.append({"record": f"qaio:request_slow:ratio_rate{w}",
                      "expr": f"1 - ({good_latency_ratio(objectives, w)})"})
    rules.append({"record": "qaio:heap_in_use:bytes",
                  "expr": f'sum by (instance) (qaio_heap_bytes{{{WORKER},kind="in_use"}})'})
    return rules


def budget_rules(objectives: Objectives) -> list[dict]:
    """Compliance over the period and the share of its error budget left, per objective (and task)."""
    p = objectives.period
    return [
        {"record": "qaio:slo_compliance:ratio", "labels": {"slo": "availability", "period": p},
         "expr": f"1 - ({error_ratio(p, 'increase')})"},
        {"record": "qaio:slo_compliance:ratio", "labels": {"slo": "latency", "period": p},
         "expr": good_latency_ratio(objectives, p, "increase")},
        {"record": "qaio:slo_objective:ratio", "labels": {"slo": "availability", "period": p},
         "expr": f"vector({objectives.availability})"},
        {"record": "qaio:slo_objective:ratio", "labels": {"slo": "latency", "period": p},
         "expr": f"vector({objectives.latency_share})"},
        {"record": "qaio:slo_error_budget_remaining:ratio",
         "expr": f'(1 - (1 - qaio:slo_compliance:ratio{{slo="availability"}}) / {1 - objectives.availability:.6g})'
                 f' or (1 - (1 - qaio:slo_compliance:ratio{{slo="latency"}}) / {1 - objectives.latency_share:.6g})'},
    ]


def burned(objectives: Objectives) -> tuple[tuple[str, str, float, str], ...]:
    """(alert, SLI series, error budget, what burns it) per objective."""
    return (("QaioAvailabilityBudgetBurn", "qaio:api_errors", 1 - objectives.availability,
             f"5xx answers at the front door use the {objectives.availability:.1%} availability budget"),
            ("QaioLatencyBudgetBurn", "qaio:request_slow", 1 - objectives.latency_share,
             "slow {{ $labels.task }} answers use the latency budget"))


def burn_alerts(objectives: Objectives) -> list[dict]:
    alerts = []
    for severity, rate, long, short, wait in BURNS:
        for name, metric, budget, what in burned(objectives):
            threshold = f"{rate * budget:.6g}"
            alerts.append({
                "alert": name,
                "expr": f"{metric}:ratio_rate{long} > {threshold} and {metric}:ratio_rate{short} > {threshold}",
                "for": wait,
                "labels": {"severity": severity, "long_window": long, "short_window": short, "burn_rate": str(rate)},
                "annotations": {
                    "summary": f"{what} {rate}x too fast (over {long} and {short})",
                    "description": f"At this rate the {objectives.period} budget is gone in "
                                   f"{_days(objectives.period) / rate:.1f} days.",
                    "runbook": BURN_RUNBOOK[name],
                },
            })
    return alerts


def _days(period: str) -> float:
    return int(period[:-1]) * {"h": 1 / 24, "d": 1, "w": 7}[period[-1]]


BURN_RUNBOOK = {
    "QaioAvailabilityBudgetBurn": "the dashboard's front-door responses by status: 503s with every instance "
                                  "busy (add instances) or not ready (QaioInstance* alerts), 500s/502s (worker "
                                  "logs by X-Request-ID)",
    "QaioLatencyBudgetBurn": "the dashboard's p95 by task and queue by instance: a long queue needs instances "
                             "(QaioQueueSaturated); a short one with slow steps points at the device",
}


def _cause(name, severity, expr, wait, summary, runbook) -> dict:
    return {"alert": name, "expr": expr, "for": wait, "labels": {"severity": severity},
            "annotations": {"summary": summary, "runbook": runbook}}


def cause_alerts() -> list[dict]:
    return [
        _cause("QaioNoInstance", "page", f"absent(up{{{WORKER}}} == 1)", "1m",
               "no worker instance is being scraped up",
               "the workers' pods or processes (kubectl get pods -n qaio; make run's logs); the front door answers 502/503"),
        _cause("QaioInstanceDown", "ticket", f"up{{{WORKER}}} == 0", "1m",
               "{{ $labels.instance }} does not answer its metrics scrape",
               "the instance's process and its log; the others take its traffic meanwhile"),
        _cause("QaioInstanceNotReady", "ticket", f"min by (instance) (qaio_ready{{{WORKER}}}) == 0", "5m",
               "{{ $labels.instance }} is up but not ready (loading, cooling down after errors, or broken)",
               "its /readyz (state, load_error, broken) and its log"),
        _cause("QaioRejecting", "ticket",
               f'sum by (instance) (rate(qaio_rejections_total{{{WORKER},reason=~"queue_full|deadline_unreachable|deadline_on_arrival|'
               f'deadline_in_queue"}}[5m])) / sum by (instance) (rate(qaio_request_duration_seconds_count'
               f'{{{WORKER}}}[5m])) > 0.05', "10m",
               "{{ $labels.instance }} refuses or drops more than 5 % of its requests for lack of capacity",
               "the dashboard's rejections by reason and queue: more instances, or a lower QAIO_MAX_TOKENS"),
        _cause("QaioQueueSaturated", "ticket",
               f"sum by (instance) (qaio_queue_depth{{{WORKER}}}) > sum by (instance) (qaio_slots{{{WORKER}}})", "5m",
               "{{ $labels.instance }} has more requests waiting than it has KV slots",
               "requests per second against capacity (make loadtest's report); the autoscaler's replicas"),
        _cause("QaioDeviceError", "page",
               f'sum by (instance) (increase(qaio_model_failures_total{{{WORKER},reason="device_error"}}[10m])) > 0',
               "0m", "{{ $labels.instance }} had a sticky device error: it must be replaced",
               "the worker log's device_error line; the instance restarts itself (Kubernetes: its liveness probe)"),
        _cause("QaioOutOfMemory", "ticket",
               f'sum by (instance) (increase(qaio_model_failures_total{{{WORKER},reason="out_of_memory"}}[15m])) > 0',
               "0m", "{{ $labels.instance }} ran out of device memory in a batch",
               "QAIO_MAX_BATCH_SIZE, QAIO_MAX_TOKENS and QAIO_MAX_PROMPT_TOKENS against the GPU's memory"),
        _cause("QaioGpuMemoryNearFull", "ticket",
               f"max by (instance) (qaio_gpu_memory_used_bytes{{{WORKER}}} / qaio_gpu_memory_total_bytes{{{WORKER}}})"
               " > 0.95", "10m", "{{ $labels.instance }}'s GPU memory is over 95 % used",
               "another process on the GPU (nvidia-smi), or KV slots sized too close to the memory"),
        _cause("QaioHeapGrowing", "ticket", "deriv(qaio:heap_in_use:bytes[1h]) > 100 * 1024 * 1024 / 3600", "2h",
               "{{ $labels.instance }}'s C heap in use grows by more than 100 MiB an hour",
               "qaio_heap_bytes by pid (which process), then make soak's RSS curve on the same version"),
    ]
