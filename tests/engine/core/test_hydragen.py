"""Hydragen group detection against a brute-force search, a greedy reference and its invariants."""

from __future__ import annotations

import itertools
import random
import sys

import pytest

from tokabatch.engine.core.hydragen import (DecodeGroupCache, GroupingParams, find_decode_groups,
                                            find_prefix_groups, group_score, kv_reads_saved,
                                            kv_reads_saved_fraction)
from tokabatch.engine.core.plan import DecodeWorks, PrefixGroup, SeqWork

Tables = dict[int, tuple[int, ...]]


def random_tables(rng: random.Random, num_seqs: int, num_prefixes: int, max_block: int = 3) -> Tables:
    """A random tree of shared prefixes (fresh page ids per block), each sequence a node + private pages."""
    pages = itertools.count(100)
    prefixes: list[tuple[int, ...]] = [()]
    for _ in range(num_prefixes):
        base = rng.choice(prefixes)
        prefixes.append(base + tuple(next(pages) for _ in range(rng.randint(1, max_block))))
    return {seq_id: rng.choice(prefixes) + tuple(next(pages) for _ in range(rng.randint(0, 2)))
            for seq_id in range(num_seqs)}


def members_of(tables: Tables, path: tuple[int, ...]) -> frozenset[int]:
    return frozenset(s for s, t in tables.items() if t[:len(path)] == path)


def candidate_ends(tables: Tables, min_group: int) -> list[tuple[int, ...]]:
    """Every trie path with >= min_group members where the member set changes (branch or table end)."""
    out = []
    for path in {t[:k] for t in tables.values() for k in range(1, len(t) + 1)}:
        members = members_of(tables, path)
        nexts = {tables[s][len(path)] if len(tables[s]) > len(path) else None for s in members}
        if len(members) >= min_group and (None in nexts or len(nexts) > 1):
            out.append(path)
    return out


def brute_force_score(tables: Tables, page_size: int, params: GroupingParams) -> int:
    """Best total score over every subset of candidate group ends (nested under chosen ancestors)."""
    cands = candidate_ends(tables, params.min_group)
    assert len(cands) <= 14, "instance too large for the brute force"
    best = 0
    for r in range(1, len(cands) + 1):
        for subset in itertools.combinations(cands, r):
            total = 0
            for p in subset:
                d = max((len(q) for q in subset if len(q) < len(p) and p[:len(q)] == q), default=0)
                tokens = (len(p) - d) * page_size
                score = group_score(len(members_of(tables, p)), tokens, params)
                if tokens < params.min_prefix_tokens or score <= 0:
                    break
                total += score
            else:
                best = max(best, total)
    return best


def total_score(groups: tuple[PrefixGroup, ...], params: GroupingParams) -> int:
    return sum(group_score(len(g.seq_ids), g.num_tokens, params) for g in groups)


def check_invariants(tables: Tables, page_size: int, params: GroupingParams,
                     groups: tuple[PrefixGroup, ...]) -> None:
    covered: dict[int, list[tuple[int, int]]] = {s: [] for s in tables}
    for g in groups:
        assert len(g.seq_ids) >= params.min_group
        assert g.num_tokens == len(g.page_ids) * page_size >= params.min_prefix_tokens
        assert group_score(len(g.seq_ids), g.num_tokens, params) > 0
        assert list(g.seq_ids) == sorted(set(g.seq_ids))
        for s in g.seq_ids:   # members really share those pages
            assert tables[s][g.start_page:g.start_page + len(g.page_ids)] == g.page_ids
            covered[s].append((g.start_page, g.start_page + len(g.page_ids)))
        # maximal membership: every sequence with the same pages in that range is in the group
        assert set(g.seq_ids) == members_of(tables, tables[g.seq_ids[0]][:g.start_page + len(g.page_ids)])
    for ranges in covered.values():   # consecutive from page 0, never overlapping
        ranges.sort()
        assert all(a == (ranges[i - 1][1] if i else 0) for i, (a, _b) in enumerate(ranges))
    ends = [g.start_page + len(g.page_ids) for g in groups]
    assert ends == sorted(ends, reverse=True), "longest prefix first"


