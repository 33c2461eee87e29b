"""A graceful stop: on stop the runner feeds no new line, lets the lines in flight finish for up to
RunnerConfig.shutdown_grace_s and writes them, then releases the claim; `tokabatch serve` does it on
SIGTERM to its whole process group (the engine process waits for its parent) and exits 0, and a
second signal exits at once. Nothing is lost either way: the next start finishes each custom_id once."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import time
from pathlib import Path

import pytest

from tests.service.jobsutil import tiny_tokenizer
from tests.service.runnerutil import (
    FAST, assert_exactly_once, chat_line, executed_lines, fake_engine, make_runner, new_batch, run_to_terminal,
    wait_for,
)
from tests.service.serve_process import ServeProcess, read_batch
from tokabatch.service.storage import repo

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def tok(tmp_path):
    return tiny_tokenizer(tmp_path)


def _written(tmp_path: Path, batch_id: str) -> set[int]:
    path = tmp_path / "work" / batch_id / "output.jsonl"
    return {int(json.loads(x)["custom_id"].split("-")[1]) + 1 for x in path.read_text().splitlines()}


async def _stop_mid_batch(db, blobs, clock, tok, tmp_path, *, num_lines: int, max_tokens: int,
                          token_interval_s: float, grace_s: float, started) -> tuple[object, str, list[dict], float]:
    """A batch running two lines at a time, stopped once `started(row)`: (engine, batch id, lines,
    seconds the stop took). The caller closes the engine."""
    lines = [chat_line(i, max_tokens=max_tokens, ignore_eos=True) for i in range(num_lines)]
    batch_id = await new_batch(db, blobs, lines, clock)
    engine = await fake_engine(token_interval_s=token_interval_s, max_running=2, max_waiting=0)
    runner = make_runner(db, blobs, engine, tok, clock, tmp_path,
                         config=dataclasses.replace(FAST, shutdown_grace_s=grace_s))
    task = asyncio.create_task(runner.run_forever())
    await wait_for(db, batch_id, started)
    await asyncio.sleep(0.3)
    began = time.monotonic()
    await runner.stop()
    await task
    return engine, batch_id, lines, time.monotonic() - began


async def test_stop_lets_the_lines_in_flight_finish_and_writes_them(db, blobs, clock, tok, tmp_path):
    engine, batch_id, lines, took = await _stop_mid_batch(     # ~0.2 s a line
        db, blobs, clock, tok, tmp_path, num_lines=16, max_tokens=10, token_interval_s=0.02, grace_s=10.0,
        started=lambda r: r.request_completed >= 3)
    try:
        assert took < 5.0
        # Every line the engine ran was written: nothing in flight was thrown away.
        assert sorted(executed_lines(engine)) == sorted(_written(tmp_path, batch_id))
        row = await repo.get_batch(db, batch_id, owner=None)
        assert row.status == "in_progress" and row.worker_id is None and row.num_failures == 0
        assert row.request_completed == len(_written(tmp_path, batch_id)) < len(lines)
        runner2 = make_runner(db, blobs, engine, tok, clock, tmp_path, worker_id="worker-2")
        row = await run_to_terminal(runner2, db, batch_id)
        assert row.status == "completed"
        assert_exactly_once(blobs, row, [x["custom_id"] for x in lines])
        assert len(executed_lines(engine)) == len(lines), "no line ran twice"
    finally:
        await engine.close()


async def test_the_grace_is_bounded_lines_still_running_then_are_cut(db, blobs, clock, tok, tmp_path):
    engine, batch_id, _, took = await _stop_mid_batch(         # ~4 s a line
        db, blobs, clock, tok, tmp_path, num_lines=6, max_tokens=40, token_interval_s=0.1, grace_s=0.5,
        started=lambda r: r.in_progress_at is not None)
    try:
        assert took < 2.5
        row = await repo.get_batch(db, batch_id, owner=None)
        assert row.status == "in_progress" and row.worker_id is None and row.request_completed == 0
    finally:
        await engine.close()


# ---- tokabatch serve and signals --------------------------------------------------------------
def _submit(server: ServeProcess, num_lines: int) -> str:
    client = server.client()
    model = client.models.list().data[0].id
    lines = [{"custom_id": f"s{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": model, "messages": [{"role": "user", "content": f"x{i}"}], "max_tokens": 4,
                       "ignore_eos": True}} for i in range(num_lines)]
    f = client.files.create(file="\n".join(json.dumps(x) for x in lines).encode() + b"\n", purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id


def _wait_completed(server: ServeProcess, batch_id: str, at_least: int) -> None:
    deadline = time.monotonic() + 60
    while server.client().batches.retrieve(batch_id).request_counts.completed < at_least:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _finish_on_restart(data: Path, tmp_path: Path, db_url: str | None, batch_id: str, num_lines: int) -> None:
    server = ServeProcess(data, tmp_path / "restart.log", "--shutdown-grace", "5", "--lease", "3", db_url=db_url)
    try:
        client = server.client()
        deadline = time.monotonic() + 120
        while (b := client.batches.retrieve(batch_id)).status != "completed":
            assert time.monotonic() < deadline, b.status
            time.sleep(0.1)
        out = [json.loads(x)["custom_id"] for x in client.files.content(b.output_file_id).text.splitlines()]
        assert sorted(out) == sorted(f"s{i}" for i in range(num_lines)) and b.error_file_id is None
    finally:
        server.stop()


@pytest.mark.slow
def test_sigterm_to_the_process_group_drains_and_exits_0(tmp_path, serve_db):
    database = serve_db
    data, log = tmp_path / "data", tmp_path / "serve.log"
    server = ServeProcess(data, log, "--shutdown-grace", "20", db_url=database)
    try:
        batch_id = _submit(server, 40)                  # ~0.25 s a line, two at a time: ~5 s of work
        _wait_completed(server, batch_id, 4)
        began = time.monotonic()
        server.signal_group(signal.SIGTERM)             # the server and its engine process alike
        assert server.proc.wait(timeout=60) == 0
        took = time.monotonic() - began
    finally:
        server.stop()
    text = log.read_text()
    assert "lines in flight may finish" in text and "Traceback" not in text, text[-3000:]
    assert "unexpected failure" not in text and took < 20, text[-3000:]
    row = read_batch(server.db_url, batch_id)
    assert row.status == "in_progress" and row.worker_id is None and row.num_failures == 0
    work = data / "work" / batch_id / "output.jsonl"
    assert row.request_completed == len(work.read_text().splitlines()) >= 4
    _finish_on_restart(data, tmp_path, database, batch_id, 40)


@pytest.mark.slow
def test_a_second_signal_exits_at_once_and_loses_nothing(tmp_path, serve_db):
    # The restart waits out the lease (3 s here) the exit left behind.
    data, log = tmp_path / "data", tmp_path / "serve.log"
    database = serve_db
    server = ServeProcess(data, log, "--shutdown-grace", "120", "--lease", "3", db_url=database)
    try:
        batch_id = _submit(server, 40)
        _wait_completed(server, batch_id, 4)
        server.signal_group(signal.SIGTERM)
        time.sleep(0.3)
        began = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 128 + signal.SIGTERM
        assert time.monotonic() - began < 5
    finally:
        server.stop()
    assert "exiting now" in log.read_text()
    _finish_on_restart(data, tmp_path, database, batch_id, 40)
