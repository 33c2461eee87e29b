"""Page pool (refcounts, prefix tree, LRU leaf-first eviction), the page-use sweep and the predictor."""

from __future__ import annotations

import random

import pytest

from tokabatch.engine.core.admission import Curve, brute_force_peak, peak_page_use
from tokabatch.engine.core.pages import ROOT, PagePool
from tokabatch.engine.core.predictor import LengthPredictor

# ---- page pool ------------------------------------------------------------------------------


def test_allocate_until_empty_then_free() -> None:
    pool = PagePool(3, 2)
    pages = [pool.allocate() for _ in range(3)]
    assert sorted(pages) == [0, 1, 2] and pool.allocate() is None
    pool.check({p: 1 for p in pages})
    pool.decref(pages[1])
    assert pool.num_free == 1 and pool.allocate() == pages[1]


def test_publish_match_and_dedupe() -> None:
    pool = PagePool(8, 2)
    a, b = pool.allocate(), pool.allocate()
    assert pool.publish(ROOT, (1, 2), a) == a
    assert pool.publish(a, (0, 0), b) == b
    assert pool.match((1, 2, 0, 0, 1), 5) == [a, b]
    assert pool.match((1, 2, 0, 1), 5) == [a]            # same first page, different second
    assert pool.match((0, 0, 0, 0), 5) == []             # equal tokens under another parent differ
    assert pool.match((1, 2, 0, 0), 1) == [a]            # max_pages caps the hit
    c = pool.allocate()
    assert pool.publish(ROOT, (1, 2), c) == a            # computed twice: the canonical copy wins
    pool.check({a: 1, b: 1, c: 1})


def test_cached_pages_evicted_leaves_first_lru() -> None:
    pool = PagePool(4, 1)
    x, y, z = pool.allocate(), pool.allocate(), pool.allocate()
    pool.publish(ROOT, (7,), x)
    pool.publish(x, (8,), y)
    pool.publish(ROOT, (9,), z)
    for p in (z, x, y):                                  # release order: z oldest
        pool.decref(p)
    pool.check({})
    assert pool.num_cached == 3 and pool.num_available == 4
    w = pool.allocate()                                  # the free page first
    assert w not in (x, y, z)
    assert pool.allocate() == z                          # then the least recently released leaf
    assert pool.allocate() == y                          # x is not a leaf until y goes
    assert pool.allocate() == x
    assert pool.allocate() is None
    pool.check({w: 1, x: 1, y: 1, z: 1})


def test_match_then_incref_protects_from_eviction() -> None:
    pool = PagePool(2, 1)
    a = pool.allocate()
    pool.publish(ROOT, (5,), a)
    pool.decref(a)
    [hit] = pool.match((5, 6), 1)
    pool.incref(hit)
    b = pool.allocate()
    assert b != a and pool.allocate() is None
    pool.check({a: 1, b: 1})


@pytest.mark.parametrize("seed", range(5))
def test_decref_all_equals_decref_one_by_one(seed: int) -> None:
    """A table released at once (shared pages counted down, the last holder's page freed or cached,
    in the same order) leaves the pool exactly as decref page by page does."""
    def build() -> PagePool:
        rng = random.Random(seed)
        pool = PagePool(40, 1)
        pages = [pool.allocate() for _ in range(30)]
        for i, page in enumerate(pages[:12]):           # a cached chain, the rest unpublished
            pool.publish(pages[i - 1] if i else ROOT, (i,), page)
        for _ in range(40):
            pool.incref(rng.choice(pages))
        return pool

    one_by_one, at_once = build(), build()
    rng = random.Random(seed + 100)
    while True:
        held = [p for p in range(40) if one_by_one.refcount(p) > 0]
        if not held:
            break
        table = rng.sample(held, min(len(held), rng.randint(1, 8)))
        for p in reversed(table):
            one_by_one.decref(p)
        at_once.decref_all(reversed(table))
        assert [one_by_one.refcount(p) for p in range(40)] == [at_once.refcount(p) for p in range(40)]
        assert (one_by_one.num_free, one_by_one.num_cached) == (at_once.num_free, at_once.num_cached)
    assert [one_by_one.allocate() for _ in range(40)] == [at_once.allocate() for _ in range(40)]


def test_check_catches_a_wrong_refcount() -> None:
    pool = PagePool(2, 1)
    a = pool.allocate()
    with pytest.raises(AssertionError, match="refcount"):
        pool.check({a: 2})


# ---- the page-use sweep -------------------------------------------------------------------


def test_worked_example_from_the_docstring() -> None:
    running = [Curve(5, 2, 1), Curve(3, 6, 0)]
    assert peak_page_use(running, [6], 4) == 4
    assert peak_page_use(running + [Curve(6, 5, 0)], [6], 4) == 6


