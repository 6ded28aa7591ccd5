"""The KV block pool's bookkeeping and its prefix cache, without a model."""
from qwen_worker.engine.block_manager import BlockManager, block_hash
from qwen_worker.engine.sequence import GenerationRow

SIZE = 4


def computed(manager: BlockManager, prompt: list[int], tokens: int | None = None) -> GenerationRow:
    """A row holding blocks for its prompt, as if the prompt had been prefilled (and registered)."""
    row = GenerationRow(list(prompt), 8)
    row.cached = manager.attach_prefix(row)
    manager.copied()  # as the engine runs them before the pass
    assert manager.grow(row, len(prompt))
    row.cached = len(prompt) if tokens is None else tokens
    manager.register(row)
    return row


def test_blocks_are_given_as_tokens_arrive_and_all_come_back_when_the_row_ends():
    manager = BlockManager(blocks=9, block_tokens=SIZE)
    row = GenerationRow([1, 2, 3], 8)
    assert manager.available() == 8  # one block is the scratch block
    assert manager.grow(row, 3) and len(row.blocks) == 1
    assert manager.grow(row, 4) and len(row.blocks) == 1
    assert manager.grow(row, 5) and len(row.blocks) == 2 and manager.used() == 2
    assert not manager.grow(row, 4 * 9) and len(row.blocks) == 2  # all or nothing
    manager.release(row)
    assert row.blocks == [] and manager.available() == 8 and manager.used() == 0


def test_a_prompt_attaches_the_cached_full_blocks_it_starts_with_but_never_its_last_token():
    manager = BlockManager(blocks=20, block_tokens=SIZE)
    first = computed(manager, list(range(10)))  # blocks [0-3] [4-7] full, [8, 9] partial
    first_blocks = list(first.blocks)
    manager.release(first)
    again = GenerationRow(list(range(10)) + [99], 8)
    assert manager.attach_prefix(again) == 8 and len(again.blocks) == 2
    exact = GenerationRow(list(range(8)), 8)  # its last token ends the second block: only the first is attached
    assert manager.attach_prefix(exact) == 7  # and the second's first three tokens copied into a block of its own
    assert manager.copies == [(first_blocks[1], exact.blocks[1])] and exact.blocks[0] == first_blocks[0]
    assert manager.hit_tokens == 15 and manager.query_tokens == 10 + 11 + 8


def test_copy_on_attach_takes_the_longest_head_among_the_recent_blocks_after_the_same_prefix():
    manager = BlockManager(blocks=20, block_tokens=SIZE)
    for tail in ([5, 6, 9, 9], [5, 7, 7, 7], [5, 6, 7, 9]):
        manager.release(computed(manager, [1, 2, 3, 4] + tail))
    row = GenerationRow([1, 2, 3, 4, 5, 6, 7, 8, 0], 8)
    assert manager.attach_prefix(row) == 4 + 3  # [5, 6, 7] from the third; the others share less
    (source, destination), = manager.copies
    assert destination == row.blocks[1] and source not in row.blocks
    other = GenerationRow([1, 2, 3, 4, 8, 8], 8)
    assert manager.attach_prefix(other) == 4  # nothing after the prefix begins like [8, 8]: no copy


def test_a_copy_source_is_never_evicted_before_the_copy_and_is_cached_again_after_it():
    manager = BlockManager(blocks=6, block_tokens=SIZE)  # five usable blocks
    manager.release(computed(manager, [1, 2, 3, 4, 5, 6, 7, 8]))
    row = GenerationRow([1, 2, 3, 4, 5, 6, 9], 8)
    assert manager.attach_prefix(row) == 6
    (source, _), = manager.copies
    hungry = GenerationRow(list(range(100, 120)), 8)
    assert not manager.grow(hungry, 12)  # 3 blocks wanted, 2 left: the source and the row's two are held
    assert manager.grow(hungry, 8) and source not in hungry.blocks
    assert manager.copied() == [(source, row.blocks[1])] and manager.copies == []
    manager.release(hungry)
    manager.release(row)
    again = GenerationRow([1, 2, 3, 4, 5, 6, 7, 8, 0], 8)
    assert manager.attach_prefix(again) == 8  # the source is a cached block again, found whole


def test_an_evicted_block_is_never_a_copy_source():
    manager = BlockManager(blocks=4, block_tokens=SIZE)  # three usable blocks
    manager.release(computed(manager, [1, 2, 3, 4, 5, 6, 7, 8]))
    filler = GenerationRow(list(range(100, 112)), 8)
    assert manager.grow(filler, 12) and manager.evictions == 2  # both cached blocks taken back
    manager.release(filler)
    assert manager.attach_prefix(GenerationRow([1, 2, 3, 4, 5, 6, 9], 8)) == 0 and manager.copies == []


