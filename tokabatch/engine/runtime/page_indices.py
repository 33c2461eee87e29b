"""Page tables flattened into flashinfer's CSR layout on the host, fast enough for every decode step.

Owns `PageIndexCache`, `decode_arrays`, `decode_layout` and `paged_layout` (an eager step's
layout, flashinfer_backend.py). A decode step at ~1k sequences of
~1k tokens names ~70k page ids, and joining the scheduler's page-table tuples into one int array in
Python costs milliseconds a step. The scheduler keeps a sequence's tuple object until the sequence
gains a page (once every page_size steps), so PageIndexCache converts each tuple to a numpy array
once and a step joins arrays (np.concatenate); a step whose rows are the last step's copies the
unchanged rows' ids from the last join, in runs, and converts only the rows that gained a page or
moved their start. `decode_arrays` computes the rest of the layout (indptr, last-page lengths) by
whole-array arithmetic (`decode_layout` is it as torch tensors). (The figures: docs/benchmarks.md.)
Tables must be immutable (tuples): a table object seen again is taken as unchanged.
Host-only (numpy + torch CPU tensors); must not import flashinfer, the service or engine/core
scheduling code.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from tokabatch.engine.runtime.attention import SeqAttn


class PageIndexCache:
    """The page ids of a step's rows, joined, made from the last step's where the rows are the same.

    A step whose rows are the last step's rows (the same number, in the same order) copies the
    last step's ids for every row whose table object, page count and start are unchanged, in runs
    between the rows that changed: in a steady decode step only the rows that gained a page since
    (about one in page_size) are converted, and the per-row Python is two C-level map()s. Other
    steps join per-row numpy copies of the tables, made once per tuple object and kept while a
    step still names that tuple (entries of tables no such step names any more are dropped then)."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[Sequence[int], np.ndarray]] = {}
        self.num_converted = 0                # tables converted to numpy (whole or a row's part)
        self.num_rows_reused = 0              # rows copied from the last step's joined ids
        self._last: tuple[list[Sequence[int]], np.ndarray, np.ndarray, np.ndarray] | None = None
        # (the last step's tables, num_pages, starts, joined ids)

    def join(self, tables: Sequence[Sequence[int]], num_pages: np.ndarray,
             starts: np.ndarray | None = None) -> np.ndarray:
        """tables[i][starts[i]:num_pages[i]] (starts: 0 by default) for every i, concatenated, int32."""
        n = len(tables)
        tables = list(tables)
        num_pages = np.asarray(num_pages, dtype=np.int64)
        starts = np.zeros(n, dtype=np.int64) if starts is None else np.asarray(starts, dtype=np.int64)
        last = self._last
        joined = None
        if last is not None and n and len(last[0]) == n:
            same = np.fromiter(map(operator.is_, tables, last[0]), dtype=bool, count=n)
            same &= (num_pages == last[1]) & (starts == last[2])
            changed = np.flatnonzero(~same)
            if 4 * len(changed) <= n:
                joined = self._update(tables, num_pages, starts, changed, last)
            else:
                joined = self._grown(tables, num_pages, starts, changed, last)
        if joined is None:
            joined = self._join_all(tables, num_pages, starts)
        self._last = (tables, num_pages, starts, joined)
        return joined

    def _update(self, tables: list[Sequence[int]], num_pages: np.ndarray, starts: np.ndarray,
                changed: np.ndarray, last: tuple) -> np.ndarray:
        """The last step's ids with the `changed` rows' parts made anew (the rest copied in runs)."""
        if not len(changed):
            self.num_rows_reused += len(tables)
            return last[3]
        old_ends = np.cumsum(last[1] - last[2]).tolist()
        old_ids = last[3]
        parts = []
        row = 0                               # first row not yet placed
        for c in changed.tolist():
            if c > row:
                parts.append(old_ids[(old_ends[row - 1] if row else 0):old_ends[c - 1]])
            parts.append(np.array(tables[c][int(starts[c]):int(num_pages[c])], dtype=np.int32))
            row = c + 1
        if row < len(tables):
            parts.append(old_ids[(old_ends[row - 1] if row else 0):])
        self.num_converted += len(changed)
        self.num_rows_reused += len(tables) - len(changed)
        return np.concatenate(parts)

    def _grown(self, tables: list[Sequence[int]], num_pages: np.ndarray, starts: np.ndarray,
               changed: np.ndarray, last: tuple) -> np.ndarray | None:
        """The last step's ids with each row's new pages inserted after its old ones, when every
        changed row only grew: the same start, no fewer pages, and its table holding the ids the
        last join took from it (the step where all the samples of a wave gain a page together).
        None otherwise. The per-row work is C-level map()s over the rows' joined parts only, where
        converting every table anew cost many steady steps' joins (docs/benchmarks.md,
        "Page-growth steps")."""
        old_tables, old_num_pages, old_starts, old_ids = last
        if (num_pages < old_num_pages).any() or (starts != old_starts).any():
            return None
        rows = changed.tolist()
        new = [tables[i] for i in rows]
        firsts, lasts = old_num_pages[changed].tolist(), num_pages[changed].tolist()
        joined = list(map(slice, starts[changed].tolist(), firsts))     # each row's part of old_ids
        same = map(operator.eq, map(operator.getitem, new, joined),
                   map(operator.getitem, [old_tables[i] for i in rows], joined))
        if not all(same):
            return None
        grown_by = num_pages - old_num_pages
        extra = np.fromiter(chain.from_iterable(map(operator.getitem, new, map(slice, firsts, lasts))),
                            dtype=np.int32, count=int(grown_by.sum()))
        ends = np.cumsum(old_num_pages - old_starts)
        self.num_converted += len(rows)
        self.num_rows_reused += len(tables) - len(rows)
        return np.insert(old_ids, np.repeat(ends, grown_by), extra)

    def _join_all(self, tables: list[Sequence[int]], num_pages: np.ndarray, starts: np.ndarray) -> np.ndarray:
        old: dict[int, tuple[Sequence[int], np.ndarray]] = self._by_id
        new: dict[int, tuple[Sequence[int], np.ndarray]] = {}
        parts = []
        for table, a, b in zip(tables, starts.tolist(), num_pages.tolist()):
            key = id(table)                   # safe: the entry holds the table, so its id is not reused
            entry = old.get(key)
            if entry is None or entry[0] is not table:
                entry = (table, np.array(table, dtype=np.int32))
                self.num_converted += 1
            new[key] = entry
            parts.append(entry[1][a:b])
        self._by_id = new
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)


