"""Prometheus metrics of a worker: requests, the engine loop, the model, the GPU (served by api/metrics.py).

With several gunicorn processes, gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR before the
processes start; prometheus_client then keeps values in shared files and /metrics sums them.
"""
from __future__ import annotations

import logging
import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

# 0.8 and 1.5 are the latency objectives' defaults (QAIO_SLO_*): an SLI counts requests under a bucket's bound.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.8, 1, 1.5, 2.5, 5, 10, 20, 30, 60, 120)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
REJECTION_REASONS = ("queue_full", "deadline_unreachable", "not_ready", "draining", "deadline_on_arrival", "deadline_in_queue", "client_gone",
                     "prompt_too_long", "invalid_token_id")
FAILURE_REASONS = ("out_of_memory", "model_error", "device_error")
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.25, 0.5, 1, 2)


def multiprocess_mode() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self._children: dict = {}  # (metric, label values) -> its child: labels() per request costs a lock
        r = self.registry
        self.queue_wait = Histogram("qaio_queue_wait_seconds", "Time a request waited for the model",
                                    ["task"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute = Histogram("qaio_compute_seconds", "Model time of the batch that served a request",
                                 ["task"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("qaio_batch_size", "Requests per model batch", ["kind"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("qaio_queue_depth", "Requests waiting for the model", registry=r,
                                 multiprocess_mode="livesum")
        self.generated_tokens = Counter("qaio_generated_tokens_total", "Tokens generated", ["task"], registry=r)
        self.prompt_tokens = Counter("qaio_prompt_tokens_total", "Prompt tokens processed", ["task"], registry=r)
        self.rejections = Counter("qaio_rejections_total", "Requests refused or dropped, by reason", ["reason"],
                                  registry=r)
        for reason in REJECTION_REASONS:  # at 0 from the start, so increase() sees a reason's first one too
            self.rejections.labels(reason=reason)
        self.model_failures = Counter("qaio_model_failures_total", "Model batches that failed", ["reason"],
                                      registry=r)
        for reason in FAILURE_REASONS:
            self.model_failures.labels(reason=reason)
        self.decode_step = Histogram("qaio_decode_step_seconds", "Time of one engine decode step (all live rows)",
                                     ["path"], buckets=STEP_BUCKETS, registry=r)
        self.live_slots = Gauge("qaio_live_slots", "KV slots held by generating requests", registry=r,
                                multiprocess_mode="livesum")
        self.slots = Gauge("qaio_slots", "KV slots of this worker (the most requests generating at once)",
                           registry=r, multiprocess_mode="livesum")
        # What routers read per instance (the Gateway API inference extension's KV-cache-utilisation metric).
        self.slot_utilization = Gauge("qaio_kv_slot_utilization", "Share of KV slots held by generating requests "
                                      "(0-1)", registry=r, multiprocess_mode="livemax")
        self.time_to_first_token = Histogram(
            "qaio_time_to_first_token_seconds", "From a generation's arrival at the worker to its first token",
            ["task", "stream"], buckets=LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "qaio_time_per_output_token_seconds", "Mean gap between a generation's tokens after the first",
            ["task", "stream"], buckets=TOKEN_GAP_BUCKETS, registry=r)
        self.kv_blocks = Gauge("qaio_kv_blocks", "KV pool blocks by state: used (held by rows), cached (prefix "
                               "cache, no row holds them, evicted when needed), free", ["state"], registry=r,
                               multiprocess_mode="livesum")
        self.kv_bytes_in_use = Gauge("qaio_kv_bytes_in_use", "Bytes of the KV blocks rows hold", registry=r,
                                     multiprocess_mode="livesum")
        self.prefix_tokens = Counter("qaio_prefix_cache_tokens_total", "Prompt tokens of generations: `queried` all, "
                                     "`hit` those whose keys came from the prefix cache", ["kind"], registry=r)
        self.kv_events = Counter("qaio_kv_events_total", "KV pool events: `preemption` (a row gave its blocks back "
                                 "to be recomputed later), `eviction` (a cached block was reused)", ["event"],
                                 registry=r)
        self._kv_totals: dict[str, int] = {}
        self._kv_states = {state: self.kv_blocks.labels(state=state) for state in ("used", "cached", "free")}
        self._kv_counters = {"prefix_hit_tokens": self.prefix_tokens.labels(kind="hit"),
                             "prefix_query_tokens": self.prefix_tokens.labels(kind="queried"),
                             "preemptions": self.kv_events.labels(event="preemption"),
                             "evictions": self.kv_events.labels(event="eviction")}
        self._pass_values: dict[int, float] = {}  # the engine loop's gauges as last written, by id
        self.cuda_graphs = Gauge("qaio_cuda_graphs", "Decode CUDA graphs captured at start-up", registry=r,
                                 multiprocess_mode="livemax")
        # One series per live process (pid label) when gunicorn runs several: each loads its own model.
        self.ready = Gauge("qaio_ready", "1 when this worker process is ready", registry=r,
                           multiprocess_mode="liveall")
        self.draining = Gauge("qaio_draining", "1 while an operator has this instance draining", registry=r,
                              multiprocess_mode="livemax")
        self.in_flight = Gauge("qaio_requests_in_flight", "API requests being answered (streams until their end)",
                               registry=r, multiprocess_mode="livesum")
        self.request_duration = Histogram("qaio_request_duration_seconds",
                                          "API requests from arrival to the last byte (streams included), by task "
                                          "and status", ["task", "code"], buckets=LATENCY_BUCKETS, registry=r)
        self.key_requests = Counter("qaio_key_requests_total", "API requests answered, by API key name (with "
                                    "QAIO_API_KEYS_FILE at the front door)", ["key"], registry=r)
        self.key_tokens = Counter("qaio_key_tokens_total", "Tokens by API key name: `prompt` (taken up by the "
                                  "engine) and `completion` (generated)", ["key", "kind"], registry=r)
        self.model_info = Gauge("qaio_model_info", "The model this worker serves",
                                ["model", "instance", "device", "dtype", "demo_model"], registry=r,
                                multiprocess_mode="livemax")

    def labelled(self, metric, *values: str):
        """metric.labels(*values) (in its label names' order), looked up once per set of values."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason=reason).inc()

    def observe_done(self, task: str, queue_s: float, compute_s: float, prompt_tokens: int,
                     generated_tokens: int = 0) -> None:
        """One request the engine completed: its wait, the model time that served it, its tokens."""
        self.labelled(self.queue_wait, task).observe(queue_s)
        self.labelled(self.compute, task).observe(compute_s)
        self.labelled(self.prompt_tokens, task).inc(prompt_tokens)
        if generated_tokens:
            self.labelled(self.generated_tokens, task).inc(generated_tokens)

    def observe_generation(self, task: str, stream: bool, arrived: float, handle) -> None:
        """A generation that completed (a RequestHandle): its time to first token and between tokens."""
        if handle.first_token_at is None:
            return
        labels = (task, "true" if stream else "false")
        self.labelled(self.time_to_first_token, *labels).observe(max(handle.first_token_at - arrived, 0.0))
        if len(handle.tokens) > 1 and handle.finished_at is not None:
            gap = (handle.finished_at - handle.first_token_at) / (len(handle.tokens) - 1)
            self.labelled(self.time_per_output_token, *labels).observe(max(gap, 0.0))

    def observe_step(self, seconds: float, rows: int, path: str) -> None:
        """One decode step: `path` is `graph` (a CUDA graph replayed) or `eager` (no graph for its shape)."""
        self.decode_step.labels(path=path).observe(seconds)

    def observe_pass(self, live: int, slots: int, kv: dict[str, int]) -> None:
        """The engine loop's gauges after a pass: live slots, their share and the KV pool (Engine.kv_stats(),
        running totals added as deltas). A gauge is written only when its value changed: a write takes a
        lock (and, with several processes, writes a shared file), and a busy loop makes thousands of passes
        a second."""
        used, cached = kv["blocks_used"], kv["blocks_cached"]
        for gauge, value in ((self.live_slots, live), (self.slot_utilization, live / max(slots, 1)),
                             (self._kv_states["used"], used), (self._kv_states["cached"], cached),
                             (self._kv_states["free"], kv["blocks_total"] - used - cached),
                             (self.kv_bytes_in_use, used * kv["block_bytes"])):
            if self._pass_values.get(id(gauge)) != value:
                gauge.set(value)
                self._pass_values[id(gauge)] = value
        for key, counter in self._kv_counters.items():
            delta = kv[key] - self._kv_totals.get(key, 0)
            if delta:
                counter.inc(delta)
                self._kv_totals[key] = kv[key]

    def set_model_info(self, info: dict, instance: str) -> None:
        self.model_info.labels(model=info["model"], instance=instance, device=info["device"],
                               dtype=info["dtype"], demo_model=str(info["demo_model"]).lower()).set(1)


class GpuCollector:
    """GPU utilisation and memory of this worker's device, read from NVML at scrape time."""

    def __init__(self, device_index: int):
        import pynvml  # from nvidia-ml-py; only imported when a GPU is in use

        pynvml.nvmlInit()
        self.nvml = pynvml
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        physical = int(ids[device_index]) if ids and ids[device_index].isdigit() else device_index
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(physical)
        self.label = str(physical)

    def collect(self):
        util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle)
        mem = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
        for name, doc, value in (
            ("qaio_gpu_utilization_percent", "GPU utilisation (NVML)", util.gpu),
            ("qaio_gpu_memory_used_bytes", "GPU memory in use (NVML)", mem.used),
            ("qaio_gpu_memory_total_bytes", "GPU memory in all (NVML)", mem.total),
        ):
            family = GaugeMetricFamily(name, doc, labels=["gpu"])
            family.add_metric([self.label], value)
            yield family