@pytest.mark.parametrize("seed", range(150))
def test_matches_brute_force_on_random_trees(seed: int) -> None:
    rng = random.Random(seed)
    page_size = rng.randint(2, 4)
    tables = random_tables(rng, num_seqs=rng.randint(6, 18), num_prefixes=rng.randint(2, 8))
    params = GroupingParams(min_prefix_tokens=rng.randint(1, 3 * page_size), min_group=rng.randint(2, 4),
                            call_cost_tokens=rng.randint(0, 10), merge_cost_tokens=rng.randint(0, 2))
    groups = find_prefix_groups(tables, page_size, params)
    check_invariants(tables, page_size, params, groups)
    assert total_score(groups, params) == brute_force_score(tables, page_size, params)


def greedy_single_level(tables: Tables, page_size: int, params: GroupingParams) -> set[tuple]:
    """Reference: repeatedly group the remaining sequences under the longest qualifying prefix."""
    left, groups = dict(tables), set()
    while True:
        best = None
        for path in {t[:k] for t in left.values() for k in range(1, len(t) + 1)}:
            members = members_of(left, path)
            tokens = len(path) * page_size
            if (len(members) >= params.min_group and tokens >= params.min_prefix_tokens
                    and group_score(len(members), tokens, params) > 0):
                key = (len(path), len(members))
                if best is None or key > best[0]:
                    best = (key, path, members)
        if best is None:
            return groups
        _key, path, members = best
        groups.add((tuple(sorted(members)), path))
        for s in members:
            del left[s]


@pytest.mark.parametrize("seed", range(40))
def test_single_level_trees_match_greedy_longest_prefix_first(seed: int) -> None:
    rng = random.Random(1000 + seed)
    page_size = rng.randint(2, 4)
    pages = itertools.count(100)
    blocks = [tuple(next(pages) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 4))]
    tables = {s: rng.choice(blocks) + tuple(next(pages) for _ in range(rng.randint(0, 2))) for s in range(30)}
    params = GroupingParams(min_prefix_tokens=rng.randint(1, 3 * page_size), min_group=rng.randint(2, 8),
                            call_cost_tokens=rng.randint(0, 20), merge_cost_tokens=rng.randint(0, 1))
    groups = find_prefix_groups(tables, page_size, params)
    assert {(g.seq_ids, g.page_ids) for g in groups} == greedy_single_level(tables, page_size, params)


@pytest.mark.parametrize("seed", range(40))
def test_never_worse_than_greedy_when_nesting_is_free(seed: int) -> None:
    """With one-page minimum and no costs, nested groups save at least what disjoint greedy ones do."""
    rng = random.Random(2000 + seed)
    page_size = rng.randint(2, 4)
    tables = random_tables(rng, num_seqs=40, num_prefixes=8)
    params = GroupingParams(min_prefix_tokens=page_size, min_group=rng.randint(2, 6),
                            call_cost_tokens=0, merge_cost_tokens=0)
    groups = find_prefix_groups(tables, page_size, params)
    check_invariants(tables, page_size, params, groups)
    greedy = greedy_single_level(tables, page_size, params)
    assert kv_reads_saved(groups) >= sum((len(m) - 1) * len(p) * page_size for m, p in greedy)


def two_level_tables(num_all: int, num_subset: int) -> Tables:
    """Worked example of the module doc: a 64-page system prompt shared by all, then a 32-page
    few-shot block shared by the first num_subset, then private pages."""
    pages = itertools.count(1000)
    system = tuple(range(64))
    fewshot = tuple(range(64, 96))
    return {s: (system + (fewshot if s < num_subset else ()) + tuple(next(pages) for _ in range(1 + s % 3)))
            for s in range(num_all)}


def test_two_level_case_yields_nested_groups() -> None:
    tables = two_level_tables(64, 20)
    groups = find_prefix_groups(tables, 16)
    assert groups == (
        PrefixGroup(seq_ids=tuple(range(20)), page_ids=tuple(range(64, 96)), num_tokens=512, start_page=64),
        PrefixGroup(seq_ids=tuple(range(64)), page_ids=tuple(range(64)), num_tokens=1024, start_page=0),
    )
    assert total_score(groups, GroupingParams()) == 62208 + 7600   # the numbers in the module doc


def test_nested_level_that_does_not_pay_is_left_out() -> None:
    tables = two_level_tables(64, 5)
    params = GroupingParams(min_group=4)
    assert group_score(5, 512, params) == -20
    groups = find_prefix_groups(tables, 16, params)
    assert [(g.start_page, len(g.seq_ids)) for g in groups] == [(0, 64)]


