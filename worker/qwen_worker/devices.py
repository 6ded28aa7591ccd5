"""Whether this process will run on a GPU, decided without initialising CUDA.

gunicorn's master reads the configuration before it forks the worker; CUDA initialised before a
fork is unusable in the child, so the master asks NVML (which does not initialise CUDA) instead.
"""
from __future__ import annotations

import os


def cuda_expected(device_setting: str) -> bool:
    if device_setting.startswith("cuda"):
        return True
    if device_setting != "auto":
        return False
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount() > 0
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no NVML library: no GPU to use
        return False
