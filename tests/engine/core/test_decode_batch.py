"""The decode batch kept across steps (core/decode_batch.py): its next step's columns, its growth
and when it gives up, and, over the random scheduler workloads, plans equal to walking the sequences."""

from __future__ import annotations

import pytest

from tokabatch.engine.api import Priority, SamplingParams
from tokabatch.engine.core.decode_batch import DecodeBatch
from tokabatch.engine.core.hydragen import GroupingParams
from tokabatch.engine.core.plan import DecodeWorks
from tokabatch.engine.core.request import Sequence, SeqStatus

from tests.engine.core.driver import Driver, make_scheduler, request
from tests.engine.core.test_scheduler_random import random_workload, run_random


def sequence(seq_id: int, pages: tuple[int, ...], max_len: int = 100) -> Sequence:
    return Sequence(seq_id=seq_id, request_id=f"r{seq_id}", choice_index=0, prompt_ids=(1, 2, 3),
                    sampling=SamplingParams(), priority=Priority.BATCH, arrival=seq_id, max_len=max_len,
                    status=SeqStatus.RUNNING, page_ids=pages)


def batch_of(seqs: list[Sequence], starts: list[int], page_size: int = 4) -> tuple[DecodeBatch, DecodeWorks]:
    works = DecodeWorks([s.seq_id for s in seqs], [7] * len(seqs), starts, [s.page_ids for s in seqs])
    return DecodeBatch(seqs, works, page_size), works


def test_the_next_step_runs_one_position_further_with_the_tokens_drawn():
    seqs = [sequence(0, (10, 11)), sequence(1, (20, 21))]
    batch, planned = batch_of(seqs, [4, 5])
    assert batch.next_decodes(lambda: None) is None             # the planned step has not run yet
    batch.advance(planned, [8, 9])
    works, grown = batch.next_decodes(lambda: pytest.fail("no row needs a page"))
    assert (works.seq_ids, works.token_ids, works.start_pos, works.page_ids) == \
        ([0, 1], [8, 9], [5, 6], [(10, 11), (20, 21)])
    assert grown == {}
    assert batch.next_decodes(lambda: None) is None             # once per applied step


def test_a_row_past_its_pages_grows_one_and_says_from_what():
    seqs = [sequence(0, (10, 11)), sequence(1, (20,))]
    batch, planned = batch_of(seqs, [5, 3])                     # row 1's next position, 4, needs page 2
    batch.advance(planned, [8, 9])
    pages = iter([30])
    works, grown = batch.next_decodes(lambda: next(pages))
    assert works.page_ids == [(10, 11), (20, 30)] and seqs[1].page_ids == (20, 30)
    assert grown == {1: (20,)}
    assert planned.page_ids == [(10, 11), (20,)]                 # the last plan's columns are not touched


def test_it_gives_up_at_max_len_or_without_pages():
    at_limit = [sequence(0, (10, 11), max_len=7)]
    batch, planned = batch_of(at_limit, [5])                     # next: 7 tokens, its max_len
    batch.advance(planned, [8])
    assert batch.next_decodes(lambda: pytest.fail("no growth at max_len")) is None
    short = [sequence(0, (10,))]
    batch, planned = batch_of(short, [3])
    batch.advance(planned, [8])
    assert batch.next_decodes(lambda: None) is None              # the scheduler walks, and preempts


def test_steady_steps_come_from_the_batch():
    """A scheduler with every sequence decoding plans from its batch, without walking the sequences
    (that its plans equal the walk's is the test below)."""
    sched = make_scheduler(num_pages=64, page_size=2, max_seqs=4, max_tokens_per_step=16)
    driver = Driver(sched)
    for i in range(3):
        driver.add(request(f"r{i}", [1, 2, i], max_tokens=12), 12)
    walks = []
    original = sched._walk_decodes
    sched._walk_decodes = lambda: walks.append(sched._step_idx) or original()
    plans = [driver.step() for _ in range(10)]
    assert len(walks) < 4, "the steady steps should come from the batch"
    steady = [plan for plan in plans if plan.step_idx not in walks]
    assert steady and all(len(plan.decodes) == 3 and not plan.prefills for plan in steady)


@pytest.mark.parametrize("hydragen", [None, GroupingParams(min_prefix_tokens=2, min_group=2, call_cost_tokens=0,
                                                           merge_cost_tokens=0)], ids=["plain", "grouped"])
def test_random_workloads_plan_the_same_with_and_without_the_batch(monkeypatch, hydragen):
    """Every plan of the random workloads (preemption, aborts of finished choices, prefix-cache
    swaps, growth) equals the plan the scheduler makes walking the sequences every step."""
    next_decodes = DecodeBatch.next_decodes

    def plans(seed: int, batch: bool) -> tuple[list[str], int]:
        driver = random_workload(seed, hydragen=hydragen)
        sched = driver.scheduler
        seen, steady = [], 0
        schedule = sched.schedule

        def record() -> object:
            plan = schedule()
            seen.append(repr(plan))
            return plan

        def counted(self, allocate):
            nonlocal steady
            result = next_decodes(self, allocate) if batch else None
            steady += result is not None
            return result
        sched.schedule = record
        monkeypatch.setattr(DecodeBatch, "next_decodes", counted)
        run_random(driver)
        return seen, steady

    steady_steps = 0
    for seed in range(60):
        with_batch, steady = plans(seed, True)
        walking, _ = plans(seed, False)
        assert with_batch == walking, f"seed {seed}: a plan differs"
        steady_steps += steady
    assert steady_steps > 100, "the workloads should have steady steps"
