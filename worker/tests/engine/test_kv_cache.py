import pytest
import torch

from qwen_worker.engine.kv_cache import SCRATCH_BLOCK, PagedKVCache
from qwen_worker.engine.slots import SlotAllocator


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


def pool(**shape) -> PagedKVCache:
    args = dict(layers=2, blocks=6, kv_heads=2, block_tokens=4, head_dim=3, dtype=torch.float32,
                device=torch.device("cpu"), slots=3, max_tokens=10) | shape
    return PagedKVCache(**args)


def test_the_pool_starts_finite_and_every_table_entry_points_at_the_scratch_block():
    cache = pool()
    assert cache.keys.shape == (2, 6, 2, 4, 3) and cache.block_table.shape == (3, 3)
    assert torch.isfinite(cache.keys).all() and torch.isfinite(cache.values).all()
    assert (cache.block_table == SCRATCH_BLOCK).all() and cache.scratch == SCRATCH_BLOCK * 4
    assert PagedKVCache.bytes_per_block(2, 2, 4, 3, torch.bfloat16) == 2 * 2 * 2 * 4 * 3 * 2 == cache.block_bytes // 2


def test_a_row_reads_back_in_position_order_what_was_written_to_its_scattered_blocks():
    cache = pool()
    cache.block_table[1, :2] = torch.tensor([5, 2])  # row 1: positions 0-3 in block 5, 4-7 in block 2
    positions = torch.arange(6)
    locations = cache.block_table[1, positions // 4] * 4 + positions % 4
    keys = torch.randn(6, 2, 3)
    cache.write(1, locations, keys, -keys)
    got_keys, got_values = cache.gather(1, cache.block_table[1:2, :2])
    assert got_keys.shape == (1, 2, 8, 3)
    assert torch.equal(got_keys[0, :, :6], keys.transpose(0, 1))
    assert torch.equal(got_values[0, :, :6], -keys.transpose(0, 1))
    assert not cache.keys[0].any()  # another layer's blocks are untouched
