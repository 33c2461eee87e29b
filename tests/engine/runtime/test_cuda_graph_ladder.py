"""The CUDA-graph batch-size ladder (pure Python: runs in CI; the graphs themselves are GPU tests)."""

from tokabatch.engine.runtime.cuda_graphs import batch_ladder


def test_ladder_covers_every_batch_size_with_bounded_padding() -> None:
    sizes = batch_ladder(3000)
    assert sizes[0] == 1 and sizes[-1] == 3000 and sizes == sorted(set(sizes))
    for n in range(1, 3001):
        bucket = next(s for s in sizes if s >= n)
        assert bucket - n <= max(8, n // 4), (n, bucket)


def test_ladder_ends_at_the_largest_batch() -> None:
    assert batch_ladder(1) == [1]
    assert batch_ladder(100)[-1] == 100 and max(batch_ladder(100)) == 100
    assert len(batch_ladder(2048)) < 50          # capture time grows with the number of sizes
