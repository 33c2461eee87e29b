"""FlashInfer paged attention on CUDA: the fast backend, checked against TorchBackend (the reference).

Owns `FlashInferBackend` and its per-step `FlashInferAttentionContext` (also the attention of the
captured decode steps: cuda_graphs.py); page_indices.paged_layout makes a step's page tables into
the CSR arrays flashinfer plans from. One step is planned once (`begin_step`), and every layer then
only appends its K/V into the paged cache and calls `run()` on each part.

A step is split in two parts by row: the leading single-token rows (the plan's decodes come first)
go through `BatchDecodeWithPagedKVCacheWrapper`, the rest (prefill chunks, chunked prefill after
cached positions) through one causal `BatchPrefillWithPagedKVCacheWrapper`. Measured on the H200:
the prefill kernel reads the KV cache of a 256-sequence decode batch at only ~0.55 TB/s, the decode
kernel at ~2.9 TB/s, so mixed steps must not send their decodes through the prefill kernel. Which
decode kernel (tensor cores or CUDA cores) is the AttentionConfig's choice (attention.py).

KV append: each step token's flat slot (page * page_size + offset, as kv_cache.py lays it out) is
computed on the GPU from the step's page indices, then `index_copy_` into the flat view.
Wrappers are made and planned through flashinfer_ops.py (the leaf every CUDA attention module
shares); runner.select_backend imports this module only on CUDA. Must not import the service or
engine/core scheduling code.
"""

from __future__ import annotations

from typing import Sequence

import flashinfer
import torch
from torch import Tensor

from tokabatch.engine.core.plan import PrefixGroup
from tokabatch.engine.runtime.attention import (
    DEFAULT_ATTENTION,
    AttentionConfig,
    SeqAttn,
    send_cached_writes_to_scratch,
    to_device,
)
from tokabatch.engine.runtime.flashinfer_hydragen import FlashInferHydragenAttention
from tokabatch.engine.runtime.flashinfer_ops import (
    PagedShape,
    PagedStepAttention,
    decode_wrapper,
    plan_decode,
    plan_prefill,
    prefill_wrapper,
    speed_up_planning,
)
from tokabatch.engine.runtime.graph_sizes import MIN_WORKSPACE_BYTES as WORKSPACE_BYTES   # eager scratch
from tokabatch.engine.runtime.hydragen_plan import plan_hydragen
from tokabatch.engine.runtime.kv_cache import KVCache
from tokabatch.engine.runtime.page_indices import PageIndexCache, PagedLayout, paged_layout


class FlashInferAttentionContext(PagedStepAttention):
    """A planned step: the slot of every step token, and the wrappers of its decode and prefill rows."""

    def __init__(self, cache: KVCache, slot_mapping: Tensor,
                 decode: flashinfer.BatchDecodeWithPagedKVCacheWrapper | None, num_decode_rows: int,
                 prefill: flashinfer.BatchPrefillWithPagedKVCacheWrapper | None,
                 hydragen: FlashInferHydragenAttention | None = None) -> None:
        """`hydragen` (a planned FlashInferHydragenAttention) replaces `decode` for the decode rows."""
        super().__init__(cache, slot_mapping)
        self.decode, self.num_decode_rows, self.prefill = decode, num_decode_rows, prefill
        self.hydragen = hydragen

    def attend(self, layer_idx: int, q: Tensor, kv: tuple[Tensor, Tensor]) -> Tensor:
        """Both parts write into one output buffer: the prefill wrapper would otherwise zero-fill an
        output of its own, and a mixed step would copy each part into place."""
        d = self.num_decode_rows
        if self.prefill is None:
            return self._decode(layer_idx, q, kv)
        out = torch.empty_like(q)
        if d:
            self._decode(layer_idx, q[:d], kv, out[:d])
        self.prefill.run(q[d:], kv, out=out[d:])
        return out

    def _decode(self, layer_idx: int, q: Tensor, kv: tuple[Tensor, Tensor], out: Tensor | None = None) -> Tensor:
        """The decode rows, into `out` when given (Hydragen merges its parts into a buffer of its own,
        copied into `out`)."""
        if self.hydragen is None:
            return self.decode.run(q, kv, out=out)
        merged = self.hydragen.run(layer_idx, q)
        return merged if out is None else out.copy_(merged)


