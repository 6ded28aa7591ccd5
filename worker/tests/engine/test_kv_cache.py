import pytest
import torch

from qwen_worker.engine.kv_cache import SlotAllocator, SlotKVCache


def test_lowest_free_slot_first_so_live_rows_stay_packed():
    slots = SlotAllocator(4)
    assert [slots.allocate() for _ in range(3)] == [0, 1, 2]
    slots.release(1)
    assert slots.highest_used() == 2
    assert slots.allocate() == 1  # the hole is refilled before slot 3 is touched
    assert slots.free_count() == 1


def test_double_release_fails_loudly():
    slots = SlotAllocator(2)
    slot = slots.allocate()
    slots.release(slot)
    with pytest.raises(KeyError):
        slots.release(slot)


def test_cache_has_a_scratch_position_past_every_slot_and_starts_finite():
    cache = SlotKVCache(layers=2, slots=3, kv_heads=2, max_tokens=10, head_dim=4, dtype=torch.float32,
                        device=torch.device("cpu"))
    assert cache.keys.shape == (2, 3, 2, 11, 4) and cache.scratch == 10
    assert torch.isfinite(cache.values).all()
    assert SlotKVCache.bytes_needed(2, 3, 2, 10, 4, torch.bfloat16) == 2 * 2 * 3 * 2 * 11 * 4 * 2
