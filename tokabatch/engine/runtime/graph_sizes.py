"""The CUDA graphs' sizes: the batch-size ladder and flashinfer's scratch for the graphs' wrappers.

Pure Python, so the sizing is tested anywhere (the graphs themselves are CUDA: cuda_graphs.py).
"""

from __future__ import annotations


def batch_ladder(max_batch: int) -> list[int]:
    """Graph batch sizes up to `max_batch`, padding a batch by at most a quarter (at most 8 rows
    below 32, 12.5% above 1024); the last size is `max_batch` itself."""
    sizes = [1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128]
    sizes += list(range(160, 513, 32)) + list(range(576, 1025, 64)) + list(range(1152, max_batch + 1, 128))
    return sorted({s for s in sizes if s < max_batch} | {max_batch})


MIN_WORKSPACE_BYTES = 256 * 1024 * 1024   # flashinfer's split-k scratch (128 MiB is its usual minimum)


def graph_workspace_bytes(num_heads: int, num_kv_heads: int, head_dim: int, max_rows: int) -> int:
    """flashinfer's float scratch for CUDA-graph decode wrappers of up to `max_rows` rows. Planned for
    CUDA graphs, the tensor-core decode reserves its split-KV partial outputs for the worst case
    (flashinfer 0.6, scheduler.cuh): per query head, ceil(rows * group / tile) + rows - 1 tiles of
    `tile` (16) rows x (head_dim + 1) floats. Llama-3.1-8B at 1024 rows: 335 MB, above the
    MIN_WORKSPACE_BYTES the eager backend's scratch has. At least that, plus 64 MiB of margin."""
    group = max(1, num_heads // num_kv_heads)
    tile = 16 if group <= 16 else 128
    tiles = -(-max_rows * group // tile) + max_rows - 1
    return max(MIN_WORKSPACE_BYTES, num_heads * tiles * tile * (head_dim + 1) * 4 + (64 << 20))


__all__ = ["MIN_WORKSPACE_BYTES", "batch_ladder", "graph_workspace_bytes"]