def test_few_sequences_or_short_prefixes_give_no_groups() -> None:
    assert find_prefix_groups(two_level_tables(15, 10), 16) == ()     # below min_group
    short = {s: (1, 2, 3) + (100 + s,) for s in range(32)}           # 48 tokens < 256
    assert find_prefix_groups(short, 16) == ()
    assert find_prefix_groups({}, 16) == ()


def test_deep_chain_of_levels_does_not_recurse() -> None:
    """A member leaves at every page: thousands of trie levels, solved without Python recursion."""
    n = sys.getrecursionlimit() + 200
    tables = {s: tuple(range(s + 1)) for s in range(n)}
    groups = find_prefix_groups(tables, 1, GroupingParams(min_prefix_tokens=1, min_group=2,
                                                          call_cost_tokens=0, merge_cost_tokens=0))
    assert groups and groups[-1].start_page == 0


def test_decode_groups_exclude_the_page_being_written() -> None:
    shared = tuple(range(16))              # 16 full pages of 16 tokens
    decodes = [SeqWork(seq_id=s, token_ids=(5,), start_pos=256 + s % 5, page_ids=shared + (100 + s,),
                       sample=True) for s in range(16)]
    groups = find_decode_groups(decodes, 16)
    assert groups == (PrefixGroup(seq_ids=tuple(range(16)), page_ids=shared, num_tokens=256),)
    # current token at position 255 sits in page 15 itself: only 15 pages are shareable (< 256 tokens)
    at_edge = [SeqWork(seq_id=s, token_ids=(5,), start_pos=255, page_ids=shared, sample=True) for s in range(16)]
    assert find_decode_groups(at_edge, 16) == ()
    context_lens = [w.start_pos + 1 for w in decodes]
    assert kv_reads_saved(groups) == 15 * 256
    assert kv_reads_saved_fraction(groups, context_lens) == pytest.approx(15 * 256 / sum(context_lens))
    assert kv_reads_saved_fraction((), []) == 0.0



def test_the_group_cache_trusts_a_growth_hint_only_for_the_last_steps_table() -> None:
    """Every row grew a page (a wave's samples together): with the scheduler's hint that each new
    table extends the last step's, the groups are kept without comparing pages; a hint naming
    another tuple (the table changed in between: a page swapped) is checked, and a changed
    shared page is seen."""
    params = GroupingParams(min_prefix_tokens=16, min_group=2, call_cost_tokens=0, merge_cost_tokens=0)
    shared = tuple(range(4))
    refcounts = {page: 2 for page in shared}

    def works(tables: list[tuple[int, ...]], start: int) -> DecodeWorks:
        return DecodeWorks([0, 1], [5, 5], [start, start], tables)

    def refcount(page: int) -> int:
        return refcounts.get(page, 1)

    cache = DecodeGroupCache(16, params)
    tables = [shared + (10,), shared + (20,)]
    first = cache.groups(works(tables, 79), (), refcount)
    assert first == (PrefixGroup(seq_ids=(0, 1), page_ids=shared, num_tokens=64),)
    assert cache.num_recomputed == 1
    grown = [tables[0] + (11,), tables[1] + (21,)]        # positions 80: pages 10 and 20 now shareable
    assert cache.groups(works(grown, 80), (), refcount, {0: tables[0], 1: tables[1]}) == first
    assert cache.num_recomputed == 1
    # Row 1's shared page 3 was swapped before it grew: its hint names the swapped tuple, not the
    # last step's, so its pages are compared, and the groups are found again.
    swapped = grown[1][:3] + (30,) + grown[1][4:]
    again = [grown[0] + (12,), swapped + (22,)]
    groups = cache.groups(works(again, 96), (), refcount, {0: grown[0], 1: swapped})
    assert cache.num_recomputed == 2
    assert groups == (PrefixGroup(seq_ids=(0, 1), page_ids=shared[:3], num_tokens=48),)


def test_bad_parameters_are_config_errors() -> None:
    with pytest.raises(ValueError):
        GroupingParams(min_group=0)
    with pytest.raises(ValueError):
        GroupingParams(call_cost_tokens=-1)
    with pytest.raises(ValueError):
        find_prefix_groups({1: (1,)}, 0)


def test_group_detection_does_not_load_torch() -> None:
    import subprocess

    code = "import sys, tokabatch.engine.core.hydragen; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
