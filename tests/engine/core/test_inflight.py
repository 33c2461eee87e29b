"""Sequences sharing a prefix that is being computed wait for its pages instead of recomputing them
(inflight.py and Scheduler._deferred): the prefix runs once, the rest are cache hits, nothing hangs."""

from __future__ import annotations

import random

from tokabatch.engine.api import Priority
from tokabatch.engine.core.inflight import InflightPages, chain_keys
from tokabatch.engine.core.request import SeqStatus

from tests.engine.core.driver import Driver, make_scheduler, request

PREFIX = [random.Random(7).randrange(50) for _ in range(100)]     # 100 tokens: 25 pages of 4


def prefill_tokens(plans, seq_id: int | None = None) -> int:
    return sum(w.num_tokens for p in plans for w in p.prefills if seq_id is None or w.seq_id == seq_id)


def run_until_done(driver: Driver, limit: int = 1000) -> list:
    plans = []
    while driver.scheduler.has_work():
        plans.append(driver.step())
        assert len(plans) < limit, "no progress"
    return plans


def check_outputs(driver: Driver, seq_ids: list[int]) -> None:
    for s in seq_ids:
        seq = driver.scheduler.sequence(s)
        assert seq.status is SeqStatus.FINISHED and seq.output_ids == driver.expected_output(seq)


def shared_requests(driver: Driver, k: int, *, suffix: int = 3, max_tokens: int = 4, **kw) -> list[int]:
    seq_ids = []
    for i in range(k):
        tail = [50 + i] * suffix                 # distinct from every other line's tail
        seq_ids += driver.add(request(f"r{i}", PREFIX + tail, max_tokens=max_tokens, **kw), max_tokens)
    return seq_ids


def test_chain_keys_follow_the_whole_prefix() -> None:
    a = chain_keys((1, 2, 3, 4, 5), 2)
    assert len(a) == 2 and a == chain_keys((1, 2, 3, 4), 2)
    assert chain_keys((9, 9, 3, 4), 2)[1] != a[1]       # same page tokens, different prefix


def test_registry_counts_publish_and_drop() -> None:
    reg = InflightPages()
    reg.register(1, [10, 11, 12], first_page=2)
    reg.register(2, [11], first_page=3)
    reg.published(1, 4)                        # pages 2 and 3 of sequence 1 are in the tree
    assert 10 not in reg and 11 in reg and 12 in reg
    reg.check({1: 4, 2: 3})
    reg.drop(1)
    reg.drop(2)
    assert len(reg) == 0
    reg.check({})


def test_k_sharing_requests_compute_the_prefix_once() -> None:
    k = 6
    sched = make_scheduler(num_pages=256, page_size=4, max_seqs=8, max_tokens_per_step=1024)
    d = Driver(sched, vocab=50)
    seq_ids = shared_requests(d, k)
    plans = run_until_done(d)
    # The first prefills all 103 tokens; the others take the 25 prefix pages by reference.
    assert prefill_tokens(plans) == 100 + k * 3 <= 100 + k * (3 + 1)
    assert [w.seq_id for w in plans[0].prefills] == [seq_ids[0]]
    cached = [sched.sequence(s).num_cached_tokens for s in seq_ids]
    assert cached == [0] + [100] * (k - 1)
    assert sched.num_cached_tokens == 100 * (k - 1)
    check_outputs(d, seq_ids)


def test_chunked_prefix_is_waited_for_page_by_page() -> None:
    """With a 32-token budget the first prefill takes 4 steps; the others wait for all of it."""
    k = 4
    sched = make_scheduler(num_pages=256, page_size=4, max_seqs=8, max_tokens_per_step=32)
    d = Driver(sched, vocab=50)
    seq_ids = shared_requests(d, k)
    plans = run_until_done(d)
    assert prefill_tokens(plans) == 100 + k * 3
    assert [sched.sequence(s).num_cached_tokens for s in seq_ids] == [0] + [100] * (k - 1)
    check_outputs(d, seq_ids)


def test_deferred_sequence_does_not_block_the_queue() -> None:
    sched = make_scheduler(num_pages=256, page_size=4, max_seqs=8, max_tokens_per_step=1024)
    d = Driver(sched, vocab=50)
    a, b = shared_requests(d, 2)
    [c] = d.add(request("c", [1, 2, 3, 4, 5, 6, 7], max_tokens=4), 4)
    plan = d.step()
    assert [w.seq_id for w in plan.prefills] == [a, c]       # b waits for a's pages; c does not
    plans = [plan] + run_until_done(d)
    assert prefill_tokens(plans, b) == 3 and sched.sequence(b).num_cached_tokens == 100
    check_outputs(d, [a, b, c])


def test_prompt_logprobs_sequence_is_not_deferred() -> None:
    sched = make_scheduler(num_pages=256, page_size=4, max_seqs=8, max_tokens_per_step=1024)
    d = Driver(sched, vocab=50)
    [a] = shared_requests(d, 1)
    [b] = d.add(request("b", PREFIX + [60], max_tokens=2, prompt_logprobs=1), 2)
    plan = d.step()
    assert [w.seq_id for w in plan.prefills] == [a, b]       # it never takes hits: no reason to wait
    run_until_done(d)
    check_outputs(d, [a, b])


