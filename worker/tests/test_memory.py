"""The C heap as /metrics reports it, and trimming it."""
import ctypes

import pytest
import torch

from qwen_worker import memory
from qwen_worker.engine.kv_cache import zeroed

pytestmark = pytest.mark.skipif(memory.heap() is None, reason="not glibc malloc")


def test_heap_counts_what_is_allocated_and_freed():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = memory.heap()
    blocks = [libc.malloc(64 * 1024 - 64) for _ in range(160)]  # 10 MB in blocks under the mmap threshold
    grown = memory.heap()
    assert grown["in_use"] - before["in_use"] >= 9 * 2**20
    for block in blocks:
        libc.free(block)
    freed = memory.heap()
    assert freed["in_use"] - before["in_use"] < 2**20


def rss_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * 4096


def test_trim_hands_free_pages_inside_the_heap_back():
    """Freed blocks below a block still in use cannot leave by shrinking the heap; trim() returns them."""
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    size = 64 * 1024 - 64
    blocks = [libc.malloc(size) for _ in range(1600)]  # 100 MB, touched so it is resident
    for block in blocks:
        libc.memset(block, 1, size)
    keeper = libc.malloc(size)  # above them: the heap's top stays in use
    for block in blocks:
        libc.free(block)
    before = rss_bytes()
    memory.trim()
    assert before - rss_bytes() > 50 * 2**20
    libc.free(keeper)


def test_the_collector_reports_each_kind_for_this_process():
    import os

    [family] = list(memory.HeapCollector().collect())
    assert family.name == "qaio_heap_bytes"
    kinds = {s.labels["kind"]: s.value for s in family.samples if s.labels["pid"] == str(os.getpid())}
    assert set(kinds) == {"in_use", "free", "mmapped"} and kinds["in_use"] > 0


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_a_loaded_model_holds_one_copy_of_its_weights_not_the_checkpoints_map(tiny_model_dir, dtype):
    """After loading (and packing or quantising) nothing reads the safetensors file's memory map any
    more, so it is unmapped: in a process of its own, since other tests' models map it too."""
    import subprocess
    import sys

    script = ("from qwen_worker.config import WorkerConfig\nfrom qwen_worker.model import ModelService\n"
              f"s = ModelService(WorkerConfig.from_env({{}}, model={tiny_model_dir!r}, dtype={dtype!r}, warmup=False))\n"
              "s.load()\nprint(sum('.safetensors' in line for line in open('/proc/self/maps')))\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "0", "the checkpoint is still mapped"


def test_a_kv_pool_costs_resident_memory_only_for_the_blocks_written():
    """One 8 KiB block written in each of 24 layers' parts of a 384 MiB pool: 24 x 8 KiB of RSS, not
    a transparent huge page (2 MiB) per layer as numpy's zeros gave it."""
    pool = zeroed((24, 2048, 2, 16, 64), torch.float32, torch.device("cpu"))
    assert pool.shape == (24, 2048, 2, 16, 64) and not pool[:, :4].any()
    before = rss_bytes()
    pool[:, 5] = 1.0
    assert rss_bytes() - before < 4 * 2**20
    assert float(pool[:, 5].sum()) == 24 * 2 * 16 * 64 and not pool[:, 6].any()
