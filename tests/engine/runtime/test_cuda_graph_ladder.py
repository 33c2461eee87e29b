"""The CUDA-graph batch-size ladder and the graphs' flashinfer scratch size (pure Python: runs in
CI; the graphs themselves are GPU tests)."""

from tokabatch.engine.runtime.graph_sizes import (
    MIN_WORKSPACE_BYTES,
    batch_ladder,
    graph_workspace_bytes,
)


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


def test_graph_workspace_holds_the_tensor_core_decode_plan_flashinfer_asked_for() -> None:
    # On the H200, capturing Llama-3.1-8B's (32 heads / 8 KV heads, head_dim 128) 1024-row decode
    # graph on the tensor-core kernel failed in a 256 MiB workspace: "allocating memory for
    # batch_prefill_tmp_v with size 335282176". Its partial LSEs (one float per row of a tile) follow.
    tmp_v = 335_282_176
    tmp_s = tmp_v // 128
    assert graph_workspace_bytes(32, 8, 128, 1024) >= tmp_v + tmp_s
    # Shapes that captured in 256 MiB keep it (Llama-3.2-1B's head_dim 64, Qwen2.5-0.5B's group 7).
    assert graph_workspace_bytes(32, 8, 64, 1024) == MIN_WORKSPACE_BYTES
    assert graph_workspace_bytes(14, 2, 64, 1024) == MIN_WORKSPACE_BYTES
    # It grows with the rows a graph may hold (one loop: 2048) and with head_dim.
    assert graph_workspace_bytes(32, 8, 128, 2048) > graph_workspace_bytes(32, 8, 128, 1024)
    assert graph_workspace_bytes(28, 4, 128, 1024) > MIN_WORKSPACE_BYTES     # Qwen2.5-7B
