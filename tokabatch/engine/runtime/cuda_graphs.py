"""CUDA graphs of whole decode steps (embedding -> layers -> final norm -> LM head) on a batch-size ladder.

Owns `DecodeGraphs`: one captured graph per ladder size, all sharing one memory pool and one set
of static input buffers (token ids, and the page-table CSR arrays flashinfer's cuda-graph decode
wrappers read: kv_indptr, kv_indices, last_page_len). Positions and KV slots are computed inside
the graph from those arrays (row i writes position (pages_i - 1) * page_size + last_page_len_i - 1
into its last page), so a replay needs only: copy the token ids, plan the wrapper of the bucket
(host CSR in, no kernel launch), replay, read the logits rows. Without graphs a decode step spends
most of its wall time launching hundreds of small kernels one by one; a replay launches them all
at once.

Padding: a batch of B rows runs in the smallest ladder size >= B; the padded rows read and write
only the KV cache's scratch page (kv_cache.py `reserved_pages`), with token id 0, and their logits
are never read. Capture happens once at start-up (largest size first so the smaller ones reuse
its pool); each size is run once eagerly before capture, which also compiles its kernels.

Only decode steps use graphs (prefill shapes vary too much); prefix-grouped (Hydragen) decode steps
replay the grouped twins of these graphs (hydragen_graphs.py); the runner runs eagerly mixed steps
and a step with more rows than the largest size or more page indices than the static buffer holds.
The ladder and the scratch size are graph_sizes.py's (pure Python); the captured attention is the
eager backend's context over the graph's wrapper (flashinfer_backend.FlashInferAttentionContext).
CUDA only. Must not import the service or engine/core scheduling code.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from tokabatch.engine.runtime.attention import DEFAULT_ATTENTION, AttentionConfig, to_device
from tokabatch.engine.runtime.flashinfer_backend import FlashInferAttentionContext
from tokabatch.engine.runtime.flashinfer_ops import PagedShape, decode_wrapper, plan_decode
from tokabatch.engine.runtime.graph_sizes import batch_ladder, graph_workspace_bytes
from tokabatch.engine.runtime.kv_cache import KVCache
from tokabatch.engine.runtime.page_indices import PageIndexCache, decode_layout


def capture_graph(forward: Callable[[], Tensor], pool: Any) -> tuple[torch.cuda.CUDAGraph, Tensor]:
    """Run `forward` once eagerly on a side stream (compiles kernels, allocates workspaces), then
    capture it into a graph in `pool`; returns the graph and its output tensor."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = forward()
    return graph, out