def _pages_needed(kv_lens: np.ndarray, tables: Sequence[Sequence[int]], page_size: int) -> np.ndarray:
    """Pages each row reads (ceil(kv_len / page_size)); ValueError for the first table too short."""
    num_pages = (kv_lens + (page_size - 1)) // page_size
    short = np.flatnonzero(np.fromiter(map(len, tables), dtype=np.int64, count=len(tables)) < num_pages)
    if short.size:
        i = int(short[0])
        raise ValueError(f"page table of {len(tables[i])} pages cannot hold {int(kv_lens[i])} positions")
    return num_pages


def decode_arrays(kv_lens: Sequence[int], tables: Sequence[Sequence[int]], page_size: int, bs: int,
                  scratch_page: int, cache: PageIndexCache,
                  starts: Sequence[int] | None = None) -> tuple[np.ndarray, ...] | None:
    """decode_layout as numpy arrays, plus the rows' context lengths: (kv_indptr [bs+1], kv_indices,
    last_page_len [bs], all int32, and kv_lens [rows] int64). Whole-array arithmetic: the only
    per-row Python is the table join and the length check's map(len)."""
    ps = page_size
    n = len(kv_lens)
    pad = bs - n
    if pad < 0:
        raise ValueError(f"{n} rows do not fit a batch of {bs}")
    kv = np.fromiter(kv_lens, dtype=np.int64, count=n)
    num_pages = _pages_needed(kv, tables, ps)
    start_pages = None if starts is None else np.fromiter(starts, dtype=np.int64, count=n)
    counts = num_pages if start_pages is None else num_pages - start_pages
    if start_pages is not None and (counts <= 0).any():
        return None
    indices = cache.join(tables, num_pages, start_pages)
    if pad:
        indices = np.concatenate([indices, np.full(pad, scratch_page, dtype=np.int32)])
    indptr = np.empty(bs + 1, dtype=np.int32)
    indptr[0] = 0
    np.cumsum(counts, out=indptr[1:n + 1])
    indptr[n + 1:] = np.arange(indptr[n] + 1, indptr[n] + pad + 1, dtype=np.int32)
    last = np.ones(bs, dtype=np.int32)
    last[:n] = kv - (num_pages - 1) * ps
    return indptr, indices, last, kv


