"""The inference engine: request state, scheduler, KV slots, model runner and the step loop.

Every tensor shape on the device is one of a few fixed shapes (batch and length buckets), so on a
GPU each decode step replays a CUDA graph captured at start-up instead of launching ~500 kernels.
"""
from .sequence import GenerationRow

__all__ = ["GenerationRow"]
