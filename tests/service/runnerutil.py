"""Helpers for the runner tests: input files in the blob store, batches, a runner on a FakeEngine,
and the exactly-once check over output ∪ error files."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

from tokabatch.config import RunnerConfig
from tokabatch.engine.testing import FakeEngine, FakeLoop
from tokabatch.service.jobs.runner import BatchRunner
from tokabatch.service.storage.states import is_terminal
from tokabatch.service.storage import repo
from tokabatch.service.storage.blobs import BlobStore

CHAT = "/v1/chat/completions"
OWNER = "owner-a"
FAST = RunnerConfig(lease_s=30.0, heartbeat_s=0.05, progress_interval_s=0.05, poll_interval_s=0.02,
                    retry_after_s=0.05, max_retry_after_s=0.2)


def chat_line(i: int, **body_changes) -> dict:
    body = {"model": "fake", "messages": [{"role": "user", "content": f"Hello number {i}"}], "max_tokens": 5,
            **body_changes}
    return {"custom_id": f"line-{i}", "method": "POST", "url": CHAT, "body": body}


async def put_input(db, blobs: BlobStore, lines: list, *, now_s: int) -> str:
    raw = b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)
    file_id = repo.new_file_id()
    temp = blobs.temp_path(file_id)
    temp.write_bytes(raw)
    blobs.commit(temp, file_id)
    await repo.create_file(db, owner=OWNER, filename="input.jsonl", purpose="batch", num_bytes=len(raw),
                           now_s=now_s, file_id=file_id)
    return file_id


async def new_batch(db, blobs, lines, clock, *, endpoint: str = CHAT, window_s: int = 86_400) -> str:
    file_id = await put_input(db, blobs, lines, now_s=int(clock()))
    batch = await repo.create_batch(db, owner=OWNER, input_file_id=file_id, endpoint=endpoint,
                                    completion_window="24h", now_s=int(clock()), window_s=window_s)
    return batch.id


async def fake_engine(**loop_kwargs) -> FakeEngine:
    loop_kwargs.setdefault("model_id", "fake")
    return await FakeEngine.launch(FakeLoop(**loop_kwargs))


def make_runner(db, blobs, engine, tokenizer, clock, tmp_path: Path, **kw) -> BatchRunner:
    return BatchRunner(kw.pop("config", FAST), db, blobs, engine, tokenizer, {"fake"}, clock=clock,
                       work_root=tmp_path / "work", **kw)


async def wait_for(db, batch_id: str, predicate, timeout_s: float = 30.0):
    """Poll the batch row until predicate(row) holds."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        row = await repo.get_batch(db, batch_id, owner=None)
        if predicate(row):
            return row
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"batch {batch_id} stuck in {row.status} ({row.request_completed} completed)")
        await asyncio.sleep(0.02)


async def run_to_terminal(runner: BatchRunner, db, batch_id: str, timeout_s: float = 30.0):
    task = asyncio.create_task(runner.run_forever())
    try:
        return await wait_for(db, batch_id, lambda r: is_terminal(r.status), timeout_s)
    finally:
        await runner.stop()
        await task


def read_file_lines(blobs: BlobStore, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in blobs.path(file_id).read_text().splitlines()]


def assert_exactly_once(blobs: BlobStore, row, custom_ids: list[str]) -> tuple[list[dict], list[dict]]:
    out = read_file_lines(blobs, row.output_file_id)
    err = read_file_lines(blobs, row.error_file_id)
    seen = [x["custom_id"] for x in out + err]
    assert sorted(seen) == sorted(custom_ids), "each custom_id exactly once across output ∪ error"
    assert (row.request_completed, row.request_failed, row.request_total) == (len(out), len(err), len(custom_ids))
    assert (row.output_file_id is not None) == (len(out) > 0) and (row.error_file_id is not None) == (len(err) > 0)
    return out, err


def executed_lines(engine: FakeEngine) -> list[int]:
    """Input line numbers of every engine execution (request ids are req_<line>x<nonce>)."""
    lines = []
    for request_id, count in engine.executions.items():
        match = re.match(r"req_(\d+)x", request_id)
        assert match, request_id
        lines.extend([int(match.group(1))] * count)
    return lines
