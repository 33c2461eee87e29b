"""Sharded batches (RunnerConfig.shard_lines) on FakeEngines, on SQLite and PostgreSQL: where a batch
is cut, one runner through every shard, two runners sharing one batch, a shard resumed from its own
checkpoint after its runner died, cancel and expiry reaching shards held and shards never claimed."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pyarrow.parquet as pq
import pytest

from tests.service.jobsutil import tiny_tokenizer
from tests.service.runnerutil import (
    FAST, assert_exactly_once, chat_line, executed_lines, fake_engine, make_runner, new_batch, run_to_terminal,
    wait_for,
)
from tokabatch.service.jobs.ordering import SpanCollector, cut_ranges
from tokabatch.service.storage import repo
from tokabatch.service.storage import shards as shard_store

pytestmark = pytest.mark.timeout(120)
SHARDED = dataclasses.replace(FAST, shard_lines=5)


@pytest.fixture
def tok(tmp_path):
    return tiny_tokenizer(tmp_path)


def lines_of(num: int, **body) -> list[dict]:
    return [chat_line(i, **body) for i in range(num)]


# ---- where a batch is cut ----------------------------------------------------------------------------
def test_cut_ranges_cover_every_line_once_in_about_equal_parts():
    assert cut_ranges(4, 5, lambda i: True, lambda i: True) == [(0, 4)]
    assert cut_ranges(23, 5, lambda i: True, lambda i: True) == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    assert cut_ranges(10, 5, lambda i: True, lambda i: True) == [(0, 5), (5, 10)]


def test_a_cut_moves_to_where_the_prompt_changes():
    # Prompts: 7 lines of A, 6 of B, 4 of C (positions 0-6, 7-12, 13-16); shards of about 5.
    prompts = ["A"] * 7 + ["B"] * 6 + ["C"] * 4
    collector = SpanCollector()
    for i, p in enumerate(prompts):
        collector.add(i + 1, i * 10, 10, {"body": {"messages": [{"role": "user", "content": p}]}})
    collector.spans()
    assert collector.shard_ranges(5) == [(0, 7), (7, 13), (13, 17)]
    # A head shared for longer than half a shard: the cut falls where the whole prompt changes.
    head = "x" * 600
    collector = SpanCollector()
    for i in range(12):
        collector.add(i + 1, i * 10, 10, {"body": {"prompt": head + ("a" if i < 6 else "b")}})
    collector.spans()
    assert collector.shard_ranges(4) == [(0, 6), (6, 12)]


# ---- shards through runners --------------------------------------------------------------------------
async def test_one_runner_runs_every_shard_and_seals_them_in_order(db, blobs, clock, tok, tmp_path):
    lines = lines_of(23)
    engine = await fake_engine()
    try:
        batch_id = await new_batch(db, blobs, lines, clock)
        runner = make_runner(db, blobs, engine, tok, clock, tmp_path, config=dataclasses.replace(SHARDED,
                                                                                                   order_window=1))
        row = await run_to_terminal(runner, db, batch_id)
    finally:
        await engine.close()
    assert row.status == "completed" and row.num_shards == 5 and row.finalizing_at and row.completed_at
    out, err = assert_exactly_once(blobs, row, [x["custom_id"] for x in lines])
    assert not err and sum(engine.executions.values()) == 23
    # File order feeds (order_window 1): the shards are line ranges, concatenated in order.
    assert [x["custom_id"] for x in out][:5] == sorted([f"line-{i}" for i in range(5)])
    shard_of = [int(x["custom_id"].split("-")[1]) // 5 for x in out]
    assert shard_of == sorted(shard_of)
    usages = [x["response"]["body"]["usage"] for x in out]
    assert row.output_tokens == sum(u["completion_tokens"] for u in usages)
    assert row.input_tokens == sum(u["prompt_tokens"] for u in usages)
    table = pq.read_table(blobs.path(row.output_parquet_file_id))
    assert sorted(table.column("custom_id").to_pylist()) == sorted(x["custom_id"] for x in lines)
    assert await shard_store.get_shards(db, batch_id) == []             # forgotten once sealed
    assert not (tmp_path / "work" / batch_id).exists()
    assert not [p for p in blobs.root.iterdir() if p.name.startswith("file-")
                and p.name not in (row.output_file_id, row.output_parquet_file_id) and p.name != row.input_file_id]


async def test_two_runners_share_one_batch(db, blobs, clock, tok, tmp_path):
    lines = lines_of(40, max_tokens=6, ignore_eos=True)
    engines = [await fake_engine(token_interval_s=0.005, max_running=2, max_waiting=0) for _ in range(2)]
    runners = [make_runner(db, blobs, e, tok, clock, tmp_path, worker_id=f"w{i}", config=SHARDED)
               for i, e in enumerate(engines)]
    try:
        batch_id = await new_batch(db, blobs, lines, clock)
        tasks = [asyncio.create_task(r.run_forever()) for r in runners]
        try:
            running = await wait_for(db, batch_id, lambda r: r.status == "in_progress" and r.request_completed >= 3)
            assert running.num_shards == 8 and running.request_total == 40
            row = await wait_for(db, batch_id, lambda r: r.status == "completed")
        finally:
            for r in runners:
                await r.stop()
            await asyncio.gather(*tasks)
    finally:
        for e in engines:
            await e.close()
    assert_exactly_once(blobs, row, [x["custom_id"] for x in lines])
    counts = [len(executed_lines(e)) for e in engines]
    assert sum(counts) == 40 and min(counts) > 0, counts


async def test_a_shard_resumes_from_its_checkpoint_after_its_runner_died(db, blobs, clock, tok, tmp_path):
    lines = lines_of(12, max_tokens=10, ignore_eos=True)
    batch_id = await new_batch(db, blobs, lines, clock)
    config = dataclasses.replace(SHARDED, shard_lines=6, order_window=1)
    engine1 = await fake_engine(token_interval_s=0.02, max_running=2, max_waiting=0)
    runner1 = make_runner(db, blobs, engine1, tok, clock, tmp_path, worker_id="w1", config=config)
    task = asyncio.create_task(runner1.run_forever())
    await wait_for(db, batch_id, lambda r: r.request_completed >= 3)
    task.cancel()                             # "kill -9": the shard's lease is left behind
    with pytest.raises(asyncio.CancelledError):
        await task
    await engine1.close()
    held = [s for s in await shard_store.get_shards(db, batch_id) if s.worker_id == "w1"]
    assert len(held) == 1 and held[0].outcome is None
    folder = tmp_path / "work" / batch_id / "shards" / held[0].id
    written = {json.loads(x)["custom_id"] for x in (folder / "output.jsonl").read_text().splitlines()}
    assert len(written) >= 3

    engine2 = await fake_engine(token_interval_s=0.002, max_running=2, max_waiting=0)
    try:
        runner2 = make_runner(db, blobs, engine2, tok, clock, tmp_path, worker_id="w2", config=config)
        clock.advance(config.lease_s + 1)
        row = await run_to_terminal(runner2, db, batch_id)
        assert row.status == "completed"
        assert_exactly_once(blobs, row, [x["custom_id"] for x in lines])
        rerun = {f"line-{n - 1}" for n in executed_lines(engine2)} & written
        assert not rerun, f"{sorted(rerun)} were written before the crash and ran again"
        assert len(executed_lines(engine2)) == 12 - len(written)
    finally:
        await engine2.close()


async def test_cancel_reaches_running_and_unclaimed_shards(db, blobs, clock, tok, tmp_path):
    lines = lines_of(20, max_tokens=10, ignore_eos=True)
    engine = await fake_engine(token_interval_s=0.02, max_running=2, max_waiting=0)
    try:
        batch_id = await new_batch(db, blobs, lines, clock)
        runner = make_runner(db, blobs, engine, tok, clock, tmp_path, config=SHARDED)
        task = asyncio.create_task(runner.run_forever())
        try:
            await wait_for(db, batch_id, lambda r: r.request_completed >= 2)
            await repo.cancel_batch(db, batch_id, owner="owner-a", now_s=int(clock()))
            row = await wait_for(db, batch_id, lambda r: r.status == "cancelled")
        finally:
            await runner.stop()
            await task
    finally:
        await engine.close()
    out, err = assert_exactly_once(blobs, row, [x["custom_id"] for x in lines])
    assert 2 <= len(out) < 20 and len(err) >= 10          # three of four shards never ran
    assert all(x["error"]["code"] == "batch_cancelled" for x in err)


async def test_expiry_ends_a_sharded_batch(db, blobs, clock, tok, tmp_path):
    lines = lines_of(20, max_tokens=10, ignore_eos=True)
    engine = await fake_engine(token_interval_s=0.02, max_running=2, max_waiting=0)
    try:
        batch_id = await new_batch(db, blobs, lines, clock, window_s=60)
        runner = make_runner(db, blobs, engine, tok, clock, tmp_path, config=SHARDED)
        task = asyncio.create_task(runner.run_forever())
        try:
            await wait_for(db, batch_id, lambda r: r.request_completed >= 2)
            clock.advance(61)
            row = await wait_for(db, batch_id, lambda r: r.status == "expired")
        finally:
            await runner.stop()
            await task
    finally:
        await engine.close()
    out, err = assert_exactly_once(blobs, row, [x["custom_id"] for x in lines])
    assert 2 <= len(out) < 20
    assert all(x["error"]["code"] == "batch_expired" for x in err)


async def test_a_runner_starts_by_removing_work_folders_of_ended_batches(db, blobs, clock, tok, tmp_path):
    engine = await fake_engine()
    try:
        ended = await new_batch(db, blobs, lines_of(2), clock)
        row = await run_to_terminal(make_runner(db, blobs, engine, tok, clock, tmp_path), db, ended)
        assert row.status == "completed"
        running = await new_batch(db, blobs, lines_of(2), clock)
        work = tmp_path / "work"
        for name in (ended, running, "batch_gone"):        # e.g. shards this host ran, sealed on another host
            (work / name / "shards" / "s").mkdir(parents=True)
        runner = make_runner(db, blobs, engine, tok, clock, tmp_path)
        await runner._remove_ended_work_folders()
        assert sorted(p.name for p in work.iterdir()) == [running]
    finally:
        await engine.close()


async def test_the_next_shard_runs_during_the_tail_of_the_last(db, blobs, clock, tok, tmp_path):
    """Shard 0's lines are all in the engine and one of them is long: the runner's second lane takes
    shard 1 meanwhile, and shard 1 ends before shard 0 (the engine does not run out of work)."""
    lines = [chat_line(0, max_tokens=60, ignore_eos=True)] + lines_of(10, max_tokens=2, ignore_eos=True)[1:]
    engine = await fake_engine(token_interval_s=0.02, max_running=8, max_waiting=8)
    try:
        batch_id = await new_batch(db, blobs, lines, clock)
        runner = make_runner(db, blobs, engine, tok, clock, tmp_path, config=dataclasses.replace(SHARDED,
                                                                                                   order_window=1))
        task = asyncio.create_task(runner.run_forever())
        try:
            seen = []
            while (row := await repo.get_batch(db, batch_id, owner=None)).status != "completed":
                seen.append(tuple(s.outcome for s in await shard_store.get_shards(db, batch_id)))
                await asyncio.sleep(0.01)
        finally:
            await runner.stop()
            await task
    finally:
        await engine.close()
    assert (None, "completed") in seen, seen
    assert_exactly_once(blobs, row, [x["custom_id"] for x in lines])


async def test_the_lanes_poll_and_do_not_spin(db, blobs, clock, tok, tmp_path, monkeypatch):
    """While a batch's feed is done and its lines finish, the second lane looks for a shard once per
    poll (a lane that woke itself looked ~700 times a second and took a core from the engine)."""
    calls = []
    claim_shard = shard_store.claim_shard

    async def counted(*args, **kwargs):
        calls.append(1)
        return await claim_shard(*args, **kwargs)

    monkeypatch.setattr(shard_store, "claim_shard", counted)
    engine = await fake_engine(token_interval_s=0.05, max_running=16, max_waiting=16)
    try:
        batch_id = await new_batch(db, blobs, lines_of(16, max_tokens=30, ignore_eos=True), clock)
        runner = make_runner(db, blobs, engine, tok, clock, tmp_path,
                             config=dataclasses.replace(FAST, poll_interval_s=0.2))
        began = asyncio.get_running_loop().time()
        row = await run_to_terminal(runner, db, batch_id)
        seconds = asyncio.get_running_loop().time() - began
    finally:
        await engine.close()
    assert row.status == "completed" and seconds > 1.0
    assert len(calls) <= 4 + 2 * seconds / 0.2, (len(calls), seconds)
