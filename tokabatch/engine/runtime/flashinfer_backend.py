"""FlashInfer paged attention on CUDA: the fast backend, checked against TorchBackend (the reference).

Owns `FlashInferBackend` and its per-step `FlashInferAttentionContext`. One step is planned once
(`begin_step`: page tables -> CSR indptr/indices/last_page_len, then the wrapper's `plan()`), and
every layer then only appends its K/V into the paged cache and calls `run()`.

A step whose rows are all one-token decodes goes through `BatchDecodeWithPagedKVCacheWrapper`
(measured on the H200: the prefill kernel read the KV cache of a 256-sequence decode step at only
~0.55 TB/s). Any other step goes through one `BatchPrefillWithPagedKVCacheWrapper` (causal,
ragged) for all its rows: prefill chunks, chunked prefill after cached positions, and the decode
rows mixed in (flashinfer aligns the causal mask bottom-right, so a query at position p sees
0..p), which keeps the step in plan order with no gather/scatter of q.

KV append: each step token's flat slot (page * page_size + offset, as kv_cache.py lays it out) is
computed on the GPU from the step's page indices, then `index_copy_` into the flat view.
flashinfer is imported only here; runner.select_backend imports this module only on CUDA.
Must not import the service or engine/core scheduling code.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Sequence

import flashinfer
import torch
from torch import Tensor

from tokabatch.engine.core.plan import PrefixGroup
from tokabatch.engine.runtime.attention import SeqAttn
from tokabatch.engine.runtime.kv_cache import KVCache

DECODE_GROUP_SIZES = (1, 2, 3, 4, 6, 8)
WORKSPACE_BYTES = 256 * 1024 * 1024     # flashinfer's split-k scratch; 128 MiB is its usual minimum


class FlashInferAttentionContext:
    """A planned step: the slot of every step token and the wrapper ready to `run` per layer."""

    def __init__(self, cache: KVCache, wrapper: Any, slot_mapping: Tensor) -> None:
        self.cache, self.wrapper, self.slot_mapping = cache, wrapper, slot_mapping

    def __call__(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q: [num_tokens, heads, dim]; k, v: [num_tokens, kv_heads, dim] -> [num_tokens, heads, dim]."""
        k_flat, v_flat = self.cache.flat(layer_idx)
        k_flat.index_copy_(0, self.slot_mapping, k.to(k_flat.dtype))
        v_flat.index_copy_(0, self.slot_mapping, v.to(v_flat.dtype))
        out = self.wrapper.run(q.contiguous(), (self.cache.k[layer_idx], self.cache.v[layer_idx]))
        return out.to(q.dtype)


