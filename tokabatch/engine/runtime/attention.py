"""Paged attention in plain torch: the reference every faster backend is checked against.

Owns `attention_with_lse` / `merge_attention` (the math Hydragen's merge relies on), `SeqAttn` (one
sequence's share of a step, as the runner describes it to any backend) and `TorchBackend`, which
turns a step's SeqAttn list into a `TorchAttentionContext`: the callable a model invokes per layer
to write the step's K/V into the cache and attend over each sequence's pages.

Worked example (page_size 4): a sequence with page_ids (7, 2) running tokens at positions 5..6
writes them to slots 2*4+1 = 9 and 2*4+2 = 10, then its two queries read the 7 slots
28, 29, 30, 31, 8, 9, 10 (positions 0..6); query at position 5 sees positions 0..5 only.

Layout of the work: sequences with one query token (decodes, and one-token chunks) are attended in
one padded batch; longer chunks each get one call with a causal mask. Each sequence's K/V is
gathered once per layer per step, so the work is linear in the batch. With Hydragen on
(`TorchBackend(cache, use_hydragen=True)`) and prefix groups in the step, the single-token rows are
attended by parts instead (hydragen_attention.HydragenLayout: each group's shared pages once for all
its members, then each row's own pages, merged by log-sum-exp); the result is the same attention.
Must not import the service or engine/core scheduling code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from tokabatch.engine.core.plan import PrefixGroup
from tokabatch.engine.runtime.kv_cache import KVCache

if TYPE_CHECKING:
    from tokabatch.engine.runtime.hydragen_attention import HydragenLayout


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                       scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Softmax attention with grouped K/V heads, returning the log-sum-exp of the scores too.

    q: [..., Lq, num_heads, head_dim]; k, v: [..., Lk, num_kv_heads, head_dim]; mask: bool
    [..., Lq, Lk], True where a query may attend (None: everything). Query head h uses K/V head
    h // (num_heads // num_kv_heads), as HF's repeat_kv does.
    Returns out [..., Lq, num_heads, head_dim] in q's dtype and lse [..., Lq, num_heads] float32
    (natural log; -inf and a zero output for a query that may attend to nothing).
    """
    *batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[-2]
    group = num_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    qg = q.float().reshape(*batch, q_len, num_kv_heads, group, head_dim)
    scores = torch.einsum("...qhgd,...khd->...hgqk", qg, k.float()) * scale  # [..., kvh, g, Lq, Lk]
    if mask is not None:
        scores = scores.masked_fill(~mask[..., None, None, :, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                     # [..., kvh, g, Lq]
    # exp(-inf - 0) = 0 keeps fully masked rows at zero instead of NaN.
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("...hgqk,...khd->...qhgd", probs, v.float())
    out = out.reshape(*batch, q_len, num_heads, head_dim).to(q.dtype)
    lse = lse.movedim(-1, -3).reshape(*batch, q_len, num_heads)
    return out, lse


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """attention_with_lse's output without the log-sum-exp, through torch's fused CPU/GPU kernel
    (scaled_dot_product_attention, grouped heads without copies; faster than the einsums on a CPU,
    docs/benchmarks.md): for the eager paths that merge nothing. In float32 as the reference is, whatever the
    cache's dtype. q: [B, Lq, heads, dim]; k, v: [B, Lk, kv_heads, dim]; mask: bool [B, Lq, Lk],
    every query allowed at least one key. Returns [B, Lq, heads, dim] in q's dtype."""
    out = F.scaled_dot_product_attention(
        q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2),
        attn_mask=mask[:, None], enable_gqa=k.shape[-2] != q.shape[-2])
    return out.transpose(1, 2).to(q.dtype)


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Combine attention over two disjoint key sets (Hydragen: shared prefix + own suffix).

    out_*: [num_tokens, num_heads, head_dim]; lse_*: [num_tokens, num_heads] (natural log).
    o = (e^la·oa + e^lb·ob) / (e^la + e^lb), computed relative to the merged lse for stability.
    Returns (out in out_a's dtype, merged lse float32).
    """
    lse = torch.logaddexp(lse_a.float(), lse_b.float())
    safe = torch.where(torch.isinf(lse), 0.0, lse)
    w_a = torch.exp(lse_a.float() - safe)[..., None]
    w_b = torch.exp(lse_b.float() - safe)[..., None]
    out = w_a * out_a.float() + w_b * out_b.float()
    return out.to(out_a.dtype), lse


def fold_query_heads(q: Tensor, num_kv_heads: int) -> Tensor:
    """q [m, heads, dim] -> [m * g, kv_heads, dim] (g = heads // kv_heads, a copy): the g query heads
    that share a K/V head become g query rows of that head (row r's head h * g + j is folded row
    r * g + j, head h). A non-causal call over one shared prefix (Hydragen's group parts) then fills
    a kernel's query tiles with g times the rows; each folded row sees the same keys as before."""
    m, heads, dim = q.shape
    g = heads // num_kv_heads
    return q.reshape(m, num_kv_heads, g, dim).transpose(1, 2).reshape(m * g, num_kv_heads, dim)


def unfold_into(out_folded: Tensor, lse_folded: Tensor, out: Tensor, lse: Tensor) -> None:
    """fold_query_heads undone on an attention call's results: out_folded [m * g, kv_heads, dim] and
    lse_folded [m * g, kv_heads] written into out [m, heads, dim] and lse [m, heads] (contiguous)."""
    m, heads, dim = out.shape
    kv_heads = out_folded.shape[1]
    g = heads // kv_heads
    out.view(m, kv_heads, g, dim).copy_(out_folded.view(m, g, kv_heads, dim).transpose(1, 2))
    lse.view(m, kv_heads, g).copy_(lse_folded.view(m, g, kv_heads).transpose(1, 2))


def csr_indptr(lengths: Sequence[int] | Tensor) -> Tensor:
    """CSR offsets [len+1] int32 (host) of a lengths vector (the indptr arrays flashinfer plans from)."""
    lengths = torch.as_tensor(lengths, dtype=torch.int32)
    out = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    if lengths.numel():
        torch.cumsum(lengths, 0, out=out[1:])
    return out


CUDA_CORE_DECODE_GROUP_SIZES = (1, 2, 3, 4, 6, 8)     # GQA groups flashinfer's CUDA-core decode kernel has
GROUP_KERNELS = ("auto", "fa2", "fa3")   # flashinfer's prefill backends (AttentionConfig.group_kernel)


@dataclass(frozen=True, slots=True)
class AttentionConfig:
    """How a step's attention runs, fixed when the runners are built (factory.py from EngineConfig;
    scripts/bench.py varies the kernels): every backend, graph and grouped graph reads its choice
    from here, nothing at module level.

    hydragen: decode rows with prefix groups are attended by parts (shared pages read once per group).
    cuda_graphs: pure decode steps replay captured graphs (CUDA with flashinfer), and with hydragen
    the grouped steps their grouped twins.
    decode_tensor_cores: flashinfer's decode kernel. None: tensor cores for every GQA group (faster
    on the H200 at the workloads' contexts: benchmarks/decode_kernel.py); False: the CUDA-core
    kernel where it exists for the group; True: tensor cores always.
    own_tensor_cores: the same for Hydragen's own parts (a sample's own tokens: short contexts over
    many rows, where the CUDA-core kernel is faster: docs/benchmarks.md). None: as decode_tensor_cores.
    fast_planning: flashinfer's decode planner takes one reduction for its longest KV, not Python's
    max over a tensor (flashinfer_ops.speed_up_planning; off only for a before/after).
    group_kernel: flashinfer's prefill backend for Hydragen's group parts ("auto": FA3 on Hopper,
    "fa2": the FA2 kernel, which splits a long shared prefix over more thread blocks).
    fold_group_heads: the group parts' queries go to that kernel with each K/V head's GQA query
    heads folded into query rows (fold_query_heads), g times the rows per query tile.
    (In CUDA graphs flashinfer's FA2 planner always splits the group call's KV and merges the
    pieces. Planning it with `disable_split_kv` instead hung the GPU in TB's grouped graphs, so
    that is not offered: docs/benchmarks.md, stop 39.)"""

    hydragen: bool = False
    cuda_graphs: bool = True
    decode_tensor_cores: bool | None = None
    own_tensor_cores: bool | None = False
    fast_planning: bool = True
    group_kernel: str = "auto"
    fold_group_heads: bool = False

    def __post_init__(self) -> None:
        if self.group_kernel not in GROUP_KERNELS:
            raise ValueError(f"group_kernel must be one of {', '.join(GROUP_KERNELS)}, not {self.group_kernel!r}")

    def tensor_cores(self, num_heads: int, num_kv_heads: int, own_parts: bool = False) -> bool:
        """Whether a decode wrapper (for Hydragen own parts, with `own_parts`) takes the tensor-core
        kernel: as the setting says, and always where flashinfer has no CUDA-core kernel for the group."""
        setting = self.decode_tensor_cores
        if own_parts and self.own_tensor_cores is not None:
            setting = self.own_tensor_cores
        return setting is not False or num_heads // num_kv_heads not in CUDA_CORE_DECODE_GROUP_SIZES


DEFAULT_ATTENTION = AttentionConfig()


class SeqAttn(NamedTuple):
    """One sequence's part of a step: rows q_start..q_start+q_len-1 of the step's tokens, at
    positions start_pos.., attending through page_ids (covering positions 0..start_pos+q_len-1).

    A NamedTuple, as SeqWork is: an eager step makes one per row, and a frozen dataclass took
    several times as long to build (runner._flatten; docs/benchmarks.md, "The eager step's per-row
    Python")."""

    q_start: int
    q_len: int
    start_pos: int
    page_ids: tuple[int, ...]
    seq_id: int = -1                     # lets a Hydragen backend match PrefixGroup.seq_ids to rows
    # The cache holds these rows' KV already (SeqWork.kv_cached): their writes go to the scratch
    # page, or where there is none, over the same token's KV at the same position.
    kv_cached: bool = False

    @property
    def kv_len(self) -> int:
        return self.start_pos + self.q_len


def send_cached_writes_to_scratch(slots: Tensor, seqs: Sequence[SeqAttn], cache: KVCache) -> None:
    """Point the write slots of the rows whose KV the cache holds already (SeqAttn.kv_cached) at the
    scratch page, in place (without a scratch page they rewrite the same KV where it is)."""
    rows = [row for s in seqs if s.kv_cached for row in range(s.q_start, s.q_start + s.q_len)]
    if not rows or cache.scratch_page is None:
        return
    index = torch.tensor(rows, dtype=torch.long)
    if slots.is_cuda:
        index = to_device(index, slots.device)
    slots[index] = cache.scratch_page * cache.page_size


def pinned(host: Tensor) -> Tensor:
    """A pinned copy of the CPU tensor `host`, for a device copy with non_blocking=True that queues
    behind the stream's work instead of waiting for it. The block comes from torch's caching host
    allocator, which keeps it until that copy has run. `torch.empty(pin_memory=True)` + `copy_`
    rather than `host.pin_memory()`, which is many times slower per call (docs/benchmarks.md,
    "Pinned copies, the step's columns")."""
    staged = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
    return staged.copy_(host)


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """`host` copied to `device` without waiting for the stream (through `pinned`)."""
    return pinned(host).to(device, non_blocking=True)


def _slots(page_ids: Sequence[int], start: int, stop: int, page_size: int) -> list[int]:
    """Flat cache slots of positions start..stop-1."""
    return [page_ids[p // page_size] * page_size + p % page_size for p in range(start, stop)]


def _padded_slots(seqs: Sequence[SeqAttn], page_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Slots of every position of each sequence, padded: ([B, max_kv] long, valid mask [B, 1, max_kv]).

    Built from the page tables ([B, max_pages], page_size times smaller than the slots) with tensor
    ops, so a large decode batch costs no per-token Python. Padding points at slot 0 and is masked.
    """
    max_kv = max((s.kv_len for s in seqs), default=0)
    max_pages = -(-max_kv // page_size)
    table = [list(s.page_ids[:max_pages]) + [0] * (max_pages - len(s.page_ids[:max_pages])) for s in seqs]
    pages = torch.tensor(table, dtype=torch.long).view(len(seqs), max_pages).to(device)
    pos = torch.arange(max_kv, device=device)
    slots = pages[:, pos // page_size] * page_size + pos % page_size
    kv_lens = torch.tensor([s.kv_len for s in seqs], dtype=torch.long).to(device)
    valid = pos[None, :] < kv_lens[:, None]
    return torch.where(valid, slots, 0), valid[:, None, :]


@dataclass(slots=True)
class _Chunk:
    """A multi-token chunk: its rows, the slots of all its K/V, and its causal mask [q_len, kv_len]."""

    rows: slice
    kv_slots: Tensor
    mask: Tensor


class TorchAttentionContext:
    """Per-step state (slot mapping, gather indices, masks), built once and used by every layer."""

    def __init__(self, cache: KVCache, seqs: Sequence[SeqAttn], num_tokens: int,
                 prefix_groups: Sequence[PrefixGroup] = ()) -> None:
        self.cache = cache
        ps, dev = cache.page_size, cache.device
        slot_mapping = [0] * num_tokens
        single: list[SeqAttn] = []
        self.chunks: list[_Chunk] = []
        for s in seqs:
            if len(s.page_ids) * ps < s.kv_len:
                raise ValueError(f"page table of {len(s.page_ids)} pages cannot hold {s.kv_len} positions")
            slot_mapping[s.q_start:s.q_start + s.q_len] = _slots(s.page_ids, s.start_pos, s.kv_len, ps)
            if s.q_len == 1:
                single.append(s)
            else:
                kv_pos = torch.arange(s.kv_len, device=dev)
                q_pos = torch.arange(s.start_pos, s.kv_len, device=dev)
                self.chunks.append(_Chunk(
                    rows=slice(s.q_start, s.q_start + s.q_len),
                    kv_slots=torch.tensor(_slots(s.page_ids, 0, s.kv_len, ps), device=dev),
                    mask=kv_pos[None, :] <= q_pos[:, None]))
        self.slot_mapping = torch.tensor(slot_mapping, dtype=torch.long, device=dev)
        send_cached_writes_to_scratch(self.slot_mapping, seqs, cache)
        # Single-token rows: one padded batch [B, max_kv]; padding slots point at slot 0, masked out.
        self.single_rows = torch.tensor([s.q_start for s in single], dtype=torch.long, device=dev)
        # Hydragen: the groups' members are decodes, i.e. single-token rows; rows in no group get
        # an own part from position 0, so the layout covers every single-token row.
        self.grouped: HydragenLayout | None = None
        if prefix_groups:
            # Imported here: hydragen_attention builds on this module's attention_with_lse / merge.
            from tokabatch.engine.runtime.hydragen_attention import HydragenLayout
            self.grouped = HydragenLayout.build([s.page_ids for s in single], [s.kv_len for s in single],
                                                [s.seq_id for s in single], prefix_groups, ps, dev)
        else:
            self.single_slots, self.single_mask = _padded_slots(single, ps, dev)

    def __call__(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q: [num_tokens, heads, dim]; k, v: [num_tokens, kv_heads, dim] -> [num_tokens, heads, dim]."""
        k_cache, v_cache = self.cache.flat(layer_idx)
        k_cache.index_copy_(0, self.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, self.slot_mapping, v.to(v_cache.dtype))
        out = torch.empty_like(q)
        if self.grouped is not None:
            o1, _ = self.grouped.attend(q.index_select(0, self.single_rows), k_cache, v_cache)
            out.index_copy_(0, self.single_rows, o1)
        elif self.single_rows.numel():
            q1 = q.index_select(0, self.single_rows)[:, None]                  # [B, 1, heads, dim]
            o1 = attention(q1, k_cache[self.single_slots], v_cache[self.single_slots], self.single_mask)
            out.index_copy_(0, self.single_rows, o1[:, 0])
        for chunk in self.chunks:
            out[chunk.rows] = attention(q[chunk.rows][None], k_cache[chunk.kv_slots][None],
                                        v_cache[chunk.kv_slots][None], chunk.mask[None])[0]
        return out


class TorchBackend:
    """The reference attention backend over a KVCache.

    use_hydragen=False (the reference): prefix groups are ignored, every decode reads all its pages.
    use_hydragen=True: a step with prefix groups attends its decodes by parts (same result up to
    float rounding, shared pages read once per group)."""

    name = "torch"

    def __init__(self, cache: KVCache, use_hydragen: bool = False) -> None:
        self.cache = cache
        self.use_hydragen = use_hydragen

    def begin_step(self, seqs: Sequence[SeqAttn], num_tokens: int,
                   prefix_groups: Sequence[PrefixGroup] = ()) -> TorchAttentionContext:
        """The context for one forward pass over `num_tokens` rows described by `seqs`; `prefix_groups`
        (members named by SeqAttn.seq_id, all single-token rows) are used only with use_hydragen."""
        return TorchAttentionContext(self.cache, seqs, num_tokens,
                                     prefix_groups if self.use_hydragen else ())
