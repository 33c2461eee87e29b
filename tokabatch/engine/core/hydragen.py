"""Hydragen group detection: which decoding sequences attend to a shared prefix together.

Owns the choice of `PrefixGroup`s for one decode step and the "KV reads saved" metric. Pure
stdlib (runs every step inside the scheduler): must not import torch or the runtime.

Input: each decoding sequence's *shareable* page table, i.e. the full pages before the page its
current token is written to. Sequences that share a prefix share the same physical page ids
(the prefix tree of engine/core/pages.py), so "share k pages" means "equal first k page ids".

The model
---------
Think of the tables as a trie of pages. A group ends at a trie node w (depth h pages) and starts
where the nearest chosen ancestor group ends (depth d; 0 at the top). Its members are every
sequence passing through w; it covers pages d..h-1 of each member. So every sequence's groups
tile its first pages consecutively, and what follows the last group is its own part. A group is
allowed when

    members >= min_group  and  (h - d) * page_size >= min_prefix_tokens,

and it *pays* when its score is positive:

    score = (members - 1) * tokens  -  call_cost_tokens  -  merge_cost_tokens * members

(members - 1) * tokens is the KV reads the group saves (the prefix is read once instead of once
per member); call_cost_tokens prices the extra attention call (launch, tile under-use) and
merge_cost_tokens the per-member merge of one more (out, lse) part, both in KV-token reads. The
same rule prices a top-level group and a nested one. Among allowed sets of groups we return one
of maximum total score (a small dynamic programme over the compressed trie, below).

Group ends are restricted to nodes where the member set changes (the trie branches, or a table
ends): extending a group down a chain with the same members only saves more for the same cost.
(The one thing this gives up: cutting a chain early so a nested group below clears
min_prefix_tokens. Rare, and the tests' brute force uses the same rule.)

Worked example (page_size 16, min_prefix 256, min_group 16, call cost 2048, merge cost 4):
64 sequences share a 1024-token system prompt (64 pages); 20 of them go on to share a 512-token
few-shot block (32 more pages); the rest diverge at once.
  - Top group, pages 0..63, 64 members: 63 * 1024 - 2048 - 4 * 64 = 62208 > 0: pays.
  - Nested group, pages 64..95, 20 members: 19 * 512 - 2048 - 4 * 20 = 7600 > 0: pays.
  - Instead one group of the 20 over pages 0..95 and one of the other 44 over 0..63 would score
    19 * 1536 + 43 * 1024 - 2 * 2048 - 4 * 64 = 73216 - 4352 = 68864 < 62208 + 7600 = 69808
    (and is not even in the model: the nested form always reads the system prompt once, not twice).
  - Had only 5 shared the few-shot block (min_group 4): 4 * 512 - 2048 - 20 = -20: no nested
    group; those 5 read their few-shot pages in their own part.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from itertools import chain, compress, repeat
from typing import Callable, Iterable, Mapping, Sequence

from tokabatch.engine.core.plan import DecodeWorks, PrefixGroup, SeqWork


@dataclass(frozen=True, slots=True)
class GroupingParams:
    min_prefix_tokens: int = 256         # a group covers at least this many tokens (whole pages)
    min_group: int = 16                  # ... of at least this many sequences
    call_cost_tokens: int = 2048         # price of one more attention call, in KV-token reads
    merge_cost_tokens: int = 4           # price of merging one more part, per member

    def __post_init__(self) -> None:
        if self.min_prefix_tokens < 1 or self.min_group < 1:
            raise ValueError(f"Hydragen needs min_prefix_tokens >= 1 and min_group >= 1 "
                              f"(got {self.min_prefix_tokens}, {self.min_group})")
        if self.call_cost_tokens < 0 or self.merge_cost_tokens < 0:
            raise ValueError("Hydragen costs must be non-negative")


def group_score(num_members: int, num_tokens: int, params: GroupingParams) -> int:
    """KV-token reads a group saves, minus what its extra call and merges cost (see module doc)."""
    return ((num_members - 1) * num_tokens - params.call_cost_tokens
            - params.merge_cost_tokens * num_members)


@dataclass(slots=True)
class _Node:
    """A trie node where the member set changes: `members` (row indices) share `depth` pages."""

    depth: int
    members: list[int]
    parent: _Node | None
    children: list[_Node] = field(default_factory=list)
    # DP: for each depth d of the nearest chosen ancestor, (best score of this subtree, take this node?)
    best: dict[int, tuple[int, bool]] = field(default_factory=dict)


def _common_pages(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two page tables (binary search on C-speed slice compares)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n                        # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _shared_depth(tables: list[tuple[int, ...]], members: list[int], known: int) -> int:
    """Pages all `members` share, given that they share the first `known`. One slice compare per
    member in the usual case (it agrees with the first member up to the depth found so far)."""
    first = tables[members[0]]
    depth = len(first)
    for i in members[1:]:
        t = tables[i]
        if t[known:depth] != first[known:depth]:
            depth = known + _common_pages(first[known:depth], t[known:depth])
    return depth


def _build_tree(tables: list[tuple[int, ...]], min_group: int) -> _Node:
    """The compressed trie over the tables, keeping only nodes with >= min_group members.

    Each node splits its members by the page after their shared prefix (dict buckets, no sort);
    tables that end there stay in the node only. Iterative: the depth can reach the batch size.
    """
    everyone = list(range(len(tables)))
    root = _Node(depth=_shared_depth(tables, everyone, 0), members=everyone, parent=None)
    stack = [root]
    while stack:
        node = stack.pop()
        h = node.depth
        buckets: dict[int, list[int]] = {}
        for i in node.members:
            t = tables[i]
            if len(t) > h:
                buckets.setdefault(t[h], []).append(i)
        for members in buckets.values():
            if len(members) >= min_group:
                child = _Node(depth=_shared_depth(tables, members, h + 1), members=members, parent=node)
                node.children.append(child)
                stack.append(child)
    return root


def _postorder(root: _Node) -> list[_Node]:
    order, stack = [], [root]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(node.children)
    return order[::-1]


def _solve(root: _Node, page_size: int, params: GroupingParams) -> None:
    """Fill node.best[d] for every possible nearest-chosen-ancestor depth d, children first.

    best[d] = max(skip: sum of children's best[d],
                  take (if allowed and paying): score of pages d..depth + sum of children's best[depth]).
    """
    for node in _postorder(root):
        ancestors, up = {0}, node.parent
        while up is not None:
            ancestors.add(up.depth)
            up = up.parent
        members = len(node.members)
        below_if_taken = sum(c.best[node.depth][0] for c in node.children)
        for d in ancestors:
            if d > node.depth:
                continue                 # cannot happen for a real ancestor; keeps the dict small
            skip = sum(c.best[d][0] for c in node.children)
            tokens = (node.depth - d) * page_size
            score = group_score(members, tokens, params)
            if members >= params.min_group and tokens >= params.min_prefix_tokens and score > 0 \
                    and score + below_if_taken > skip:
                node.best[d] = (score + below_if_taken, True)
            else:
                node.best[d] = (skip, False)


def find_prefix_groups(page_tables: Mapping[int, Sequence[int]], page_size: int,
                       params: GroupingParams = GroupingParams()) -> tuple[PrefixGroup, ...]:
    """Groups of maximum total score among `page_tables` (seq_id -> shareable page ids).

    Returns groups ordered longest prefix first (by end page, descending); members sorted by id.
    Each sequence's groups cover consecutive page ranges from page 0.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1 (got {page_size})")
    if len(page_tables) < max(2, params.min_group):
        return ()
    seq_ids = list(page_tables)
    tables = [tuple(page_tables[s]) for s in seq_ids]
    root = _build_tree(tables, params.min_group)
    _solve(root, page_size, params)
    groups: list[PrefixGroup] = []
    todo = [(root, 0)]
    while todo:
        node, d = todo.pop()
        taken = node.best[d][1]
        if taken:
            groups.append(PrefixGroup(
                seq_ids=tuple(sorted(seq_ids[i] for i in node.members)),
                page_ids=tables[node.members[0]][d:node.depth],
                num_tokens=(node.depth - d) * page_size,
                start_page=d))
        todo.extend((c, node.depth if taken else d) for c in node.children)
    groups.sort(key=lambda g: (-(g.start_page + len(g.page_ids)), g.start_page, g.seq_ids))
    return tuple(groups)


def shareable_pages(work: SeqWork, page_size: int) -> tuple[int, ...]:
    """A decode's full pages before the one its current token (position start_pos) is written to."""
    return work.page_ids[:work.start_pos // page_size]


def find_decode_groups(decodes: Sequence[SeqWork], page_size: int,
                       params: GroupingParams = GroupingParams()) -> tuple[PrefixGroup, ...]:
    """`find_prefix_groups` over a step's decodes (what the scheduler puts in StepPlan.prefix_groups)."""
    return find_prefix_groups({w.seq_id: shareable_pages(w, page_size) for w in decodes},
                              page_size, params)


class DecodeGroupCache:
    """`find_decode_groups` step after step, answered from the previous step when it cannot differ.

    Between two steps the decoding sequences' shareable tables usually change only by growing a
    page (each sequence once every page_size steps). A page held by one sequence alone (refcount
    1) is in no other table, so appending it to one table creates no trie node of min_group >= 2
    members and moves no node's shared depth (its other members lack the page): the compressed
    trie, and so the groups, stay the same. Anything else recomputes: the decoding sequences or
    their order change, a table changes otherwise (a page swapped for the prefix tree's copy), a
    grown page is shared, or min_group is 1. The rows whose table object and shareable count are the
    last step's (all but about one in page_size) are passed over by C-level map()s, and the rest
    are checked by C-level map()s too (all of them at once where a wave's samples grow together):
    at thousands of sequences this is most of a step's grouping work saved.
    """

    def __init__(self, page_size: int, params: GroupingParams) -> None:
        self.page_size = page_size
        self.params = params
        # The last step's rows: seq_ids, page tables and shareable page counts, in row order.
        self._seq_ids: list[int] | None = None
        self._tables: list[tuple[int, ...]] = []
        self._shareable: list[int] = []
        self._groups: tuple[PrefixGroup, ...] = ()
        self.num_recomputed = 0

    def groups(self, decodes: DecodeWorks, cached: Sequence[SeqWork], refcount: Callable[[int], int],
               grown: Mapping[int, tuple[int, ...]] | None = None) -> tuple[PrefixGroup, ...]:
        """The groups of the rows `decodes` and then `cached` (the whole-sequence cache hits that
        rerun one token: what find_decode_groups returns for them); `refcount` is the page pool's.
        `grown`: rows whose table is the tuple given plus pages appended since (the scheduler's
        growth this step); where that tuple is the last step's table, its pages are not compared."""
        seq_ids, tables, starts = decodes.seq_ids, decodes.page_ids, decodes.start_pos
        if cached:
            seq_ids = seq_ids + [w.seq_id for w in cached]
            tables = tables + [w.page_ids for w in cached]
            starts = starts + [w.start_pos for w in cached]
        ps = self.page_size
        shareable = list(map(operator.floordiv, starts, repeat(ps)))
        if not self._unchanged(seq_ids, tables, shareable, refcount, grown or {}):
            self._groups = find_prefix_groups({s: t[:n] for s, t, n in zip(seq_ids, tables, shareable)},
                                              ps, self.params)
            self.num_recomputed += 1
        self._seq_ids, self._tables, self._shareable = seq_ids, tables, shareable
        return self._groups

    def _unchanged(self, seq_ids: list[int], tables: list[tuple[int, ...]], shareable: list[int],
                   refcount: Callable[[int], int], grown: Mapping[int, tuple[int, ...]]) -> bool:
        if seq_ids != self._seq_ids or self.params.min_group < 2:
            return False
        old_tables, old_shareable = self._tables, self._shareable
        moved = list(compress(range(len(tables)), map(operator.or_, map(operator.is_not, tables, old_tables),
                                                        map(operator.ne, shareable, old_shareable))))
        if not moved:
            return True
        # The moved rows (all of them where a wave's samples gain a page together), by C-level map()s.
        num_old = [old_shareable[i] for i in moved]
        num_new = [shareable[i] for i in moved]
        if any(map(operator.lt, num_new, num_old)):
            return False
        new = [tables[i] for i in moved]
        old = [old_tables[i] for i in moved]
        # Rows grown from their last table keep its pages; the others' kept pages are compared.
        unknown = list(compress(range(len(moved)), map(operator.is_not, map(grown.get, moved), old)))
        if unknown:
            kept = [slice(num_old[k]) for k in unknown]
            if not all(map(operator.eq, map(operator.getitem, [new[k] for k in unknown], kept),
                           map(operator.getitem, [old[k] for k in unknown], kept))):
                return False
        newly_shareable = chain.from_iterable(map(operator.getitem, new, map(slice, num_old, num_new)))
        return all(map(operator.eq, map(refcount, newly_shareable), repeat(1)))


def kv_reads_saved(groups: Iterable[PrefixGroup]) -> int:
    """KV-token reads the groups save in one step: each group's prefix is read once, not per member."""
    return sum((len(g.seq_ids) - 1) * g.num_tokens for g in groups)


def kv_reads_saved_fraction(groups: Iterable[PrefixGroup], context_lens: Iterable[int]) -> float:
    """The sharing fraction for /metrics: saved reads over the reads of ungrouped decode attention
    (sum of the decoding sequences' context lengths, current token included). 0.0 with no decodes."""
    total = sum(context_lens)
    return kv_reads_saved(groups) / total if total else 0.0
