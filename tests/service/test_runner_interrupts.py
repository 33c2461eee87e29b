"""The runner interrupted: cancel mid-run, expiry at expires_at (injectable clock), and a crash
followed by a restart that resumes with every custom_id exactly once and no written line re-run."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.service.jobsutil import tiny_tokenizer
from tests.service.runnerutil import (
    FAST, assert_exactly_once, chat_line, executed_lines, fake_engine, make_runner, new_batch, run_to_terminal,
    wait_for,
)
from tokabatch.service.storage import repo

pytestmark = pytest.mark.timeout(120)
NUM_LINES = 16


@pytest.fixture
def tok(tmp_path):
    return tiny_tokenizer(tmp_path)


async def slow_engine():
    # 10 tokens at 20 ms each: ~0.2 s per line, two lines at a time, so a 12-line batch takes ~1.2 s.
    return await fake_engine(token_interval_s=0.02, max_running=2, max_waiting=0)


def slow_lines() -> list[dict]:
    return [chat_line(i, max_tokens=10, ignore_eos=True) for i in range(NUM_LINES)]


async def test_cancel_mid_run(db, blobs, clock, tok, tmp_path):
    engine = await slow_engine()
    try:
        batch_id = await new_batch(db, blobs, slow_lines(), clock)
        runner = make_runner(db, blobs, engine, tok, clock, tmp_path)
        task = asyncio.create_task(runner.run_forever())
        try:
            await wait_for(db, batch_id, lambda r: r.request_completed >= 2)
            cancelling = await repo.cancel_batch(db, batch_id, owner="owner-a", now_s=int(clock()))
            assert cancelling.status == "cancelling" and isinstance(cancelling.cancelling_at, int)
            row = await wait_for(db, batch_id, lambda r: r.status == "cancelled")
        finally:
            await runner.stop()
            await task
        assert row.cancelled_at and row.completed_at is None
        out, err = assert_exactly_once(blobs, row, [x["custom_id"] for x in slow_lines()])
        assert 2 <= len(out) < NUM_LINES
        assert err and all(x["response"] is None and x["error"]["code"] == "batch_cancelled" for x in err)
        assert all(x["response"]["status_code"] == 200 for x in out)
        assert row.output_parquet_file_id is not None
    finally:
        await engine.close()


async def test_expiry(db, blobs, clock, tok, tmp_path):
    engine = await slow_engine()
    try:
        batch_id = await new_batch(db, blobs, slow_lines(), clock, window_s=60)
        runner = make_runner(db, blobs, engine, tok, clock, tmp_path)
        task = asyncio.create_task(runner.run_forever())
        try:
            await wait_for(db, batch_id, lambda r: r.request_completed >= 2)
            clock.advance(61)
            row = await wait_for(db, batch_id, lambda r: r.status == "expired")
        finally:
            await runner.stop()
            await task
        assert row.expired_at == int(clock()) and row.completed_at is None and row.cancelled_at is None
        out, err = assert_exactly_once(blobs, row, [x["custom_id"] for x in slow_lines()])
        assert 2 <= len(out) < NUM_LINES
        assert all(x["error"]["code"] == "batch_expired" and x["response"] is None for x in err)
    finally:
        await engine.close()


async def test_crash_and_resume_runs_no_written_line_again(db, blobs, clock, tok, tmp_path):
    lines = slow_lines()
    batch_id = await new_batch(db, blobs, lines, clock)
    engine1 = await slow_engine()
    runner1 = make_runner(db, blobs, engine1, tok, clock, tmp_path, worker_id="worker-1")
    task = asyncio.create_task(runner1.run_forever())
    await wait_for(db, batch_id, lambda r: r.request_completed >= 3)
    # "kill -9": the task dies where it stands, its lease is left behind, and its engine is gone.
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await engine1.close()
    work = tmp_path / "work" / batch_id
    written_before = [json.loads(x)["custom_id"] for x in (work / "output.jsonl").read_text().splitlines()]
    with (work / "output.jsonl").open("ab") as f:         # a torn line from the moment of death
        f.write(b'{"id": "batch_req_torn", "custom_id": "line-11", "resp')
    assert len(written_before) >= 3

    # A restarted process cannot claim the batch until the lease of the dead one has lapsed.
    engine2 = await slow_engine()
    try:
        runner2 = make_runner(db, blobs, engine2, tok, clock, tmp_path, worker_id="worker-2")
        assert not await runner2.run_once()
        clock.advance(FAST.lease_s + 1)
        row = await run_to_terminal(runner2, db, batch_id)
        assert row.status == "completed" and row.num_claims == 2
        assert_exactly_once(blobs, row, [x["custom_id"] for x in lines])
        line_numbers_written_before = {int(cid.split("-")[1]) + 1 for cid in written_before}
        rerun = set(executed_lines(engine2)) & line_numbers_written_before
        assert not rerun, f"lines {sorted(rerun)} were written before the crash and ran again"
        assert sorted(executed_lines(engine2)) == sorted(set(range(1, NUM_LINES + 1)) - line_numbers_written_before)
        assert len(executed_lines(engine1)) >= len(written_before)
    finally:
        await engine2.close()


async def test_stop_releases_the_claim_and_a_new_runner_finishes(db, blobs, clock, tok, tmp_path):
    lines = slow_lines()
    batch_id = await new_batch(db, blobs, lines, clock)
    engine1 = await slow_engine()
    runner1 = make_runner(db, blobs, engine1, tok, clock, tmp_path, worker_id="worker-1")
    task = asyncio.create_task(runner1.run_forever())
    await wait_for(db, batch_id, lambda r: r.request_completed >= 2)
    await runner1.stop()
    await task
    await engine1.close()
    row = await repo.get_batch(db, batch_id, owner=None)
    assert row.status == "in_progress" and row.worker_id is None and row.request_completed >= 2
    engine2 = await slow_engine()
    try:
        runner2 = make_runner(db, blobs, engine2, tok, clock, tmp_path, worker_id="worker-2")
        row = await run_to_terminal(runner2, db, batch_id)      # no lease wait: the claim was released
        assert row.status == "completed"
        assert_exactly_once(blobs, row, [x["custom_id"] for x in lines])
        assert len(executed_lines(engine1)) + len(executed_lines(engine2)) <= NUM_LINES + 2   # +in-flight at stop
    finally:
        await engine2.close()


async def test_engine_death_leaves_lines_for_a_retry(db, blobs, clock, tok, tmp_path):
    """Lines the engine failed with a 5xx are not written: the batch is released (an engine retry,
    not a failure of the batch), the runner whose engine is dead claims nothing more, and a runner
    with a working engine runs them, so no line ends as engine_error."""
    lines = slow_lines()
    batch_id = await new_batch(db, blobs, lines, clock)
    engine1 = await fake_engine(token_interval_s=0.01, max_running=2, max_waiting=0, fail_on_step=25)
    runner1 = make_runner(db, blobs, engine1, tok, clock, tmp_path, worker_id="worker-1")
    task = asyncio.create_task(runner1.run_forever())
    row = await wait_for(db, batch_id, lambda r: r.num_engine_retries >= 1 and r.worker_id is None)
    await asyncio.sleep(0.3)                                   # past the back-off: still nobody claims it
    row = await repo.get_batch(db, batch_id, owner=None)
    assert row.num_claims == 1 and row.worker_id is None and row.num_failures == 0
    assert engine1.health() is not None
    await runner1.stop()
    await task
    await engine1.close()
    assert row.status == "in_progress" and 0 < row.request_completed < NUM_LINES
    clock.advance(10)                                          # the back-off is over
    engine2 = await slow_engine()
    try:
        row = await run_to_terminal(make_runner(db, blobs, engine2, tok, clock, tmp_path, worker_id="w2"),
                                    db, batch_id)
        assert row.status == "completed" and row.error_file_id is None
        assert_exactly_once(blobs, row, [x["custom_id"] for x in lines])
    finally:
        await engine2.close()


async def test_a_stop_during_a_cancel_ends_the_batch_cancelled_without_draining(db, blobs, clock, tok, tmp_path):
    """SIGTERM right after a cancel: the cancel wins. The batch ends cancelled at once (its lines in
    flight are not drained for the grace period, and the batch is not left cancelling for a later claim)."""
    engine = await fake_engine(token_interval_s=0.02, max_running=2, max_waiting=0)
    try:
        lines = [chat_line(i, max_tokens=500, ignore_eos=True) for i in range(4)]     # ~10 s a line
        batch_id = await new_batch(db, blobs, lines, clock)
        runner = make_runner(db, blobs, engine, tok, clock, tmp_path)
        task = asyncio.create_task(runner.run_forever())
        await wait_for(db, batch_id, lambda r: r.status == "in_progress")
        await asyncio.sleep(0.3)                                  # two lines are in the engine
        await repo.cancel_batch(db, batch_id, owner="owner-a", now_s=int(clock()))
        began = asyncio.get_running_loop().time()
        await runner.stop()
        await task
        assert asyncio.get_running_loop().time() - began < 5.0
        row = await repo.get_batch(db, batch_id, owner=None)
        assert row.status == "cancelled"
        _, err = assert_exactly_once(blobs, row, [x["custom_id"] for x in lines])
        assert {x["error"]["code"] for x in err} == {"batch_cancelled"}
    finally:
        await engine.close()
