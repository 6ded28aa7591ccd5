"""The engine's own Triton kernels for the decode step: attention over the KV cache through a table of
token locations, RoPE fused with the K/V write, add + RMSNorm, SiLU x mul.

On a machine without a GPU they run in Triton's interpreter, which is how `make test` checks each one
against the torch path (conftest.py sets TRITON_INTERPRET=1; it must be set before anything imports
Triton, and torch._dynamo does). That is for tests only: the interpreter is far too slow to serve.
"""
from __future__ import annotations