class FlashInferBackend:
    """Paged attention through flashinfer over the KVCache's NHD tensors (bf16 or fp16 on CUDA).

    config.hydragen (`use_hydragen`) off: prefix groups are ignored, every decode reads all its pages.
    On: a step's decode rows with prefix groups are attended by parts (flashinfer_hydragen.py over
    hydragen_plan.py: shared pages read once per group, merged with the own parts)."""

    name = "flashinfer"

    def __init__(self, cache: KVCache, num_heads: int, config: AttentionConfig = DEFAULT_ATTENTION,
                 workspace_bytes: int = WORKSPACE_BYTES) -> None:
        if cache.device.type != "cuda":
            raise ValueError("FlashInferBackend needs a CUDA KV cache")
        speed_up_planning(config.fast_planning)
        self.cache, self.num_heads, self.config = cache, num_heads, config
        self.shape = PagedShape.of(cache, num_heads)
        self.workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=cache.device)
        self.prefill = prefill_wrapper(self.workspace)
        self.decode = decode_wrapper(self.workspace, self.shape, config)
        self.use_hydragen = config.hydragen
        self._hydragen: FlashInferHydragenAttention | None = None     # built on first use
        self._page_index = PageIndexCache()   # the eager steps' page ids, joined from the last step's

    def begin_step(self, seqs: Sequence[SeqAttn], num_tokens: int,
                   prefix_groups: Sequence[PrefixGroup] = ()) -> FlashInferAttentionContext:
        """Plan one forward pass over `num_tokens` rows described by `seqs` (in row order, no gaps).

        `prefix_groups` (Hydragen; members are decode rows, named by SeqAttn.seq_id) change only
        how shared pages are read, never the result, and are used only with use_hydragen."""
        expected_start = 0
        num_decode = 0                   # leading single-token rows: the decode part
        for s in seqs:
            if s.q_start != expected_start:
                raise ValueError("FlashInferBackend needs sequences in row order without gaps")
            if s.q_len == 1 and expected_start == num_decode:
                num_decode += 1
            expected_start += s.q_len
        if expected_start != num_tokens:
            raise ValueError(f"sequences cover {expected_start} rows, the step has {num_tokens}")
        ps, dev = self.cache.page_size, self.cache.device
        layout = paged_layout(seqs, ps, self._page_index)
        kv_indices = to_device(layout.kv_indices, dev)
        decode = prefill = hydragen = None
        if num_decode and self.use_hydragen and prefix_groups:
            if self._hydragen is None:
                self._hydragen = FlashInferHydragenAttention(self.cache, self.num_heads, self.workspace, self.config)
            self._hydragen.plan(plan_hydragen(seqs[:num_decode], prefix_groups, ps))
            hydragen = self._hydragen
        elif num_decode:
            n_pages = int(layout.kv_indptr[num_decode])
            plan_decode(self.decode, self.shape, layout.kv_indptr[:num_decode + 1], kv_indices[:n_pages],
                        layout.last_page_len[:num_decode])
            decode = self.decode
        if num_decode < len(seqs):
            first_page = int(layout.kv_indptr[num_decode])
            qo = layout.qo_indptr[num_decode:] - layout.qo_indptr[num_decode]
            kvp = layout.kv_indptr[num_decode:] - first_page
            plan_prefill(self.prefill, self.shape, qo, kvp, kv_indices[first_page:],
                         layout.last_page_len[num_decode:], causal=True)
            prefill = self.prefill
        slot_mapping = slot_mapping_of(layout, kv_indices, ps, num_tokens, dev)
        send_cached_writes_to_scratch(slot_mapping, seqs, self.cache)
        return FlashInferAttentionContext(self.cache, slot_mapping, decode, num_decode, prefill, hydragen)


def slot_mapping_of(layout: PagedLayout, kv_indices: Tensor, page_size: int, num_tokens: int,
                    device: torch.device) -> Tensor:
    """Flat cache slot of every step token, computed on the GPU (no per-token Python).

    Token t of sequence s sits at position kv_len[s] - q_len[s] + (t - qo_indptr[s]); its page is
    kv_indices[kv_indptr[s] + pos // page_size] and its slot page * page_size + pos % page_size.
    """
    q_lens = layout.q_lens.to(device, non_blocking=True)
    kv_lens = layout.kv_lens.to(device, non_blocking=True)
    qo_indptr = layout.qo_indptr.to(device, non_blocking=True).long()
    kv_indptr = layout.kv_indptr.to(device, non_blocking=True).long()
    # output_size keeps repeat_interleave from syncing with the GPU to learn the length.
    seq_of_token = torch.repeat_interleave(torch.arange(q_lens.numel(), device=device), q_lens.long(),
                                           output_size=num_tokens)
    row = torch.arange(num_tokens, device=device)
    pos = (kv_lens - q_lens).long()[seq_of_token] + (row - qo_indptr[seq_of_token])
    pages = kv_indices.long()[kv_indptr[seq_of_token] + pos // page_size]
    return pages * page_size + pos % page_size
