"""What a failed model pass means: the request's fault, a transient one, or a device lost for good."""
from __future__ import annotations

import logging
import re

import torch

from ..engine.errors import RowFailed

log = logging.getLogger(__name__)


def is_oom(exc: BaseException) -> bool:
    """A CUDA out-of-memory error: torch's own, or one that a kernel library raises as a plain
    RuntimeError ("CUDA error: out of memory")."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# CUDA errors that are not an out-of-memory poison the context: every later call fails the same way.
_STICKY_DEVICE_ERROR = re.compile(
    r"CUDA error|device-side assert|illegal memory access|illegal instruction|misaligned address|"
    r"unspecified launch failure|CUBLAS_STATUS_(?!ALLOC_FAILED)|CUDNN_STATUS_EXECUTION_FAILED|"
    r"cudaErrorLaunch|uncorrectable ECC error")


def is_fatal_device_error(exc: BaseException) -> bool:
    """A device error that leaves the process unusable (CUDA's sticky errors), never an out-of-memory.
    torch raises these as torch.AcceleratorError (RuntimeError in older releases); the message decides."""
    return not is_oom(exc) and bool(_STICKY_DEVICE_ERROR.search(str(exc)))


def free_device_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


MESSAGES = {
    "device_error": "the model's device failed; this instance is restarting, retry on another",
    "out_of_memory": "the model ran out of device memory; retry with a smaller request",
    "model_error": "the model failed on this batch",
}


def failure_code(exc: BaseException) -> tuple[str, str]:
    """The error code and message a request failed by `exc` is answered with."""
    if isinstance(exc, RowFailed):
        return exc.code, str(exc)
    code = "device_error" if is_fatal_device_error(exc) else "out_of_memory" if is_oom(exc) else "model_error"
    return code, MESSAGES[code]


def count_failure(exc: BaseException, size: int, metrics, health, device: torch.device) -> bool:
    """Count a failed pass of `size` requests; True for a sticky device error, which leaves the CUDA
    context unusable for good: health is marked broken (/healthz fails) so that the instance is replaced."""
    if is_fatal_device_error(exc):
        log.critical("sticky device error in a batch of %d: the engine stops and this instance must be "
                     "restarted", size, exc_info=exc)
        metrics.model_failures.labels(reason="device_error").inc()
        health.mark_broken(f"device error: {type(exc).__name__}: {str(exc).strip()[:200]}")
        metrics.ready.set(0)
        return True
    if is_oom(exc):
        free_device_cache(device)
        reason = "out_of_memory"
    else:
        log.error("model failure in a batch of %d", size, exc_info=exc)
        reason = "model_error"
    metrics.model_failures.labels(reason=reason).inc()
    health.record_failure()
    return False