def test_a_block_is_reused_only_after_the_same_tokens_before_it():
    manager = BlockManager(blocks=20, block_tokens=SIZE)
    manager.release(computed(manager, [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    other_start = GenerationRow([0, 0, 0, 0, 5, 6, 7, 8, 9], 8)  # its second block's tokens match, not its past
    assert manager.attach_prefix(other_start) == 0 and other_start.blocks == []
    assert block_hash(b"", [1, 2]) != block_hash(b"x", [1, 2])


def test_rows_share_cached_blocks_and_a_shared_block_is_never_evicted():
    manager = BlockManager(blocks=6, block_tokens=SIZE)  # 5 usable blocks
    a = computed(manager, list(range(9)))  # 3 blocks, 2 of them full and registered
    b = GenerationRow(list(range(9)), 8)
    assert manager.attach_prefix(b) == 8 and b.blocks == a.blocks[:2]
    assert manager.used() == 3
    manager.release(a)
    assert manager.used() == 2 and manager.cached() == 0  # b still holds the two full blocks
    hog = GenerationRow([7] * 12, 8)
    assert manager.grow(hog, 12)  # the partial block came back free; plus two never-used blocks
    assert not manager.grow(hog, 16)  # b's blocks cannot be taken
    manager.release(b)
    assert manager.cached() == 2 and manager.grow(hog, 20) and manager.evictions == 2


def test_the_least_recently_used_cached_block_is_evicted_first_and_a_prefix_tail_before_its_head():
    manager = BlockManager(blocks=6, block_tokens=SIZE)  # 5 usable
    old = computed(manager, list(range(12)), tokens=12)  # 3 full blocks
    manager.release(old)
    recent = computed(manager, [50 + i for i in range(12)], tokens=12)  # the 2 free blocks and an eviction
    manager.release(recent)
    assert manager.evictions == 1
    probe = GenerationRow(list(range(12)) + [1], 8)
    assert manager.attach_prefix(probe) == 8  # the old prefix lost its tail, kept its head
    manager.release(probe)
    again = GenerationRow([50 + i for i in range(12)] + [1], 8)
    assert manager.attach_prefix(again) == 12  # the recent one is whole


def test_twin_blocks_computed_at_once_stay_private_and_return_to_the_free_list():
    manager = BlockManager(blocks=9, block_tokens=SIZE)
    a, b = GenerationRow([1, 2, 3, 4, 5], 8), GenerationRow([1, 2, 3, 4, 6], 8)
    for row in (a, b):  # both prefill in the same step: neither finds the other's block
        assert manager.attach_prefix(row) == 0 and manager.grow(row, 5)
    for row in (a, b):
        row.cached = 5
        manager.register(row)
    assert a.blocks[0] != b.blocks[0] and a.block_hashes == b.block_hashes
    manager.release(b)
    assert manager.cached() == 0  # b's copy of the first block was never the cached one
    manager.release(a)
    assert manager.cached() == 1


def test_without_caching_nothing_is_attached():
    manager = BlockManager(blocks=9, block_tokens=SIZE, caching=False)
    manager.release(computed(manager, list(range(9))))
    row = GenerationRow(list(range(9)), 8)
    assert manager.attach_prefix(row) == 0 and manager.cached() == 0 and manager.available() == 8


def test_no_copy_when_taking_the_source_would_leave_no_block_for_its_destination():
    manager = BlockManager(blocks=4, block_tokens=SIZE)  # three usable blocks
    manager.release(computed(manager, [1, 2, 3, 4, 5, 6, 7, 8]))  # two cached, one free
    holder = GenerationRow([50, 51, 52], 8)
    assert manager.grow(holder, 3) and manager.evictions == 0  # the free one
    row = GenerationRow([1, 2, 3, 4, 5, 6, 9], 8)
    # The first cached block attaches; the second would be the copy's source, and nothing would be left
    # for the destination: no copy (the prompt computes those tokens), never a failed allocation.
    assert manager.attach_prefix(row) == 4 and manager.copies == [] and manager.available() == 1


def test_a_rows_block_hashes_are_computed_once_from_the_estimate_to_the_keying_and_cached_ones_never(monkeypatch):
    import qwen_worker.engine.block_manager as module

    manager = BlockManager(blocks=20, block_tokens=SIZE)
    computed(manager, list(range(12)))  # blocks [0-3] [4-7] [8-11] cached
    hashed = []
    monkeypatch.setattr(module, "block_hash", lambda parent, tokens: hashed.append(tuple(tokens)) or
                        block_hash(parent, tokens))
    row = GenerationRow(list(range(8)) + [50, 51, 52, 53, 54], 8)  # two cached blocks, then its own
    assert manager.cached_tokens(row) == 8  # the estimate the queue takes before admission
    assert manager.attach_prefix(row) == 8
    assert manager.grow(row, 13)
    row.cached = 13
    manager.register(row)  # keys its third block
    assert hashed == [(50, 51, 52, 53)]  # the cached blocks' hashes were looked up by their tokens
    assert row.block_hashes == [block_hash(b"", range(4)), block_hash(row.block_hashes[0], range(4, 8)),
                                block_hash(row.block_hashes[1], [50, 51, 52, 53])]
    again = GenerationRow(list(range(8)) + [50, 51, 52, 53, 60], 8)
    assert manager.attach_prefix(again) == 12  # what it keyed is found under the same hashes
    assert hashed == [(50, 51, 52, 53)]


def test_an_evicted_blocks_tokens_are_hashed_again_and_find_nothing(monkeypatch):
    import qwen_worker.engine.block_manager as module

    manager = BlockManager(blocks=3, block_tokens=SIZE)  # two usable
    manager.release(computed(manager, [1, 2, 3, 4, 5]))  # [1-4] cached
    manager.release(computed(manager, [7, 7, 7, 7, 8, 8, 8, 8]))  # evicts [1-4], caches [7 7 7 7]
    assert manager.evictions == 1
    hashed = []
    monkeypatch.setattr(module, "block_hash", lambda parent, tokens: hashed.append(tuple(tokens)) or
                        block_hash(parent, tokens))
    row = GenerationRow([1, 2, 3, 4, 5], 8)
    assert manager.attach_prefix(row) == 0 and hashed == [(1, 2, 3, 4)]
