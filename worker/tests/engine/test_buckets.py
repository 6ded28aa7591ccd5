import pytest

from qwen_worker.engine.buckets import bucket, doubling


def test_doubling_ends_at_its_limit_even_off_the_doubling():
    assert doubling(1, 64) == (1, 2, 4, 8, 16, 32, 64)
    assert doubling(128, 5120) == (128, 256, 512, 1024, 2048, 4096, 5120)
    assert doubling(16, 16) == (16,)


def test_bucket_is_the_smallest_size_that_holds_n():
    sizes = (1, 2, 4, 8)
    assert [bucket(n, sizes) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(ValueError):
        bucket(9, sizes)