def decode_layout(kv_lens: Sequence[int], tables: Sequence[Sequence[int]], page_size: int, bs: int,
                  scratch_page: int, cache: PageIndexCache,
                  starts: Sequence[int] | None = None) -> tuple[Tensor, Tensor, Tensor] | None:
    """One decode step's CSR page layout padded to `bs` rows: (kv_indptr [bs+1], kv_indices, and
    last_page_len [bs]), int32 CPU tensors. Row i reads pages tables[i][:ceil(kv_lens[i] / page_size)]
    (from page starts[i] on, when given: Hydragen's own parts); padding rows read one scratch page
    with one position. Raises ValueError for a table too short; None when a row's start is at or
    past its last page (it would read nothing)."""
    arrays = decode_arrays(kv_lens, tables, page_size, bs, scratch_page, cache, starts)
    if arrays is None:
        return None
    indptr, indices, last, _ = arrays
    return torch.from_numpy(indptr), torch.from_numpy(indices), torch.from_numpy(last)


@dataclass(frozen=True, slots=True)
class PagedLayout:
    """Rows' page tables as host int32 CSR arrays (what flashinfer's plan() takes)."""

    q_lens: Tensor             # [n]
    kv_lens: Tensor            # [n]
    qo_indptr: Tensor          # [n + 1]
    kv_indptr: Tensor          # [n + 1], in pages
    kv_indices: Tensor         # [kv_indptr[-1]] page ids
    last_page_len: Tensor      # [n], 1..page_size


_Q_LEN, _START_POS, _PAGE_IDS = (operator.attrgetter(name) for name in ("q_len", "start_pos", "page_ids"))


def paged_layout(seqs: Sequence["SeqAttn"], page_size: int, cache: PageIndexCache | None = None) -> PagedLayout:
    """CSR layout of an eager step's rows (each reads pages 0..ceil(kv_len / page_size)-1 of its
    table), by whole-array arithmetic: the only per-row Python is a few C-level map()s and the
    table join, which `cache` makes from the last call's where the rows are the same (the per-row
    loop it replaced cost milliseconds on every mixed prefill step of a large batch:
    docs/benchmarks.md, "The eager step's per-row Python"). Raises ValueError for a table too short."""
    n = len(seqs)
    ps = page_size
    q_lens = np.fromiter(map(_Q_LEN, seqs), dtype=np.int64, count=n)
    kv_lens = np.fromiter(map(_START_POS, seqs), dtype=np.int64, count=n) + q_lens
    tables = list(map(_PAGE_IDS, seqs))
    num_pages = _pages_needed(kv_lens, tables, ps)
    indices = (cache if cache is not None else PageIndexCache()).join(tables, num_pages)
    return PagedLayout(q_lens=_int32(q_lens), kv_lens=_int32(kv_lens), qo_indptr=_indptr(q_lens),
                       kv_indptr=_indptr(num_pages), kv_indices=torch.from_numpy(indices),
                       last_page_len=_int32(kv_lens - (num_pages - 1) * ps))


def _int32(values: np.ndarray) -> Tensor:
    return torch.from_numpy(values.astype(np.int32))


def _indptr(lengths: np.ndarray) -> Tensor:
    out = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=out[1:])
    return torch.from_numpy(out)


__all__ = ["PageIndexCache", "PagedLayout", "decode_arrays", "decode_layout", "paged_layout"]
