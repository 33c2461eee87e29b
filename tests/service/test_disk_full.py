"""A full disk is an error, not corruption: an upload that does not fit is a 507 envelope and leaves
no partial file; a batch whose results cannot be written pauses (released without counting a
failure, /health says why) and resumes once space is freed, each custom_id once; the database stays
consistent. On a real small filesystem (a tmpfs the test mounts, where it may) and with ENOSPC
raised at the write layer."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from tests.service.jobsutil import tiny_tokenizer
from tests.service.serve_process import ServeProcess, read_batch
from tests.service.runnerutil import (
    FAST, assert_exactly_once, chat_line, fake_engine, make_runner, new_batch, run_to_terminal, wait_for,
)
from tokabatch.service.jobs.outputs import ResultWriter
from tokabatch.service.storage import repo
from tokabatch.service.storage.db import is_storage_full

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def tok(tmp_path):
    return tiny_tokenizer(tmp_path)


def test_what_counts_as_a_full_disk():
    assert is_storage_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_storage_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_storage_full(OperationalError("INSERT ...", {}, sqlite3.OperationalError("database or disk is full")))
    pg = type("DiskFullError", (Exception,), {"sqlstate": "53100"})("could not extend file")
    assert is_storage_full(OperationalError("UPDATE ...", {}, pg))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("while writing a line")   # noqa: B904 - the context is what is tested
    except RuntimeError as wrapped:
        assert is_storage_full(wrapped)
    assert not is_storage_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_storage_full(ValueError("full of surprises"))


async def test_a_batch_pauses_while_its_lines_cannot_be_written_and_resumes(db, blobs, clock, tok, tmp_path,
                                                                           monkeypatch):
    lines = [chat_line(i) for i in range(12)]
    batch_id = await new_batch(db, blobs, lines, clock)
    real_append, full = ResultWriter._append, {"on": False}

    def append(self, custom_id, line, row, ok):
        if full["on"] or len(self.done_custom_ids) >= 5:
            full["on"] = True
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(self, custom_id, line, row, ok)

    monkeypatch.setattr(ResultWriter, "_append", append)
    engine = await fake_engine()
    try:
        runner = make_runner(db, blobs, engine, tok, clock, tmp_path)
        assert await runner.run_once()
        row = await repo.get_batch(db, batch_id, owner=None)
        assert row.status == "in_progress" and row.worker_id is None
        assert row.num_failures == 0 and row.not_before == pytest.approx(clock() + FAST.retry_after_s)
        for _ in range(4):                                  # still full: paused again, never failed
            clock.advance(FAST.max_retry_after_s + 1)
            assert await runner.run_once()
        row = await repo.get_batch(db, batch_id, owner=None)
        assert row.status == "in_progress" and row.num_failures == 0 and row.request_completed == 5
        full["on"] = False
        monkeypatch.setattr(ResultWriter, "_append", real_append)     # space was freed
        clock.advance(FAST.max_retry_after_s + 1)
        row = await run_to_terminal(runner, db, batch_id)
        assert row.status == "completed" and row.num_failures == 0
        assert_exactly_once(blobs, row, [x["custom_id"] for x in lines])
        assert runner.health() is None
    finally:
        await engine.close()


async def test_health_says_the_disk_is_full_while_a_batch_is_paused(db, blobs, clock, tok, tmp_path, monkeypatch):
    batch_id = await new_batch(db, blobs, [chat_line(i) for i in range(3)], clock)
    monkeypatch.setattr(ResultWriter, "_append", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    engine = await fake_engine()
    try:
        import asyncio

        runner = make_runner(db, blobs, engine, tok, clock, tmp_path)
        task = asyncio.create_task(runner.run_forever())
        await wait_for(db, batch_id, lambda r: r.not_before is not None)
        await asyncio.sleep(0.1)
        assert "the disk is full" in (runner.health() or "")
        await runner.stop()
        await task
    finally:
        await engine.close()


# ---- a real small filesystem ------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs mounted for the test, where this process may mount (root on Linux); else skipped
    (the ENOSPC tests above cover the runner everywhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> Path:
    """Write until the disk is full; returns the filler to delete."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


@pytest.mark.slow
def test_a_full_disk_under_serve_loses_nothing(small_disk, tmp_path, serve_db):
    """(With PostgreSQL the database is not on the small disk: the files and work folders are.)"""
    import openai

    data = small_disk / "data"
    log = tmp_path / "serve.log"
    # --lease 3: the claim lapses soon when its release cannot be written (SQLite on the full disk)
    server = ServeProcess(data, log, "--lease", "3", db_url=serve_db)
    try:
        client = server.client()
        # An upload larger than the disk: a 507 envelope, and no partial file left behind.
        with pytest.raises(openai.APIStatusError) as too_big:
            client.files.create(file=("big.jsonl", b"x" * (6 << 20)), purpose="user_data")
        assert too_big.value.status_code == 507
        assert too_big.value.body["code"] == "insufficient_storage"
        assert not [p for p in (data / "files").rglob("*") if p.is_file()], "a partial upload was left"

        model = client.models.list().data[0].id
        lines = [{"custom_id": f"d{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": model, "messages": [{"role": "user", "content": f"{i} " + "x" * 300}],
                           "max_tokens": 4, "ignore_eos": True}} for i in range(60)]
        f = client.files.create(file="\n".join(json.dumps(x) for x in lines).encode() + b"\n", purpose="batch")
        batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        deadline = time.monotonic() + 60
        while client.batches.retrieve(batch.id).request_counts.completed < 4:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        filler = _fill(small_disk)
        time.sleep(3.0)                                   # the runner meets the full disk
        statuses = []
        for _ in range(3):                                # reads still answer; writes say 507, never 500
            try:
                statuses.append(client.batches.retrieve(batch.id).status)
                client.files.create(file=("more.jsonl", b"y" * 200_000), purpose="user_data")
                statuses.append(200)
            except openai.APIStatusError as e:
                statuses.append(e.status_code)
        assert 500 not in statuses and 507 in statuses, statuses
        paused = client.batches.retrieve(batch.id)      # (finalizing when sealing met the full disk)
        assert paused.status in ("in_progress", "finalizing"), paused
        filler.unlink()                                   # space is freed
        deadline = time.monotonic() + 120
        while (b := client.batches.retrieve(batch.id)).status != "completed":
            assert b.status in ("in_progress", "finalizing") and time.monotonic() < deadline, b
            time.sleep(0.2)
        out = [json.loads(x)["custom_id"] for x in client.files.content(b.output_file_id).text.splitlines()]
        assert sorted(out) == sorted(x["custom_id"] for x in lines) and b.error_file_id is None
    finally:
        server.stop()
    text = log.read_text()
    assert "the disk is full" in text and "Traceback" not in text, text[-4000:]
    assert read_batch(server.db_url, batch.id).num_failures == 0
    if serve_db is None:
        with sqlite3.connect(data / "tokabatch.db") as con:
            assert con.execute("pragma integrity_check").fetchone()[0] == "ok"