class FlashInferBackend:
    """Paged attention through flashinfer over the KVCache's NHD tensors (bf16 or fp16 on CUDA)."""

    name = "flashinfer"

    def __init__(self, cache: KVCache, num_heads: int, workspace_bytes: int = WORKSPACE_BYTES) -> None:
        if cache.device.type != "cuda":
            raise ValueError("FlashInferBackend needs a CUDA KV cache")
        self.cache = cache
        self.num_heads = num_heads
        self.num_kv_heads, self.head_dim = cache.k[0].shape[2], cache.k[0].shape[3]
        self.workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=cache.device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, kv_layout="NHD")
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, kv_layout="NHD")
        # The CUDA-core decode kernel is compiled for these GQA group sizes only ("Unsupported
        # group_size: 7" on Qwen2.5-0.5B/7B, seen on the H200); others keep the prefill kernel.
        self.decode_ok = num_heads // self.num_kv_heads in DECODE_GROUP_SIZES

    def begin_step(self, seqs: Sequence[SeqAttn], num_tokens: int,
                   prefix_groups: Sequence[PrefixGroup] = ()) -> FlashInferAttentionContext:
        """Plan one forward pass over `num_tokens` rows described by `seqs` (in row order).

        `prefix_groups` (Hydragen) change only how shared pages could be read, never the result;
        this backend reads every sequence's pages itself."""
        ps, dev = self.cache.page_size, self.cache.device
        q_lens, kv_lens, tables = [], [], []
        expected_start = 0
        for s in seqs:
            if s.q_start != expected_start:
                raise ValueError("FlashInferBackend needs sequences in row order without gaps")
            expected_start += s.q_len
            num_pages = -(-s.kv_len // ps)
            if len(s.page_ids) < num_pages:
                raise ValueError(f"page table of {len(s.page_ids)} pages cannot hold {s.kv_len} positions")
            q_lens.append(s.q_len)
            kv_lens.append(s.kv_len)
            tables.append(s.page_ids[:num_pages])
        if expected_start != num_tokens:
            raise ValueError(f"sequences cover {expected_start} rows, the step has {num_tokens}")
        pages_per_seq = [len(t) for t in tables]
        q_lens_t = torch.tensor(q_lens, dtype=torch.int32)
        qo_indptr = _indptr(q_lens_t)
        kv_indptr = _indptr(torch.tensor(pages_per_seq, dtype=torch.int32))
        last_page_len = torch.tensor([n - (p - 1) * ps for n, p in zip(kv_lens, pages_per_seq)], dtype=torch.int32)
        kv_indices_host = torch.tensor(list(chain.from_iterable(tables)), dtype=torch.int32)
        kv_indices = kv_indices_host.pin_memory().to(dev, non_blocking=True)
        dtype = self.cache.dtype
        if self.decode_ok and all(n == 1 for n in q_lens):
            wrapper = self.decode
            wrapper.plan(kv_indptr, kv_indices, last_page_len, self.num_heads, self.num_kv_heads,
                         self.head_dim, ps, pos_encoding_mode="NONE", q_data_type=dtype, kv_data_type=dtype)
        else:
            wrapper = self.prefill
            wrapper.plan(qo_indptr, kv_indptr, kv_indices, last_page_len, self.num_heads, self.num_kv_heads,
                         self.head_dim, ps, causal=True, q_data_type=dtype, kv_data_type=dtype)
        slot_mapping = _slot_mapping(q_lens_t, torch.tensor(kv_lens, dtype=torch.int32), qo_indptr,
                                     kv_indptr, kv_indices, ps, num_tokens, dev)
        return FlashInferAttentionContext(self.cache, wrapper, slot_mapping)


def _indptr(lengths: Tensor) -> Tensor:
    """CSR offsets [len+1] int32 (host) of a lengths vector."""
    out = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    torch.cumsum(lengths, 0, out=out[1:])
    return out


def _slot_mapping(q_lens: Tensor, kv_lens: Tensor, qo_indptr: Tensor, kv_indptr: Tensor,
                  kv_indices: Tensor, page_size: int, num_tokens: int, device: torch.device) -> Tensor:
    """Flat cache slot of every step token, computed on the GPU (no per-token Python).

    Token t of sequence s sits at position kv_len[s] - q_len[s] + (t - qo_indptr[s]); its page is
    kv_indices[kv_indptr[s] + pos // page_size] and its slot page * page_size + pos % page_size.
    """
    q_lens, kv_lens = q_lens.to(device, non_blocking=True), kv_lens.to(device, non_blocking=True)
    qo_indptr = qo_indptr.to(device, non_blocking=True).long()
    kv_indptr = kv_indptr.to(device, non_blocking=True).long()
    # output_size keeps repeat_interleave from syncing with the GPU to learn the length.
    seq_of_token = torch.repeat_interleave(torch.arange(q_lens.numel(), device=device), q_lens.long(),
                                           output_size=num_tokens)
    row = torch.arange(num_tokens, device=device)
    pos = (kv_lens - q_lens).long()[seq_of_token] + (row - qo_indptr[seq_of_token])
    pages = kv_indices.long()[kv_indptr[seq_of_token] + pos // page_size]
    return pages * page_size + pos % page_size
