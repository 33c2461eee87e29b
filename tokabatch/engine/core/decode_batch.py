"""The decode batch kept across steps: while every running sequence decodes and none joins or
leaves, the scheduler plans the next step from the last one's columns instead of walking the
sequences.

Owns `DecodeBatch`: the rows of a plan whose only work was every running sequence's decode, in
plan order (seq ids, page tables, the page room each table gives, each sequence's max_len), and,
once that plan's tokens are applied, the positions and tokens the next step runs. A step from it
is `next_decodes`: C-level maps over the columns find the rows that must grow a page (allocated
here) and any row at its max_len (the caller then walks the sequences, which raises for it). The
scheduler drops the batch whenever the running set or a page table changes otherwise (a sequence
admitted, ended or preempted, a page swapped for the prefix tree's copy), and builds it again from
the next plan that qualifies. benchmarks/step_overhead.py measures it; `--digest` checks that the
plans and outputs stay the same. Pure stdlib: must not import torch.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from itertools import compress, repeat

from tokabatch.engine.core.plan import DecodeWorks
from tokabatch.engine.core.request import Sequence


class DecodeBatch:
    """One plan's decode rows (every running sequence, in plan order), carried to the next step."""

    __slots__ = ("seqs", "seq_ids", "tables", "rooms", "max_lens", "starts", "tokens", "page_size")

    def __init__(self, seqs: list[Sequence], works: DecodeWorks, page_size: int) -> None:
        self.seqs = seqs
        self.seq_ids = works.seq_ids
        self.tables = works.page_ids
        self.page_size = page_size
        self.rooms = [len(t) * page_size for t in works.page_ids]     # positions each table holds
        self.max_lens = [s.max_len for s in seqs]
        # The next step's positions and tokens, set by `advance` when the plan's tokens are applied.
        self.starts: list[int] | None = None
        self.tokens: list[int] = []

    def advance(self, planned: DecodeWorks, tokens: list[int]) -> None:
        """The planned step ran: row i's next position is one past the one it ran, and its next
        token is tokens[i]."""
        self.starts = list(map(operator.add, planned.start_pos, repeat(1)))
        self.tokens = tokens

    def next_decodes(self, allocate: Callable[[], int | None]) -> tuple[DecodeWorks, dict[int, tuple[int, ...]]] | None:
        """The next step's decode columns and the rows grown (row -> table before its new page), or
        None when the sequences must be walked: not advanced yet, a row at its max_len, or a row
        that needs a page the pool does not give (rows grown before it keep their pages)."""
        starts = self.starts
        if starts is None:
            return None
        num_tokens = list(map(operator.add, starts, repeat(1)))
        if any(map(operator.ge, num_tokens, self.max_lens)):
            return None
        grown: dict[int, tuple[int, ...]] = {}
        short = list(compress(range(len(starts)), map(operator.gt, num_tokens, self.rooms)))
        if short:
            tables, rooms, ps = list(self.tables), self.rooms, self.page_size
            for i in short:
                seq = self.seqs[i]
                page = allocate() if num_tokens[i] <= rooms[i] + ps else None
                if page is None:
                    return None
                grown[i] = seq.page_ids
                seq.page_ids += (page,)
                tables[i] = seq.page_ids
                rooms[i] += ps
            self.tables = tables
        self.starts = None                   # (until this step's tokens are applied)
        return DecodeWorks(self.seq_ids, self.tokens, starts, self.tables), grown


__all__ = ["DecodeBatch"]
