"""The /metrics endpoint, and HTTP metrics of every other route (prometheus-flask-exporter)."""
from __future__ import annotations

import logging

from flask import Flask, Response, request
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.exposition import choose_encoder
from prometheus_flask_exporter import PrometheusMetrics

from ..memory import HeapCollector
from ..metrics import GpuCollector, WorkerMetrics, multiprocess_mode

log = logging.getLogger(__name__)


def install(app: Flask, metrics: WorkerMetrics, gpu_index: int | None, other_heaps=None) -> None:
    """HTTP metrics on every route but /metrics itself, and the /metrics endpoint; `other_heaps`: the
    C heaps of other processes of this instance (the engine process), by pid."""
    exporter = PrometheusMetrics(app, registry=metrics.registry, path=None, defaults_prefix="flask",
                                 group_by="endpoint", excluded_paths=["^/metrics$", "^/healthz$", "^/readyz$"])
    heap = HeapCollector(other_heaps)
    metrics.registry.register(heap)
    gpu = None
    if gpu_index is not None:
        try:
            gpu = GpuCollector(gpu_index)
            metrics.registry.register(gpu)
        except Exception:  # NVML missing in the container: the model still serves
            log.warning("GPU metrics unavailable (NVML could not be initialised)", exc_info=True)

    @app.get("/metrics")
    @exporter.do_not_track()
    def prometheus_metrics():
        registry = metrics.registry
        if multiprocess_mode():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            registry.register(heap)
            if gpu is not None:
                registry.register(gpu)
        encode, content_type = choose_encoder(request.headers.get("Accept"))
        return Response(encode(registry), content_type=content_type)
