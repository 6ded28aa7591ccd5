"""torch's inference mode, entered once per engine thread rather than per call.

Entering `torch.inference_mode()` costs a few microseconds of Python (a context object, its enter and
exit), and a step went through it several times (picking its tokens, each pass of the runner): at the
thousands of steps a second a fast device allows, a measurable share of the engine thread. The engine
loop runs inside the mode (`thread_mode`); `inference` methods enter it only when their caller is not
already in it, as tests and tools calling the engine directly are not. Tensors made inside the mode can
be changed in place only inside it: methods that make or change the engine's own state are `inference`.
"""
from __future__ import annotations

import functools

import torch


def inference(method):
    """The method runs in inference mode, entered for it only when its thread is not already in it."""
    @functools.wraps(method)
    def in_mode(*args, **kwargs):
        if torch.is_inference_mode_enabled():
            return method(*args, **kwargs)
        with torch.inference_mode():
            return method(*args, **kwargs)
    return in_mode


def thread_mode():
    """The context an engine thread serves in."""
    return torch.inference_mode()
