"""The plan of Hydragen decode attention by parts on the GPU: one decode step's parts as flashinfer
page tables, made on the CPU (hydragen_attention.py is the torch reference of the same math;
flashinfer_hydragen.py runs the plan).

Owns `plan_hydragen` (the parts of one eager step, CPU torch tensors) and `plan_hydragen_padded`,
`pad_groups`, `pad_own` (the same in the fixed shapes of a CUDA-graph batch size, which
hydragen_graphs.py captures). Needs no flashinfer and no GPU. Must not import the service or
engine/core scheduling code (plan.PrefixGroup is plain data).

The parts of one decode step (rows 0..B-1, one query token each; see hydragen_attention.py):
  - group parts: ONE BatchPrefillWithPagedKVCacheWrapper call (non-causal) whose request g is
    group g: its members' queries, gathered contiguously (`group_rows`), over the group's full
    pages. The shared K/V is read once per group, for all members together;
  - own parts: ONE BatchDecodeWithPagedKVCacheWrapper call (its tensor-core variant for GQA group
    sizes the CUDA-core decode kernel lacks) over each row's pages from the end of its last group through its
    current token, page_ids[own_start // page_size : ceil(kv_len / page_size)];
  - merge: every part output (out, lse) is one row of a buffer [own outputs; group outputs; one
    empty state]; `state_index[row]` lists the row's parts (own first, then its groups by
    start_page, padded with the empty state), and flashinfer.merge_states folds them. The empty
    state is (0, EMPTY_LSE), a finite lse whose weight exp2(EMPTY_LSE - m) is exactly 0 next to
    any real part. Finite on purpose: state_t::merge computes exp2(m_prev - m), i.e. -inf - -inf
    when a merge starts from an -inf state, which merge_states' many-states kernel could meet on
    padding (one H200 check with -inf padding, 3 rows x 3 states, gave no NaN; finite needs no luck).
Nested groups (a row in 2+ groups) need nothing else: each group is one more request and one more
state. flashinfer's lse is base 2 (the kernels' m + log2(d); merge_states uses exp2), a different
base from attention.py's natural log, so it is never mixed with that module's values.

Worked example (page_size 4): rows A, B with page tables (7, 2, 9) and (7, 2, 5, 1), kv_len 11
and 14, one group {A, B} over pages (7, 2). Group part: request 0 = queries [A, B] (group_rows
[0, 1], qo_indptr [0, 2]) over pages [7, 2] (last_page_len 4). Own parts: A over pages [9]
(last_page_len 3), B over [5, 1] (last_page_len 2). Part outputs: rows 0, 1 = own A, own B; rows
2, 3 = group (A, B); row 4 = empty. state_index = [[0, 2], [1, 3]].

The own part includes the current token: its K/V is appended before the step attends.

CUDA graphs: `plan_hydragen` is the eager path's plan (its shapes change every step).
`plan_hydragen_padded` lays the same parts into the fixed shapes of one CUDA-graph batch size (own
part = one decode request per row, max_groups prefill requests with empty padding, max_queries
gathered rows, max_states states per row), which hydragen_graphs.py captures.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from tokabatch.engine.core.plan import PrefixGroup
from tokabatch.engine.runtime.attention import SeqAttn, csr_indptr
from tokabatch.engine.runtime.hydragen_attention import own_part_starts
from tokabatch.engine.runtime.page_indices import PageIndexCache, decode_arrays

__all__ = ["EMPTY_LSE", "HydragenPlan", "PaddedGroups", "PaddedHydragenPlan", "pad_groups", "pad_own",
           "plan_hydragen", "plan_hydragen_padded"]

EMPTY_LSE = -1e30                        # lse of the padding state: weight exactly 0 next to any real part


@dataclass(frozen=True, slots=True)
class HydragenPlan:
    """One decode step's parts as flashinfer page tables (CPU tensors; int32 where flashinfer reads
    them, int64 for torch gathers). Row r is the r-th decode row (query r of `run`'s q)."""

    num_rows: int
    page_size: int
    # Group parts: request g = group g; its queries are rows group_rows[qo_indptr[g]:qo_indptr[g+1]].
    group_rows: Tensor                   # [M] int64: decode row of each group-part query (gather/scatter-back)
    group_qo_indptr: Tensor              # [G+1] int32
    group_kv_indptr: Tensor              # [G+1] int32
    group_kv_indices: Tensor             # [group pages] int32
    group_last_page_len: Tensor          # [G] int32, all page_size (groups are whole pages)
    # Own parts: request i = row own_rows[i], positions own_starts[row] .. kv_len-1.
    own_rows: Tensor                     # [R] int64, ascending: rows with a non-empty own part
    own_kv_indptr: Tensor                # [R+1] int32
    own_kv_indices: Tensor               # [own pages] int32
    own_last_page_len: Tensor            # [R] int32, in 1..page_size
    own_starts: tuple[int, ...]          # [B] first position of each row's own part
    # Merge: part outputs are rows [own 0..R-1; group queries R..R+M-1; empty state R+M].
    state_index: Tensor                  # [B, num_states] int64, padded with the empty state

    @property
    def num_groups(self) -> int:
        return self.group_qo_indptr.numel() - 1

    @property
    def num_group_queries(self) -> int:
        return self.group_rows.numel()

    @property
    def num_own(self) -> int:
        return self.own_rows.numel()

    @property
    def num_states(self) -> int:
        return self.state_index.shape[1]

    @property
    def empty_state(self) -> int:
        """Row of the (zero output, EMPTY_LSE) state in the part outputs."""
        return self.num_own + self.num_group_queries

    @property
    def own_only(self) -> bool:
        """No merge needed: every row is its own part alone, in row order (a step without groups)."""
        return self.num_states == 1 and self.num_own == self.num_rows and self.num_group_queries == 0


def plan_hydragen(rows: Sequence[SeqAttn], groups: Sequence[PrefixGroup], page_size: int) -> HydragenPlan:
    """The parts of one decode step. rows[r] is decode row r (q_len 1; its page table covers its
    kv_len positions, the current token included); groups name members by SeqAttn.seq_id.

    Raises ValueError for a row that is not a one-token decode, a page table too short for its
    context, duplicate seq_ids, or groups inconsistent with the page tables (own_part_starts)."""
    seq_ids = [s.seq_id for s in rows]
    if len(set(seq_ids)) != len(seq_ids):
        raise ValueError("decode rows need distinct seq_ids to be matched to prefix groups")
    for s in rows:
        if s.q_len != 1:
            raise ValueError(f"sequence {s.seq_id} runs {s.q_len} tokens; Hydragen parts are for decodes")
        if len(s.page_ids) * page_size < s.kv_len:
            raise ValueError(f"page table of sequence {s.seq_id} cannot hold {s.kv_len} positions")
    kv_lens = [s.kv_len for s in rows]
    starts = own_part_starts([s.page_ids for s in rows], kv_lens, seq_ids, groups, page_size)
    row_of = {seq_id: r for r, seq_id in enumerate(seq_ids)}
    groups = [g for g in groups if g.page_ids and g.seq_ids]     # an empty part would be an empty request

    # Group parts, in start_page order (any order works; this one keeps outer groups first).
    ordered = sorted(groups, key=lambda g: g.start_page)
    group_rows = [row_of[s] for g in ordered for s in g.seq_ids]
    group_sizes = [len(g.seq_ids) for g in ordered]
    group_pages = [len(g.page_ids) for g in ordered]

    # Own parts: rows with positions after their groups (every real decode row: its current token).
    own_rows = [r for r in range(len(rows)) if starts[r] < kv_lens[r]]
    own_tables = [rows[r].page_ids[starts[r] // page_size:-(-kv_lens[r] // page_size)] for r in own_rows]
    own_last = [kv_lens[r] - ((-(-kv_lens[r] // page_size)) - 1) * page_size for r in own_rows]

    # Merge: each row's states, own part first, then its groups.
    states: list[list[int]] = [[] for _ in rows]
    for i, r in enumerate(own_rows):
        states[r].append(i)
    for j, r in enumerate(group_rows):
        states[r].append(len(own_rows) + j)
    empty = len(own_rows) + len(group_rows)
    width = max((len(s) for s in states), default=1)
    state_index = [s + [empty] * (width - len(s)) for s in states]

    return HydragenPlan(
        num_rows=len(rows), page_size=page_size,
        group_rows=torch.tensor(group_rows, dtype=torch.long),
        group_qo_indptr=csr_indptr(group_sizes),
        group_kv_indptr=csr_indptr(group_pages),
        group_kv_indices=torch.tensor(list(chain.from_iterable(g.page_ids for g in ordered)), dtype=torch.int32),
        group_last_page_len=torch.full((len(ordered),), page_size, dtype=torch.int32),
        own_rows=torch.tensor(own_rows, dtype=torch.long),
        own_kv_indptr=csr_indptr([len(t) for t in own_tables]),
        own_kv_indices=torch.tensor(list(chain.from_iterable(own_tables)), dtype=torch.int32),
        own_last_page_len=torch.tensor(own_last, dtype=torch.int32),
        own_starts=tuple(starts),
        state_index=torch.tensor(state_index, dtype=torch.long).view(len(rows), width),
    )


@dataclass(frozen=True, slots=True)
class PaddedGroups:
    """The group half of a PaddedHydragenPlan: it depends only on the rows' seq_ids in order, the
    groups and the shapes, so a caller may reuse it from step to step while those stay the same."""

    own_start: tuple[int, ...]           # [rows] page where each row's own part starts
    group_qo_indptr: Tensor              # [max_groups+1] int32
    group_kv_indptr: Tensor              # [max_groups+1] int32
    group_kv_indices: Tensor             # [group pages] int32
    group_last_page_len: Tensor          # [max_groups] int32
    group_rows: Tensor                   # [max_queries] int64
    state_index: Tensor                  # [bs, max_states] int64


@dataclass(frozen=True, slots=True)
class PaddedHydragenPlan:
    """A HydragenPlan laid out in the fixed shapes of one CUDA-graph batch size (cuda_graphs.py).

    Own parts: one decode request per row 0..bs-1 (padded rows read the scratch page). Group parts
    (`groups`): exactly `max_groups` prefill requests (padded ones have no queries and read the
    scratch page), their queries gathered by `group_rows` [max_queries] (padding gathers row 0; no
    request owns it). Merge: part outputs are rows [own 0..bs-1; group queries
    bs..bs+max_queries-1; empty state]; `groups.state_index` [bs, max_states] (padded rows and
    columns -> the empty state)."""

    positions: Tensor                    # [bs] int64: each row's position (kv_len - 1; 0 for padding)
    slots: Tensor                        # [bs] int64: where each row's new K/V goes (scratch for padding)
    own_kv_indptr: Tensor                # [bs+1] int32
    own_kv_indices: Tensor               # [own pages] int32
    own_last_page_len: Tensor            # [bs] int32
    groups: PaddedGroups


def _ints(values: array) -> Tensor:
    dtype = torch.int32 if values.typecode == "i" else torch.long
    return torch.frombuffer(values, dtype=dtype) if len(values) else torch.empty(0, dtype=dtype)


def pad_groups(rows: Sequence[SeqAttn], groups: Sequence[PrefixGroup], page_size: int, bs: int, max_groups: int,
               max_queries: int, max_states: int, scratch_page: int) -> PaddedGroups | None:
    """The group parts and merge states of plan_hydragen_padded (None: they do not fit the shapes).
    Raises ValueError for groups inconsistent with the rows (a group's pages are checked against
    each member's table at their first and last page)."""
    n, ps = len(rows), page_size
    groups = sorted((g for g in groups if g.page_ids and g.seq_ids), key=lambda g: g.start_page)
    if n > bs or len(groups) > max_groups:
        return None
    row_of = {s.seq_id: r for r, s in enumerate(rows)}
    if len(row_of) != n:
        raise ValueError("decode rows need distinct seq_ids to be matched to prefix groups")
    empty = bs + max_queries
    states = array("q", [empty]) * (bs * max_states)
    num_states = [1] * n                  # state 0 of row r is its own part, part r
    states[0:n * max_states:max_states] = array("q", range(n))
    own_start = [0] * n                   # page where each row's own part starts
    group_rows = array("q")
    qo, kv_indptr, kv_indices = array("i", [0]), array("i", [0]), array("i")
    for g in groups:
        pages = g.page_ids
        start, stop, first, last = g.start_page, g.start_page + len(pages), pages[0], pages[-1]
        for seq_id in g.seq_ids:
            r = row_of.get(seq_id)
            if r is None:
                raise ValueError(f"prefix group member {seq_id} is not a decoding sequence of this step")
            s = rows[r]
            if own_start[r] != start:     # groups in start_page order: each must begin where the last ended
                raise ValueError(f"sequence {seq_id}'s prefix groups do not tile its pages from 0")
            table = s.page_ids
            if len(table) < stop or table[start] != first or table[stop - 1] != last:
                raise ValueError(f"prefix group pages {pages} at page {start} are not sequence {seq_id}'s")
            if stop * ps > s.kv_len:
                raise ValueError(f"prefix group reaches past sequence {seq_id}'s context")
            own_start[r] = stop
            k = num_states[r]
            if k == max_states:
                return None
            states[r * max_states + k] = bs + len(group_rows)
            num_states[r] = k + 1
            group_rows.append(r)
        qo.append(len(group_rows))
        kv_indices.extend(pages)
        kv_indptr.append(len(kv_indices))
    m = len(group_rows)
    if m > max_queries:
        return None
    for _ in range(max_groups - len(groups)):          # padding requests: no queries, the scratch page
        qo.append(m)
        kv_indices.append(scratch_page)
        kv_indptr.append(len(kv_indices))
    group_rows.extend([0] * (max_queries - m))
    group_last = array("i", [ps]) * len(groups) + array("i", [1]) * (max_groups - len(groups))
    return PaddedGroups(own_start=tuple(own_start), group_qo_indptr=_ints(qo), group_kv_indptr=_ints(kv_indptr),
                        group_kv_indices=_ints(kv_indices), group_last_page_len=_ints(group_last),
                        group_rows=_ints(group_rows), state_index=_ints(states).view(bs, max_states))


def plan_hydragen_padded(rows: Sequence[SeqAttn], groups: Sequence[PrefixGroup], page_size: int, bs: int,
                         max_groups: int, max_queries: int, max_states: int, scratch_page: int,
                         padded_groups: PaddedGroups | None = None) -> PaddedHydragenPlan | None:
    """plan_hydragen's parts for `rows`, laid straight into the fixed shapes of batch size `bs` (plain
    ints: this runs on the CPU once per grouped graph step, ~1k rows). `padded_groups`: this step's
    pad_groups result, reused from an earlier step with the same seq_ids, groups and shapes.

    None when it does not fit: more rows, groups, group queries or states per row than the shapes
    hold, or a row whose whole context is in its groups (its new K/V would go into a shared page:
    never planned for a real decode). Raises ValueError for what plan_hydragen rejects (a group's
    pages are checked against each member's table at their first and last page only)."""
    ps = page_size
    bad = next((s for s in rows if s.q_len != 1), None)
    if bad is not None:
        raise ValueError(f"sequence {bad.seq_id} runs {bad.q_len} tokens; Hydragen parts are for decodes")
    pg = padded_groups or pad_groups(rows, groups, ps, bs, max_groups, max_queries, max_states, scratch_page)
    if pg is None:
        return None
    return pad_own([s.kv_len for s in rows], [s.page_ids for s in rows], pg, ps, bs, scratch_page, PageIndexCache())


def pad_own(kv_lens: Sequence[int], tables: Sequence[Sequence[int]], pg: PaddedGroups, page_size: int, bs: int,
            scratch_page: int, page_index: PageIndexCache) -> PaddedHydragenPlan | None:
    """plan_hydragen_padded's per-step half: row r (context kv_lens[r] with its current token, pages
    tables[r]) attends its own part from page pg.own_start[r] on (page_indices.decode_arrays).
    None when a row has no own part."""
    ps = page_size
    arrays = decode_arrays(kv_lens, tables, ps, bs, scratch_page, page_index, pg.own_start)
    if arrays is None:
        return None
    indptr, indices, last, kv = arrays
    n = len(kv)
    positions = np.zeros(bs, dtype=np.int64)
    positions[:n] = kv - 1
    # Each row's own part ends with its last page (it is never empty), where its new K/V goes.
    slots = np.full(bs, scratch_page * ps, dtype=np.int64)
    slots[:n] = indices[indptr[1:n + 1] - 1].astype(np.int64) * ps + (kv - 1) % ps
    return PaddedHydragenPlan(positions=torch.from_numpy(positions), slots=torch.from_numpy(slots),
                              own_kv_indptr=torch.from_numpy(indptr), own_kv_indices=torch.from_numpy(indices),
                              own_last_page_len=torch.from_numpy(last), groups=pg)