def test_online_request_waits_for_a_running_batch_prefill() -> None:
    """Documented choice: an ONLINE sequence defers too (waiting beats recomputing next to it)."""
    sched = make_scheduler(num_pages=256, page_size=4, max_seqs=8, max_tokens_per_step=32)
    d = Driver(sched, vocab=50)
    [a] = shared_requests(d, 1)
    d.step()                                  # a has published 8 of the 25 prefix pages
    [o] = d.add(request("o", PREFIX + [61, 62], max_tokens=3, priority=Priority.ONLINE), 3)
    plans = run_until_done(d)
    assert prefill_tokens(plans, o) == 2 and sched.sequence(o).num_cached_tokens == 100
    check_outputs(d, [a, o])


def _start_and_interrupt(stop, next_seq: int) -> tuple[Driver, list[int], list]:
    sched = make_scheduler(num_pages=256, page_size=4, max_seqs=8, max_tokens_per_step=32)
    d = Driver(sched, vocab=50)
    seq_ids = shared_requests(d, 3)
    plans = [d.step()]
    assert [w.seq_id for w in plans[0].prefills] == [seq_ids[0]]
    assert sched.sequence(seq_ids[0]).num_published_pages == 8
    stop(sched, sched.sequence(seq_ids[0]))
    sched.check_invariants()
    assert len(sched._inflight) == 0          # its in-flight pages are gone with it
    plans.append(d.step())
    # The first waiting sequence is admitted at once, with the 8 published pages as hits.
    assert [(w.seq_id, w.start_pos) for w in plans[-1].prefills] == [(seq_ids[next_seq], 32)]
    plans += run_until_done(d)
    return d, seq_ids, plans


def test_abort_of_the_computing_sequence_releases_the_deferred_ones() -> None:
    d, seq_ids, _ = _start_and_interrupt(lambda sched, seq: sched.abort_request(seq.request_id), 1)
    assert d.scheduler.sequence(seq_ids[1]).num_cached_tokens == 32
    assert d.scheduler.sequence(seq_ids[2]).num_cached_tokens == 100
    check_outputs(d, seq_ids[1:])


def test_preemption_of_the_computing_sequence_releases_the_deferred_ones() -> None:
    # The scheduler preempts inside schedule(); between steps is the same state for the queue.
    # The preempted sequence goes back to the front, so it is the one admitted next (on its own
    # published pages) and the others wait for it again: the prefix still runs once in all.
    d, seq_ids, plans = _start_and_interrupt(lambda sched, seq: sched._preempt(seq), 0)
    assert d.scheduler.sequence(seq_ids[0]).num_preemptions == 1
    assert prefill_tokens(plans) == 100 + 3 * 3
    assert [d.scheduler.sequence(s).num_cached_tokens for s in seq_ids] == [0, 100, 100]
    check_outputs(d, seq_ids)


def test_cache_off_admits_sharing_requests_together() -> None:
    sched = make_scheduler(num_pages=256, page_size=4, max_seqs=8, max_tokens_per_step=1024,
                           enable_prefix_cache=False)
    d = Driver(sched, vocab=50)
    seq_ids = shared_requests(d, 3)
    plans = run_until_done(d)
    assert [w.seq_id for w in plans[0].prefills] == seq_ids
    assert prefill_tokens(plans) == 3 * 103
    check_outputs(d, seq_ids)


def test_the_choices_of_a_request_share_their_prompt_lookups() -> None:
    """The n choices of one request hold one prompt tuple: the waiting queue hashes its pages once
    (chain keys) and looks the prefix tree up once per admission pass, and the answers are the ones
    each choice would get alone."""
    sched = make_scheduler(num_pages=256, page_size=4, max_seqs=32)
    driver = Driver(sched)
    cached = driver.add(request("warm", PREFIX, max_tokens=1), 1)
    run_until_done(driver)
    assert sched.sequence(cached[0]).status is SeqStatus.FINISHED
    seq_ids = driver.add(request("r", PREFIX + [60, 61, 62], max_tokens=4, n=8), 4)
    calls = []
    match = sched.pool.match
    sched.pool.match = lambda *a: calls.append(a) or match(*a)
    keys_of: dict[int, list[int]] = {}
    found = list(sched._waiting.candidates(sched._seqs, 32, keys_of))
    assert [s.seq_id for s, _ in found] == seq_ids and len(calls) == 1
    want_hits = match(PREFIX + [60, 61], (len(PREFIX) + 2) // 4)
    assert all(hits == want_hits for _, hits in found) and len(want_hits) == len(PREFIX) // 4
    want_keys = chain_keys(tuple(PREFIX + [60, 61, 62]), 4)
    assert all(keys_of[s] == want_keys for s in seq_ids)
    assert len({id(keys_of[s]) for s in seq_ids}) == 1, "one computation shared by the choices"
