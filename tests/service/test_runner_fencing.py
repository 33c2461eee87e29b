"""Leases fence every write: a runner whose lease lapsed (paused, not dead) and a runner that claimed
the batch since never both write it. The work folder has one writer at a time (outputs.hold_work_folder),
and status transitions are compared on the claim's holder as well as the status (repo.transition_batch
held_by); the process test pauses a real runner with SIGSTOP past its lease while another claims."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.service.dbutil import backends, fresh_database
from tests.service.jobsutil import tiny_tokenizer
from tests.service.runnerutil import (
    FAST, assert_exactly_once, chat_line, fake_engine, make_runner, new_batch, run_to_terminal,
)
from tokabatch.service.jobs.outputs import WorkFolderBusy, hold_work_folder
from tokabatch.service.storage import db as dbmod
from tokabatch.service.storage import repo
from tokabatch.service.storage.blobs import BlobStore

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def tok(tmp_path):
    return tiny_tokenizer(tmp_path)


def test_a_work_folder_has_one_holder_at_a_time(tmp_path):
    folder = tmp_path / "work" / "batch_x"
    with hold_work_folder(folder):
        with pytest.raises(WorkFolderBusy, match="another process is writing"):
            with hold_work_folder(folder):
                pass
    with hold_work_folder(folder):          # released when the first holder's block ended
        pass


async def test_a_transition_by_a_worker_that_lost_the_claim_is_refused(db, blobs, clock, tok, tmp_path):
    batch_id = await new_batch(db, blobs, [chat_line(0)], clock)
    assert (await repo.claim_batch(db, "worker-1", 30.0, clock())).id == batch_id
    clock.advance(31)                                        # worker-1's lease lapses; worker-2 claims
    assert (await repo.claim_batch(db, "worker-2", 30.0, clock())).id == batch_id
    assert not await repo.transition_batch(db, batch_id, "in_progress", int(clock()), held_by="worker-1")
    assert not await repo.heartbeat(db, batch_id, "worker-1", 30.0, clock())
    assert (await repo.get_batch(db, batch_id, owner=None)).status == "validating"
    assert await repo.transition_batch(db, batch_id, "in_progress", int(clock()), held_by="worker-2")


async def test_a_claim_whose_folder_is_held_lets_the_batch_go_without_a_failure(db, blobs, clock, tok, tmp_path):
    lines = [chat_line(i) for i in range(6)]
    batch_id = await new_batch(db, blobs, lines, clock)
    engine = await fake_engine()
    try:
        runner = make_runner(db, blobs, engine, tok, clock, tmp_path, worker_id="worker-2")
        with hold_work_folder(tmp_path / "work" / batch_id):      # the paused runner still holds it
            assert await runner.run_once()
        row = await repo.get_batch(db, batch_id, owner=None)
        assert row.worker_id is None and row.num_failures == 0 and row.num_claims == 1
        assert row.not_before == pytest.approx(clock() + FAST.lease_s)
        assert not await runner.run_once()                   # not before the lease's length has passed
        clock.advance(FAST.lease_s + 1)
        row = await run_to_terminal(runner, db, batch_id)
        assert row.status == "completed" and row.num_failures == 0
        assert_exactly_once(blobs, row, [x["custom_id"] for x in lines])
    finally:
        await engine.close()


# ---- processes: SIGSTOP past the lease ------------------------------------------------------------
def _start_runner(db_url: str, data: Path, worker: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.service.runner_process", db_url, str(data), worker],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


async def _row(db_url: str, batch_id: str):
    db = await dbmod.Database.open(db_url)
    try:
        return await repo.get_batch(db, batch_id, owner=None)
    finally:
        await db.close()


def _wait(db_url: str, batch_id: str, predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = asyncio.run(_row(db_url, batch_id))
        if predicate(row):
            return row
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def _create(db_url: str, data: Path, lines: list[dict]) -> str:
    db = await dbmod.Database.open(db_url)
    try:
        return await new_batch(db, BlobStore(data / "files"), lines, time.time)
    finally:
        await db.close()


@pytest.mark.slow
@pytest.mark.parametrize("backend", backends())
def test_a_runner_paused_past_its_lease_never_writes_beside_the_new_claimant(backend, tmp_path):
    lines = [chat_line(i, max_tokens=10, ignore_eos=True) for i in range(60)]
    data = tmp_path / "data"
    with fresh_database(backend, tmp_path) as url:
        dbmod.upgrade(url)
        batch_id = asyncio.run(_create(url, data, lines))
        first = _start_runner(url, data, "worker-1", tmp_path / "worker-1.log")
        second = None
        try:
            _wait(url, batch_id, lambda r: r.request_completed >= 6, 60, "worker-1 to write lines")
            first.send_signal(signal.SIGSTOP)                 # paused mid-line, its lease running out
            stopped_at = asyncio.run(_row(url, batch_id))
            time.sleep(2.0)                                   # > the 1.5 s lease
            second = _start_runner(url, data, "worker-2", tmp_path / "worker-2.log")
            _wait(url, batch_id, lambda r: r.num_claims >= 2, 60, "worker-2 to claim the lapsed batch")
            time.sleep(0.5)
            during = asyncio.run(_row(url, batch_id))
            first.send_signal(signal.SIGCONT)
            row = _wait(url, batch_id, lambda r: r.status == "completed", 120, "the batch to complete")
        finally:
            for proc in (first, second):
                if proc is not None:
                    proc.send_signal(signal.SIGCONT)
                    proc.kill()
                    proc.wait(timeout=30)
        logs = {w: (tmp_path / f"{w}.log").read_text() for w in ("worker-1", "worker-2")}
        # While worker-1 was paused, worker-2 claimed the batch but did not write a line beside it.
        assert during.request_completed == stopped_at.request_completed, logs
        assert "another process is writing" in logs["worker-2"], logs
        assert row.num_failures == 0, logs
        assert "Traceback" not in logs["worker-1"] + logs["worker-2"], logs
        assert_exactly_once(BlobStore(data / "files"), row, [x["custom_id"] for x in lines])
        output = BlobStore(data / "files").path(row.output_file_id).read_text().splitlines()
        assert len({json.loads(x)["custom_id"] for x in output}) == len(output) == len(lines)