@pytest.mark.parametrize("seed", range(300))
def test_sweep_equals_step_by_step(seed: int) -> None:
    rng = random.Random(seed)
    ps = rng.choice([1, 2, 3, 4, 16])
    curves = []
    for _ in range(rng.randint(0, 8)):
        g = rng.randint(1, 40)
        delay = rng.choice([0, 0, rng.randint(1, 30)])
        curves.append(Curve(g, delay + rng.randint(0, 40), rng.randint(0, (g - 1) // ps), delay))
    ends = [rng.randint(0, 60) for _ in range(rng.randint(0, 5))]
    assert peak_page_use(curves, ends, ps) == brute_force_peak(curves, ends, ps)


# ---- predictor ----------------------------------------------------------------------------


def test_cold_start_predicts_max_tokens() -> None:
    p = LengthPredictor(0.1)
    assert p.predict_output_len(0, 100) == 100
    for n in (10, 10, 10):
        p.observe(n)
    assert p.predict_output_len(0, 100) == 100           # fewer than min_samples


def test_conditional_mean_with_margin() -> None:
    p = LengthPredictor(0.5, min_samples=2)
    for n in (10, 20, 30, 40):
        p.observe(n)
    assert p.predict_output_len(0, 1000) == 38           # mean 25 * 1.5 = 37.5 -> 38
    assert p.predict_output_len(25, 1000) == 53          # mean of 30, 40 = 35 * 1.5 = 52.5 -> 53
    assert p.predict_output_len(35, 1000) == 1000        # one sample above: fall back to max_tokens
    assert p.predict_output_len(0, 30) == 30             # clamped to max_tokens
    assert p.predict_output_len(50, 40) == 51            # at least one more than generated


def test_window_forgets_old_lengths() -> None:
    p = LengthPredictor(0.0, window=4, min_samples=1)
    for n in (100, 100, 100, 100, 2, 2, 2, 2):
        p.observe(n)
    assert p.num_samples == 4 and p.predict_output_len(0, 1000) == 2


def test_capped_lengths_count_as_the_predicted_sequences_max_tokens() -> None:
    """A sample cut by its own max_tokens says "at least that long": it stands for the max_tokens of
    the sequence being predicted, so short jobs do not make a long job's answers look short."""
    p = LengthPredictor(0.0, min_samples=4)
    for _ in range(4):
        p.observe(2, capped=True)
    assert p.num_samples == 4
    assert p.predict_output_len(0, 500) == 500
    assert p.predict_output_len(0, 2) == 2
    p.observe(10)
    p.observe(30)
    assert p.predict_output_len(0, 100) == (4 * 100 + 10 + 30 + 5) // 6      # mean 73.3 -> 74
    assert p.predict_output_len(20, 100) == (4 * 100 + 30 + 4) // 5          # 10 did not survive 20 tokens
    small = LengthPredictor(0.0, window=2, min_samples=1)
    for n, capped in ((5, True), (5, True), (7, False), (9, False)):     # the capped ones leave the window
        small.observe(n, capped=capped)
    assert small.num_samples == 2 and small.predict_output_len(0, 100) == 8


@pytest.mark.parametrize("ignore_eos", [True, False])
def test_short_jobs_before_a_long_one_cause_no_preemption(ignore_eos: bool) -> None:
    """A warm-up of 2-token requests, then 40 requests that run to 48 tokens on a pool that holds ~12
    of them. The warm-up's lengths were fixed (ignore_eos) or cut by their max_tokens: neither may
    teach admission that the long ones end after 3 tokens (it admitted all 40 and preempted)."""
    from tokabatch.engine.api import GenerationRequest, SamplingParams

    from tests.engine.core.driver import Driver, make_scheduler

    driver = Driver(make_scheduler(200, page_size=4, max_seqs=64, max_tokens_per_step=256))

    def add(rid: str, max_tokens: int) -> None:
        prompt = tuple(random.Random(rid).randrange(3) for _ in range(16))
        sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
        driver.add(GenerationRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling), max_tokens)

    for i in range(8):
        add(f"warm{i}", 2)
    driver.run()
    for i in range(40):
        add(f"long{i}", 48)
    driver.run()
    assert len(driver.finished) == 48
    assert driver.scheduler.num_preemptions == 0


def test_only_lengths_text_ended_at_or_was_cut_at_are_learned() -> None:
    """observe_finished: a fixed-length sequence (ignore_eos, no stops) or a prompt-scoring one
    (max_tokens 0) teaches nothing; one cut by its max_tokens is a capped sample."""
    from types import SimpleNamespace

    from tokabatch.engine.api import SamplingParams

    def seq(outputs: int, **sampling) -> SimpleNamespace:
        return SimpleNamespace(output_ids=[7] * outputs, sampling=SamplingParams(**sampling),
                               num_tokens=10 + outputs, max_len=10_000)

    p = LengthPredictor(0.0, min_samples=1)
    p.observe_finished(seq(4, max_tokens=4, ignore_eos=True))
    p.observe_finished(seq(0, max_tokens=0))
    assert p.num_samples == 0
    p.observe_finished(seq(4, max_tokens=4, ignore_eos=True, stop=("x",)))    # a stop could have ended it
    p.observe_finished(seq(3, max_tokens=8))
    assert p.num_samples == 2
    assert p.predict_output_len(0, 100) == (100 + 3 + 1) // 2                 # one capped, one of 3


def test_the_stats_summary_expects_what_the_predictor_predicts_without_margin() -> None:
    """EngineStats carries the predictor's window as three numbers; the service's expectation of a
    fresh sequence's length (dry runs) is then the predictor's own prediction, margin aside."""
    import math

    from tokabatch.engine.api import EngineStats

    p = LengthPredictor(0.0, window=6)
    for n, capped in ((10, False), (30, False), (64, True), (20, False), (5, False), (64, True), (40, False)):
        p.observe(n, capped=capped)          # the window keeps the last 6: the first 10 is forgotten
    ended, tokens, capped = p.summary()
    assert (ended, tokens, capped) == (4, 30 + 20 + 5 + 40, 2)
    stats = EngineStats(num_recent_ended=ended, num_recent_ended_tokens=tokens, num_recent_capped=capped)
    for max_tokens in (50, 100, 1000):
        assert math.ceil(stats.expected_output_tokens(max_tokens, runs_to_max_tokens=False)) == \
            p.predict_output_len(0, max_tokens)
    assert stats.expected_output_tokens(100, runs_to_max_tokens=True) == 100
    assert EngineStats().expected_output_tokens(100, runs_to_max_tokens=False) == 100   # nothing seen yet
