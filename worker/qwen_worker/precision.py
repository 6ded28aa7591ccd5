"""QAIO_DTYPE=auto on a CPU: the weights' precision this machine is fastest at, found by measuring it.

Each candidate (float32 on oneDNN, bfloat16, int8) runs a few decoder layers' worth of the model's
matrix shapes at 1, 16 and 128 rows (decode alone, decode with a batch, a prompt) in a child process
of its own, so that a CPU which reports an instruction set and faults on it (llama.cpp's AMX path
segfaulted on this project's Xeons) takes down the child, not the worker: that candidate is left
out. The highest geometric mean of the three speed-ups over float32 wins. All three candidates are
within a point of float32 on `make eval` (docs/cpu-precision.md), the bar for being a default.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

from .child_process import run_module

log = logging.getLogger(__name__)

CANDIDATES = ("float32", "bfloat16", "int8")
ROWS = (1, 16, 128)
LAYERS = 4  # enough weights (~240 MB in float32 for the 0.5B shape) that they are read from memory
PROBE_TIMEOUT_S = 120


def _layer_timings(dtype: str, hidden: int, intermediate: int, onednn: bool = True,
                   kernel_dir: str | None = None) -> dict[int, float]:
    """Milliseconds per pass of LAYERS layers' linears (q, o, gate, up, down) at each row count; int8
    on the own kernel built in kernel_dir where given (this child is its trial), else torch's."""
    import torch
    from torch import nn

    from .cpu_linear import PackedLinear, onednn_available
    from .int8_kernel import load
    from .int8_linear import Int8Linear

    kernel = load(kernel_dir, tried=False)[0] if dtype == "int8" and kernel_dir is not None else None

    torch.manual_seed(0)
    shapes = [(hidden, hidden), (hidden, hidden), (hidden, intermediate), (hidden, intermediate),
              (intermediate, hidden)]
    act = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    layers = []
    for _ in range(LAYERS * len(shapes)):
        n_in, n_out = shapes[len(layers) % len(shapes)]
        linear = nn.Linear(n_in, n_out, bias=False).requires_grad_(False)
        if dtype == "int8":
            layers.append(Int8Linear(linear, kernel))
        else:  # the model's own path: oneDNN with the weight prepacked, where torch has it
            linear = linear.to(torch.bfloat16) if dtype == "bfloat16" else linear
            layers.append(PackedLinear(linear) if onednn and onednn_available(linear.weight.dtype) else linear)
    out = {}
    with torch.inference_mode():
        for rows in ROWS:
            inputs = {n: torch.randn(rows, n, dtype=act) for n in (hidden, intermediate)}
            run = lambda: [layer(inputs[layer.in_features]) for layer in layers]  # noqa: E731
            run()
            best = math.inf
            for _ in range(3):
                started = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - started)
            out[rows] = best * 1e3
    return out


def measure(candidates=CANDIDATES, hidden: int = 896, intermediate: int = 4864, threads: int = 0,
            onednn: bool = True, kernel_dir: str | None = None) -> dict:
    """Each candidate's milliseconds per row count, or the reason it could not run, each in a child;
    float32 and bfloat16 on oneDNN's prepacked path unless `onednn` is off (QAIO_CPU_LINEAR=default),
    int8 on the own kernel built in kernel_dir where given."""
    results = {}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    for dtype in candidates:
        out, error = run_module([__name__, dtype, str(hidden), str(intermediate), "onednn" if onednn else "default",
                                 *([kernel_dir] if kernel_dir is not None else [])], PROBE_TIMEOUT_S, env)
        results[dtype] = {"error": error} if error else \
            {int(rows): ms for rows, ms in json.loads(out.splitlines()[-1]).items()}
    return results


def speedups(results: dict) -> dict[str, float]:
    """Each candidate that ran: the geometric mean over ROWS of float32's time over its own."""
    base = results.get("float32", {})
    if "error" in base:
        return {}
    return {dtype: math.exp(sum(math.log(base[r] / times[r]) for r in ROWS) / len(ROWS))
            for dtype, times in results.items() if "error" not in times}


def choose(hidden: int, intermediate: int, threads: int = 0, candidates=CANDIDATES,
           onednn: bool = True, kernel_dir: str | None = None) -> tuple[str, dict]:
    """The precision QAIO_DTYPE=auto serves on this CPU, and what was measured to choose it."""
    started = time.monotonic()
    results = measure(candidates, hidden, intermediate, threads, onednn, kernel_dir)
    ranked = speedups(results)
    chosen = max(ranked, key=ranked.get) if ranked else "float32"
    report = {"chosen": chosen, "seconds": round(time.monotonic() - started, 1),
              "speedup_over_float32": {d: round(s, 2) for d, s in ranked.items()},
              "ms": {d: r if "error" in r else {str(k): round(v, 2) for k, v in r.items()} for d, r in results.items()}}
    log.info("QAIO_DTYPE=auto chose %s", chosen, extra={"precision": report})
    return chosen, report


if __name__ == "__main__":
    name, hidden_size, intermediate_size, linear = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if name not in CANDIDATES:
        sys.exit(f"unknown precision {name!r}")
    own_kernel_dir = sys.argv[5] if len(sys.argv) > 5 else None
    print(json.dumps(_layer_timings(name, hidden_size, intermediate_size, linear == "onednn", own_kernel_dir)))