class DecodeGraphs:
    """Captured decode steps for every ladder size up to `max_batch` rows."""

    def __init__(self, model: nn.Module, cache: KVCache, num_heads: int, max_batch: int,
                 sizes: Sequence[int] | None = None, workspace_bytes: int | None = None,
                 max_indices: int | None = None, config: AttentionConfig = DEFAULT_ATTENTION) -> None:
        """`workspace_bytes`: flashinfer's float scratch, shared by every size's wrappers (they run one
        at a time); None: graph_workspace_bytes for the largest size. `config` picks the decode kernel
        (and the grouped twins' own-part kernel: hydragen_graphs.py)."""
        if cache.scratch_page is None:
            raise ValueError("CUDA graphs need a KV cache with a scratch page (reserved_pages=1)")
        self.model, self.cache, self.num_heads, self.config = model, cache, num_heads, config
        self.shape = PagedShape.of(cache, num_heads)
        self.num_kv_heads, self.head_dim = self.shape.num_kv_heads, self.shape.head_dim
        self.sizes = sorted(sizes) if sizes else batch_ladder(max_batch)
        self.max_batch = self.sizes[-1]
        dev = cache.device
        # Page references of one step: each row reads its own table, so shared pages count once per
        # row; 4x the pool covers heavy sharing, and a step beyond it runs eagerly.
        self.max_indices = max_indices or 4 * cache.num_pages + self.max_batch
        self.input_ids = torch.zeros(self.max_batch, dtype=torch.long, device=dev)
        self.kv_indptr = torch.arange(self.max_batch + 1, dtype=torch.int32, device=dev)
        self.last_page_len = torch.ones(self.max_batch, dtype=torch.int32, device=dev)
        self.kv_indices = torch.full((self.max_indices,), cache.scratch_page, dtype=torch.int32, device=dev)
        self._ids_host = torch.zeros(self.max_batch, dtype=torch.long).pin_memory()
        self._page_index = PageIndexCache()
        if workspace_bytes is None:
            workspace_bytes = graph_workspace_bytes(num_heads, self.num_kv_heads, self.head_dim, self.max_batch)
        self.workspace = torch.zeros(workspace_bytes, dtype=torch.uint8, device=dev)
        # Every size's graph (and the grouped twins') writes its logits into the first rows of this
        # one buffer: a tensor per size would hold the sum of the ladder's sizes in rows of the
        # vocabulary (twice with the twins), memory the KV cache sizing does not see.
        head = model.lm_head.weight
        self.logits = torch.empty(self.max_batch, head.shape[0], dtype=head.dtype, device=dev)
        self._wrappers: dict[int, Any] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.num_replays = 0

    # ---- start-up ------------------------------------------------------------------------------

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every ladder size (largest first, one shared memory pool)."""
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):
            self._wrappers[bs] = self.graph_decode_wrapper(bs)
            self._plan_padding_only(bs)
            self._graphs[bs], _ = capture_graph(lambda bs=bs: self._forward(bs), pool)
        torch.cuda.synchronize()

    def graph_decode_wrapper(self, bs: int, own_parts: bool = False) -> Any:
        """A cuda-graph decode wrapper of `bs` rows over the static CSR buffers (with `own_parts`: on
        the kernel the config picks for Hydragen own parts)."""
        return decode_wrapper(self.workspace, self.shape, self.config, own_parts, use_cuda_graph=True,
                              paged_kv_indptr_buffer=self.kv_indptr[:bs + 1], paged_kv_indices_buffer=self.kv_indices,
                              paged_kv_last_page_len_buffer=self.last_page_len[:bs])

    def _plan_padding_only(self, bs: int) -> None:
        scratch = self.cache.scratch_page
        self._plan(bs, torch.arange(bs + 1, dtype=torch.int32), torch.full((bs,), scratch, dtype=torch.int32),
                   torch.ones(bs, dtype=torch.int32))

    def _forward(self, bs: int) -> Tensor:
        """The captured computation: logits [bs, vocab] (into `self.logits`) from the static buffers."""
        ps = self.cache.page_size
        indptr = self.kv_indptr[:bs + 1].long()
        last_len = self.last_page_len[:bs].long()
        last_page = self.kv_indices.long()[indptr[1:] - 1]
        slots = last_page * ps + last_len - 1
        positions = (indptr[1:] - indptr[:-1] - 1) * ps + last_len - 1
        attn = FlashInferAttentionContext(self.cache, slots, self._wrappers[bs], bs, None)
        hidden = self.model(self.input_ids[:bs], positions, attn)
        return self.model.compute_logits(hidden, out=self.logits[:bs])

    # ---- per step ------------------------------------------------------------------------------

    def bucket(self, num_rows: int) -> int | None:
        """The ladder size a batch of `num_rows` runs in (None: larger than the largest)."""
        for bs in self.sizes:
            if bs >= num_rows:
                return bs
        return None

    def run(self, token_ids: Sequence[int], kv_lens: Sequence[int],
            page_tables: Sequence[Sequence[int]]) -> Tensor | None:
        """One decode step: row i feeds token_ids[i] at position kv_lens[i] - 1 (its KV goes there)
        and attends over page_tables[i]. Returns logits [rows, vocab] (a view of the graphs' shared output,
        valid until the next replay of any size), or None when the step does not fit (run it eagerly)."""
        rows = len(token_ids)
        bs = self.bucket(rows)
        if bs is None or rows == 0:
            return None
        indptr, indices, last = decode_layout(kv_lens, page_tables, self.cache.page_size, bs, self.cache.scratch_page,
                                              self._page_index)
        if len(indices) > self.max_indices:
            return None
        ids = self._ids_host[:bs]
        ids[:rows] = torch.as_tensor(token_ids, dtype=torch.long)
        ids[rows:] = 0
        self.input_ids[:bs].copy_(ids, non_blocking=True)
        self._plan(bs, indptr, to_device(indices, self.cache.device), last)
        self._graphs[bs].replay()
        self.num_replays += 1
        return self.logits[:rows]

    def _plan(self, bs: int, indptr: Tensor, indices: Tensor, last_page_len: Tensor) -> None:
        plan_decode(self._wrappers[bs], self.shape, indptr, indices, last_page_len)

