"""The C heap of a worker process (glibc malloc): what it holds, for /metrics, and handing free pages back.

torch's CPU tensors come from malloc. Under varying shapes and many threads, freed blocks stay inside
malloc's arenas as free space: the process's resident memory grows while what is in use does not.
`in_use` vs `free` tells that apart from a leak (in use grows) at any moment, in production.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time
from typing import Callable

from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc (musl, macOS), or a glibc before 2.33
        return None


_LIBC = _glibc()


def heap() -> dict[str, int] | None:
    """Bytes of the C heap over all arenas: in use, free inside the arenas, and mmapped blocks."""
    if _LIBC is None:
        return None
    info = _LIBC.mallinfo2()
    return {"in_use": info.uordblks, "free": info.fordblks, "mmapped": info.hblkhd}


def trim() -> None:
    """Give the free pages inside every arena back to the system (madvise), not only the heap's top."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class HeapTrimmer:
    """Trims the heap every `interval_s` from a thread of its own: RSS then follows what is in use."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s

    def start(self) -> None:
        if self.interval_s > 0 and _LIBC is not None:
            threading.Thread(target=self._run, name="heap-trim", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(self.interval_s)
            started = time.monotonic()
            trim()
            log.debug("heap trimmed in %.1f ms", (time.monotonic() - started) * 1000)


class HeapCollector:
    """qaio_heap_bytes{kind,pid} of the process that answers the scrape, read at scrape time, and of
    the processes `others` reports (the engine process, as its last status said)."""

    def __init__(self, others: Callable[[], dict[int, dict[str, int]]] | None = None):
        self.others = others or (lambda: {})

    def collect(self):
        heaps = {os.getpid(): heap(), **self.others()}
        family = GaugeMetricFamily("qaio_heap_bytes", "C heap (glibc malloc) of a worker process: in_use, free "
                                   "inside the arenas, mmapped", labels=["kind", "pid"])
        for pid, sizes in heaps.items():
            for kind, value in (sizes or {}).items():
                family.add_metric([kind, str(pid)], value)
        yield family
