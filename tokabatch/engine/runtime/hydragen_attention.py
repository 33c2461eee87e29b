"""Hydragen decode attention by parts, in plain torch (the CPU backend's math, and the reference
the GPU path is checked against).

Owns `HydragenLayout` (one decode step's parts as gather indices, built once per step and used by
every layer) and `grouped_decode_attention` (build + attend in one call). The attention and merge
primitives are attention.py's `attention_with_lse` / `merge_attention`. Device-agnostic; must not
import engine/core scheduling code (only plan.PrefixGroup, plain data) or the service.

The parts of one decode step (one query token per sequence):
  - per PrefixGroup: ONE non-causal attention of all members' queries over the group's pages,
    a dense [members * heads] x [group tokens] product: the shared K/V is read once per group,
    not once per member;
  - per sequence: attention over its own part, positions from the end of its last group up to
    and including its current token (whose K/V the step wrote before attending);
  - merged: o = (e^l1·o1 + e^l2·o2) / (e^l1 + e^l2), in log space relative to the merged lse.

Worked example (page_size 4): sequences A, B with page tables (7, 2, 9) and (7, 2, 5, 1) and
context lengths 11 and 14, one group {A, B} over pages (7, 2) (start_page 0, 8 tokens). The group
part attends both queries to the 8 slots 28..31, 8..11 once; A's own part is positions 8..10
(slots 36..38), B's is positions 8..13 (slots 20..23, 4, 5). Each row merges its two (out, lse).
A nested group (start_page 2, pages (5,)) for B and others would add a third part, and B's own
part would then start at position 12.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from tokabatch.engine.core.plan import PrefixGroup
from tokabatch.engine.runtime.attention import attention_with_lse, merge_attention

__all__ = ["HydragenLayout", "grouped_decode_attention", "merge_attention", "own_part_starts"]


def own_part_starts(page_tables: Sequence[Sequence[int]], context_lens: Sequence[int],
                    seq_ids: Sequence[int], groups: Sequence[PrefixGroup], page_size: int) -> list[int]:
    """First position of each row's own part (0 without groups), checking the groups are sound.

    Raises ValueError if a group names an unknown sequence, disagrees with a member's page table,
    reaches past its context, or if a sequence's groups do not tile its pages consecutively from 0.
    """
    row_of = {seq_id: row for row, seq_id in enumerate(seq_ids)}
    ranges: list[list[tuple[int, int]]] = [[] for _ in seq_ids]
    for g in groups:
        stop = g.start_page + len(g.page_ids)
        for seq_id in g.seq_ids:
            row = row_of.get(seq_id)
            if row is None:
                raise ValueError(f"prefix group member {seq_id} is not a decoding sequence of this step")
            if tuple(page_tables[row][g.start_page:stop]) != tuple(g.page_ids):
                raise ValueError(f"prefix group pages {g.page_ids} at page {g.start_page} are not "
                                 f"sequence {seq_id}'s")
            if stop * page_size > context_lens[row]:
                raise ValueError(f"prefix group reaches past sequence {seq_id}'s context")
            ranges[row].append((g.start_page, stop))
    starts = []
    for row, rs in enumerate(ranges):
        rs.sort()
        end = 0
        for start, stop in rs:
            if start != end:
                raise ValueError(f"sequence {seq_ids[row]}'s prefix groups do not tile its pages from 0")
            end = stop
        starts.append(end * page_size)
    return starts


@dataclass(frozen=True, slots=True)
class _GroupPart:
    rows: Tensor                         # [members] long: rows of the step's decode queries
    slots: Tensor                        # [group tokens] long: flat cache slots of the shared pages


@dataclass(frozen=True, slots=True)
class HydragenLayout:
    """One decode step's attention parts as gather indices; build once per step, attend per layer."""

    num_rows: int
    own_slots: Tensor                    # [num_rows, max_own] long; padding points at slot 0
    own_mask: Tensor                     # [num_rows, 1, max_own] bool: True on real positions
    groups: tuple[_GroupPart, ...]

    @classmethod
    def build(cls, page_tables: Sequence[Sequence[int]], context_lens: Sequence[int],
              seq_ids: Sequence[int], groups: Sequence[PrefixGroup], page_size: int,
              device: torch.device | str = "cpu") -> HydragenLayout:
        """Row i is the decode of sequence seq_ids[i]: page table page_tables[i], context_lens[i]
        positions (its current token included). Groups refer to sequences by seq_id."""
        n = len(seq_ids)
        if not (len(page_tables) == len(context_lens) == n):
            raise ValueError("page_tables, context_lens and seq_ids must have one entry per row")
        for row in range(n):
            if len(page_tables[row]) * page_size < context_lens[row]:
                raise ValueError(f"page table of sequence {seq_ids[row]} cannot hold {context_lens[row]} positions")
        starts = own_part_starts(page_tables, context_lens, seq_ids, groups, page_size)
        own_slots, own_mask = _own_part_slots(page_tables, starts, context_lens, page_size, device)
        row_of = {seq_id: row for row, seq_id in enumerate(seq_ids)}
        offsets = torch.arange(page_size, device=device)
        parts = tuple(_GroupPart(
            rows=torch.tensor([row_of[s] for s in g.seq_ids], dtype=torch.long).to(device),
            slots=(torch.tensor(g.page_ids, dtype=torch.long).to(device)[:, None] * page_size
                   + offsets[None, :]).reshape(-1))
            for g in groups)
        return cls(num_rows=n, own_slots=own_slots, own_mask=own_mask, groups=parts)

    def attend(self, q: Tensor, k_cache: Tensor, v_cache: Tensor,
               scale: float | None = None) -> tuple[Tensor, Tensor]:
        """q: [num_rows, num_heads, head_dim]; k_cache, v_cache: [num_pages, page_size, num_kv_heads,
        head_dim] (or already flat by slot: [num_pages * page_size, num_kv_heads, head_dim]).
        Returns out [num_rows, num_heads, head_dim] in q's dtype and lse [num_rows, num_heads] float32.
        Parts are computed and merged in float32."""
        if q.shape[0] != self.num_rows:
            raise ValueError(f"expected {self.num_rows} query rows, got {q.shape[0]}")
        k_flat = k_cache.reshape(-1, *k_cache.shape[-2:])
        v_flat = v_cache.reshape(-1, *v_cache.shape[-2:])
        qf = q.float()
        if self.own_slots.shape[1]:
            out, lse = attention_with_lse(qf[:, None], k_flat[self.own_slots], v_flat[self.own_slots],
                                          self.own_mask, scale)
            out, lse = out[:, 0], lse[:, 0]
        else:   # every own part empty (no sequence has positions after its groups)
            out = torch.zeros_like(qf)
            lse = torch.full(qf.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        for part in self.groups:
            # All members' queries against the shared keys at once: no mask (non-causal), the
            # queries are the Lq axis of one dense product.
            o_g, l_g = attention_with_lse(qf.index_select(0, part.rows), k_flat[part.slots],
                                          v_flat[part.slots], None, scale)
            o_m, l_m = merge_attention(out.index_select(0, part.rows), lse.index_select(0, part.rows),
                                       o_g, l_g)
            out = out.index_copy(0, part.rows, o_m)
            lse = lse.index_copy(0, part.rows, l_m)
        return out.to(q.dtype), lse


def _own_part_slots(page_tables: Sequence[Sequence[int]], starts: Sequence[int], context_lens: Sequence[int],
                    page_size: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Slots of positions starts[i] .. context_lens[i]-1 per row, padded to the longest own part.

    Built from the padded page tables with tensor ops (no per-token Python): [B, max_own] slots
    and the [B, 1, max_own] validity mask attention_with_lse takes.
    """
    n = len(starts)
    own_lens = [c - s for s, c in zip(starts, context_lens)]
    max_own = max(own_lens, default=0)
    max_pages = max((len(t) for t in page_tables), default=0)
    table = torch.tensor([list(t) + [0] * (max_pages - len(t)) for t in page_tables],
                         dtype=torch.long).view(n, max_pages).to(device)
    pos = torch.tensor(starts, dtype=torch.long).to(device)[:, None] + torch.arange(max_own, device=device)
    valid = pos < torch.tensor(context_lens, dtype=torch.long).to(device)[:, None]
    pos = torch.where(valid, pos, 0)
    slots = table.gather(1, pos // page_size) * page_size + pos % page_size if max_pages else pos
    return torch.where(valid, slots, 0), valid[:, None, :]


def grouped_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor,
                             page_tables: Sequence[Sequence[int]], context_lens: Sequence[int],
                             groups: Sequence[PrefixGroup], seq_ids: Sequence[int] | None = None,
                             scale: float | None = None) -> Tensor:
    """One decode step's attention by parts (see the module doc); equals plain paged attention.

    q: [num_seqs, num_heads, head_dim]; k_cache, v_cache: [num_pages, page_size, num_kv_heads,
    head_dim]; page_tables[i], context_lens[i] (current token included) for row i, whose sequence
    id is seq_ids[i] (default: i). Returns out [num_seqs, num_heads, head_dim] in q's dtype.
    For several layers, build a HydragenLayout once and call attend per layer instead.
    """
    ids = list(range(q.shape[0])) if seq_ids is None else seq_ids
    layout = HydragenLayout.build(page_tables, context_lens, ids, groups, k_cache.shape[1], q.device)
    return layout.attend(q, k_cache, v_cache, scale)[0]
