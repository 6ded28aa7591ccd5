import pytest

from qwen_worker.engine.buckets import MAX_PADDING_SHARE, MIN_GROUP_TOKENS, bucket, doubling, length_groups


def test_doubling_ends_at_its_limit_even_off_the_doubling():
    assert doubling(1, 64) == (1, 2, 4, 8, 16, 32, 64)
    assert doubling(128, 5120) == (128, 256, 512, 1024, 2048, 4096, 5120)
    assert doubling(16, 16) == (16,)


def test_bucket_is_the_smallest_size_that_holds_n():
    sizes = (1, 2, 4, 8)
    assert [bucket(n, sizes) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(ValueError):
        bucket(9, sizes)


@pytest.mark.parametrize("lengths", [[5] * 10, [3, 60, 10, 12, 9, 40, 15, 11, 8, 100, 14, 13, 16, 7, 20, 25], [1], []])
def test_length_groups_cover_every_index_once_and_bound_padding(lengths):
    groups = length_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        real = sum(lengths[i] for i in group)
        padded = len(group) * max(lengths[i] for i in group)
        without_last = real - max(lengths[i] for i in group)
        # A group only grows past the padding bound while it is still too small to stand alone.
        assert padded <= (1 + MAX_PADDING_SHARE) * real or without_last < MIN_GROUP_TOKENS
    if lengths == [3, 60, 10, 12, 9, 40, 15, 11, 8, 100, 14, 13, 16, 7, 20, 25]:
        assert len(groups) > 1  # one long chunk does not pad the short ones to its length
