"""The engine's host: model, health and engine loop of one instance, started and stopped together.

The in-process client runs one in the API process; the engine process runs one and serves it over a
socket. Either way it answers Requests with Outputs (to `sink`) and Controls with a Status.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Callable

from ..health import Health
from ..memory import HeapTrimmer
from ..metrics import WorkerMetrics
from ..model import ModelService
from ..model.null import NullModelService
from ..protocol import Control, ModelInfo, Request, Status
from .loop import EngineLoop, Sink

log = logging.getLogger(__name__)


class EngineHost:
    def __init__(self, config, metrics: WorkerMetrics, sink: Sink, model: ModelService | None = None,
                 exit_process: Callable[[], None] | None = None):
        self.config = config
        self.metrics = metrics
        self.model = model or (NullModelService if config.null_model else ModelService)(config)
        self.health = Health(config.failure_threshold, config.failure_cooldown_s)
        self.loop = EngineLoop(self.model, config, metrics, self.health, sink)
        self.loop.on_device_error = self._after_device_error
        # How the process ends itself after a sticky device error, so that its supervisor starts one
        # with a fresh device context (None: it stays, broken, and its liveness probe fails).
        self.exit_process = exit_process
        self.loaded = threading.Event()
        self.heap: dict[str, int] | None = None  # this process's C heap as last read (engine process)

    def start(self) -> None:
        """Load the model in the background, then serve on that same thread; the status says loading meanwhile."""
        threading.Thread(target=self._load_and_serve, name="model-loader", daemon=True).start()

    def _load_and_serve(self) -> None:
        if self._load():
            self.loop.run_here()

    def _load(self) -> bool:
        model = self.model
        try:
            model.load()
            engine = model.engine
            engine.observe_step = self.metrics.observe_step
            self.metrics.slots.set(engine.runner.slots)
            self.metrics.cuda_graphs.set(len(engine.runner.graphs))
            if self.config.warmup:
                model.warmup()
            info = model.describe()
            self.metrics.set_model_info(info, self.config.instance_id)
            HeapTrimmer(self.config.heap_trim_s).start()
            self.health.mark_ready()
            self.metrics.ready.set(1)
            log.info("model ready", extra={**info, "parameters": model.parameter_count,
                                           "load_seconds": round(model.load_seconds, 2)})
            self._warn_if_not_the_model()
            return True
        except Exception as exc:
            log.exception("model load failed")
            self.health.mark_failed(f"{type(exc).__name__}: {exc}")
            return False
        finally:
            self.loaded.set()

    def _warn_if_not_the_model(self) -> None:
        model = self.model
        if model.is_null:
            log.warning("NULL MODEL: no model is served; every answer is a fixed cycle of tokens and scores, "
                        "for measuring the host path (QAIO_NULL_MODEL)")
        elif model.is_demo:
            log.warning("DEMO MODEL: %s serves RANDOM WEIGHTS; its answers are meaningless",
                        model.served_source, extra={"demo_model": model.demo_info})
        elif model.is_stand_in:
            info = model.stand_in_info
            log.warning("STAND-IN MODEL: serving %s from %s, NOT %s (%s)", info["name"], model.served_source,
                        info["stands_in_for"], info["note"], extra={"stand_in_model": info})

    def _after_device_error(self) -> None:
        """The loop stopped on a sticky device error and answered what it held: end this process after
        QAIO_DEVICE_ERROR_EXIT_S."""
        delay = self.config.device_error_exit_s
        if delay > 0 and self.exit_process is not None:
            log.critical("exiting in %.1f s after a sticky device error", delay)
            timer = threading.Timer(delay, self.exit_process)
            timer.daemon = True
            timer.start()

    def stop(self) -> None:
        self.loop.stop()

    # ---- the contract -------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        self.loop.submit(request)

    def cancel(self, request_id: int, reason: str) -> None:
        self.loop.cancel(request_id, reason)

    def control(self, control: Control) -> Status:
        if control.op in ("drain", "undrain"):
            self._set_draining(control.op == "drain")
        elif control.op != "status":
            raise ValueError(f"unknown control {control.op!r}")
        return self.status(reply_to=control.id)

    def _set_draining(self, draining: bool) -> None:
        """Drain: refuse new requests (503 draining, nginx retries them elsewhere), finish the ones held."""
        self.health.set_draining(draining)
        self.metrics.draining.set(1 if draining else 0)
        if self.health.state == "ready":
            self.metrics.ready.set(1 if self.health.ready() else 0)

    def status(self, reply_to: int = 0) -> Status:
        health, model = self.health, self.model
        accepting = health.state == "ready"
        info = ModelInfo(model.name, model.served_source, model.identity, model.describe(), model.demo_info,
                         model.stand_in_info, model.fallback_reason,
                         calibration.as_dict() if (calibration := getattr(model, "calibration", None)) else None)
        return Status(health.reason(), accepting=accepting, ready=health.ready(), draining=health.draining,
                      broken=health.broken, load_error=health.load_error, queue_depth=self.loop.waiting(),
                      busy=self.loop.busy(), model=info, pid=os.getpid(), heap=self.heap, reply_to=reply_to,
                      kv=model.engine.kv_stats() if getattr(model, "engine", None) is not None else None)
