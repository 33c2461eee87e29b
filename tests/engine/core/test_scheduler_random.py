"""Seeded random workloads against the fake model and the brute-force KV store (driver.py).

Page size 2 and a vocabulary of 3 make prefix sharing heavy; a small pool makes preemption common.
Each run checks, after every step: invariants, the token budget and max_seqs, page use within the
pool, that every admission fits under the step-by-step forecast, that every KV read sees the right
prefix, and at the end that every sequence's output equals the fake model's stream exactly (no
token lost or duplicated by preemption) and prompt logprobs were asked for once per position.
"""

from __future__ import annotations

import random

import pytest

from tokabatch.engine.api import Priority
from tokabatch.engine.core.hydragen import GroupingParams
from tokabatch.engine.core.request import SeqStatus

from tests.engine.core.driver import Driver, OraclePredictor, make_scheduler, request


def random_workload(seed: int, *, oracle: bool = False, hydragen: GroupingParams | None = None) -> Driver:
    rng = random.Random(seed)
    num_pages = rng.randint(8, 20)
    max_seqs = rng.choice([1, 2, 3, 4, 8])
    sched_kw = dict(num_pages=num_pages, page_size=2, max_seqs=max_seqs,
                    max_tokens_per_step=rng.choice([max_seqs, 4, 7, 16]) if max_seqs <= 4 else 16,
                    enable_prefix_cache=rng.random() < 0.8, max_model_len=rng.choice([12, 20, 40]))
    true_lens: dict[tuple[str, int], int] = {}
    sched = make_scheduler(**sched_kw, predictor=OraclePredictor(true_lens) if oracle else None, hydragen=hydragen)
    driver = Driver(sched, seed=seed, vocab=3, true_lens=true_lens)
    bases = [[rng.randrange(3) for _ in range(rng.randint(0, 10))] for _ in range(3)]
    pending = []
    for i in range(rng.randint(4, 24)):
        prompt = (rng.choice(bases) + [rng.randrange(3) for _ in range(rng.randint(1, 6))])[:10]
        n = rng.choice([1, 1, 1, 2, 3])
        max_tokens = rng.randint(0, 12)
        req = request(f"r{i}", prompt, max_tokens=max_tokens, n=n,
                      priority=Priority.ONLINE if rng.random() < 0.2 else Priority.BATCH,
                      prompt_logprobs=1 if rng.random() < 0.15 else None)
        pending.append((req, [rng.randint(1, max(1, max_tokens)) for _ in range(n)]))
    driver.pending = pending
    driver.rng = rng
    return driver


def run_random(driver: Driver) -> None:
    sched = driver.scheduler
    rng = driver.rng
    while driver.pending or sched.has_work():
        # Requests arrive over time: some follow back-pressure, some arrive regardless (online).
        take = sched.num_wanted() if rng.random() < 0.7 else rng.randint(0, 2)
        for _ in range(min(take, len(driver.pending))):
            req, lens = driver.pending.pop(0)
            if len(req.prompt_token_ids) >= sched.max_model_len:
                with pytest.raises(ValueError):
                    sched.add_request(req)
                continue
            driver.add(req, lens)
        if sched.has_work():
            driver.step()
        assert driver.steps < 5000, "no progress"
    for (rid, choice), _ in driver.true_lens.items():
        seq = sched.sequence(sched.request_seq_ids(rid)[choice])
        assert seq.status is SeqStatus.FINISHED
        assert seq.output_ids == driver.expected_output(seq), f"{rid}/{choice}: output differs from the model"
        if seq.wants_prompt_logprobs:
            assert sorted(driver.prompt_logprob_positions.get(seq.seq_id, [])) == \
                list(range(seq.num_prompt_tokens - 1)), f"{rid}: prompt logprobs not exactly once per position"
    assert sched.pool.num_used == 0
    sched.check_invariants()


@pytest.mark.parametrize("seed", range(200))
def test_random_workload(seed: int) -> None:
    run_random(random_workload(seed))


@pytest.mark.parametrize("seed", range(100))
def test_exact_predictions_never_preempt(seed: int) -> None:
    """With exact length predictions the forecast is conservative: nothing is ever preempted."""
    driver = random_workload(seed, oracle=True)
    run_random(driver)
    assert driver.scheduler.num_preemptions == 0


def test_random_workloads_do_preempt() -> None:
    """The workloads above are small enough that wrong (cold-start/mean) guesses cause preemptions."""
    total = 0
    for seed in range(60):
        driver = random_workload(seed)
        run_random(driver)
        total += driver.scheduler.num_preemptions
    assert total > 0


def test_random_workloads_prefix_groups_equal_fresh_detection() -> None:
    """The scheduler answers prefix groups from the previous step when they cannot have changed
    (core/hydragen.py DecodeGroupCache); every plan's groups must equal a fresh detection (the
    driver checks each step). Tiny thresholds so groups form, split and re-form all the time."""
    params = GroupingParams(min_prefix_tokens=2, min_group=2, call_cost_tokens=0, merge_cost_tokens=0)
    grouped_steps = recomputed = steps = 0
    for seed in range(80):
        driver = random_workload(seed, hydragen=params)
        run_random(driver)
        grouped_steps += driver.num_grouped_steps
        recomputed += driver.scheduler._groups.num_recomputed
        steps += driver.steps
    assert grouped_steps > 100, "the workloads should form prefix groups"
    assert recomputed < steps, "the previous step's groups should sometimes be reused"
