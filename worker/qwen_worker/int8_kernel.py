"""The project's own int8 kernel (native/: the matmul for decode's few rows, the one-pass dequantisation for
more): built once, tried, used.

It is compiled against this torch into QAIO_KERNEL_DIR under a name that changes with the source, torch's
version and the flags, so every worker reuses one build and a change rebuilds it; an image carries it
prebuilt and needs no compiler (worker/Dockerfile). An instruction set the CPU reports is used only
after a child process ran it and matched a float reference: a CPU or VM that reports an instruction set
and faults on it takes the child down, not the worker. Whatever is missing (a compiler, a writable
directory, an instruction set that passes) leaves QAIO_DTYPE=int8 on torch's kernels, and /readyz says why.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from .child_process import run_module

log = logging.getLogger(__name__)

NATIVE = Path(__file__).with_name("native")
FLAGS = ("-O3", "-fPIC", "-shared", "-std=c++20", "-fopenmp", "-fno-math-errno")
TRIAL_TIMEOUT_S = 120
BUILD_TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class Int8Kernel:
    isa: str  # avx512_vnni or avx2
    library: str

    def linear(self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x [M, K] (float32 or bfloat16) times (q [N, K] int8 * scale [N] float32)^T, in x's dtype."""
        return torch.ops.qaio.int8_linear(x, q, scale, self.isa)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """q [N, K] int8 * scale [N] float32 as bfloat16 (rounded to nearest even), in one pass."""
        return torch.ops.qaio.int8_dequantize(q, scale, self.isa)


def default_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qaio" / "kernels"


def library_path(directory: Path) -> Path:
    sources = b"".join(path.read_bytes() for path in sorted(NATIVE.iterdir()) if path.suffix in (".cpp", ".h"))
    digest = hashlib.sha1(sources + torch.__version__.encode() + " ".join(FLAGS).encode()).hexdigest()
    return directory / f"qaio_int8-{digest[:12]}.so"


def build(directory: str | Path = "") -> Path:
    """The library for this source and torch, compiled into directory (empty: default_dir()) unless it is
    there already."""
    directory = Path(directory) if directory else default_dir()
    target = library_path(directory)
    if target.exists():
        return target
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        raise RuntimeError("no C++ compiler (c++, or $CXX) to build it with")
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")  # concurrent builders each rename a whole file
    command = [compiler, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               *(f"-I{path}" for path in cpp_extension.include_paths()), *map(str, sorted(NATIVE.glob("*.cpp"))),
               "-o", str(partial),
               *(f"-L{path}" for path in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu", "-ltorch"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"{compiler} failed: {(done.stderr.strip().splitlines() or [''])[-1][:300]}")
    os.replace(partial, target)
    return target


def trial(library: Path, isa: str) -> str | None:
    """Why isa cannot serve (a crash, a wrong answer), from a child process that ran it; None if it can."""
    _, error = run_module(["qwen_worker.int8_kernel", "try", str(library), isa], TRIAL_TIMEOUT_S)
    return None if error is None else f"its trial {error}"


def check(isa: str) -> None:
    """Raise unless the loaded kernel's ops match float references on shapes with every kind of tail."""
    generator = torch.Generator().manual_seed(0)
    for rows, k, n in ((1, 896, 256), (3, 100, 37), (6, 4900, 9), (16, 64, 40)):
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
        scale = torch.rand(n, generator=generator) / 100
        x = torch.randn(rows, k, generator=generator)
        want = x.double() @ (q.double() * scale.double()[:, None]).T
        got = torch.ops.qaio.int8_linear(x, q, scale, isa).double()
        error = float((got - want).abs().max() / want.abs().max())
        if not error < 1e-3:
            raise AssertionError(f"{isa} at {rows}x{k}x{n}: relative error {error:.2e}")
        weight = torch.ops.qaio.int8_dequantize(q, scale, isa)
        if not torch.equal(weight, (q.float() * scale[:, None]).to(torch.bfloat16)):
            raise AssertionError(f"{isa}: the dequantised {n}x{k} weight differs from torch's rounding")


@functools.cache
def load(directory: str = "", tried: bool = True) -> tuple[Int8Kernel | None, str]:
    """The kernel for this process, or None and why not. `tried`: each ISA runs in a child before use
    (off only in a process that is itself such a trial, like QAIO_DTYPE=auto's probes)."""
    try:
        library = build(directory)
        torch.ops.load_library(str(library))
    except Exception as exc:  # no compiler, no writable directory, a build error: torch's kernels serve
        reason = f"not built: {exc}"
        log.warning("the int8 kernel is %s; int8 layers use torch's kernels", reason)
        return None, reason
    reasons = []
    for isa in torch.ops.qaio.int8_isas():
        failure = trial(library, isa) if tried else None
        if failure is None:
            log.info("int8 kernel: %s (%s)", isa, library)
            return Int8Kernel(isa, str(library)), isa
        reasons.append(f"{isa}: {failure}")
    reason = "no instruction set of its passed" + (f" ({'; '.join(reasons)})" if reasons else " (it needs AVX2)")
    log.warning("the int8 kernel is unused: %s; int8 layers use torch's kernels", reason)
    return None, reason


def serving(config) -> tuple[Int8Kernel | None, str]:
    """What runs QAIO_DTYPE=int8's few-row calls under the worker's QAIO_INT8_KERNEL, and why (/readyz)."""
    if config.int8_kernel == "torch":
        return None, "torch (QAIO_INT8_KERNEL=torch)"
    kernel, how = load(config.kernel_dir)
    return kernel, how if kernel else f"torch (the own kernel is {how})"


def probe_dir(config) -> str | None:
    """The directory whose build QAIO_DTYPE=auto's int8 probe times (built now; tried in a child only once
    int8 is chosen: the probe's own child goes down with a faulting one), or None: torch's kernels."""
    if config.int8_kernel == "torch":
        return None
    try:
        build(config.kernel_dir)
    except Exception:  # serving() says why, should int8 be chosen
        return None
    return config.kernel_dir


if __name__ == "__main__":
    if sys.argv[1:2] == ["try"]:
        torch.ops.load_library(sys.argv[2])
        check(sys.argv[3])
    elif sys.argv[1:2] == ["build"]:  # make install, the image: build and try it now, not at first start
        kernel, how = load(next((arg for arg in sys.argv[2:] if not arg.startswith("--")), ""))
        print(f"int8 kernel: {how}" + (f" ({kernel.library})" if kernel else ""))
        sys.exit(0 if kernel or "--optional" in sys.argv else 1)
    else:
        sys.exit("usage: python -m qwen_worker.int8_kernel build [DIR] [--optional] | try LIBRARY ISA")
