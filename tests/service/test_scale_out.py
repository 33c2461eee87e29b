"""One batch across three workers on PostgreSQL, workers killed under it (issue 16's run): an API
process (`serve --role api`) and three `tokabatch worker` processes over one database and data dir,
a 3,000-line batch cut into shards of 250 lines, and five times a random worker's process group
`kill -9`ed mid-run and a new worker started in its place. The batch must complete with every
custom_id exactly once, every line seen written before a kill unchanged in the output, and the
engines' finished requests (each engine appends the ids it finishes to a file: tests/cli/fake_loops.py
`counting`) summing to the lines plus those in flight at the kills, which the test reports."""

from __future__ import annotations

import collections
import json
import os
import random
import re
import signal
import time
from pathlib import Path

import pytest

from tests.service.dbutil import PG_ENV, fresh_database
from tests.service.serve_process import ServeProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420),
              pytest.mark.skipif(not os.environ.get(PG_ENV), reason=f"needs PostgreSQL ({PG_ENV})")]
NUM_LINES = 3000
NUM_KILLS = 5
COUNTING = "tests.cli.fake_loops:counting"          # 16 lines at a time per engine, ~0.16 s each


def _written_lines(data: Path) -> dict[str, str]:
    """Every complete line in the shards' work folders now, by custom_id."""
    lines = {}
    for path in (data / "work").glob("*/shards/*/output.jsonl"):
        with path.open("rb") as f:
            for raw in f:
                if raw.endswith(b"\n"):
                    lines[json.loads(raw)["custom_id"]] = raw.decode()
    return lines


def _finished_line_numbers(count_dir: Path) -> collections.Counter[int]:
    counts: collections.Counter[int] = collections.Counter()
    for path in count_dir.glob("*.log"):
        for request_id in path.read_text().split():
            counts[int(re.match(r"req_(\d+)x", request_id).group(1))] += 1
    return counts


@pytest.mark.parametrize("store", ["folder", "bucket"])
def test_three_workers_five_kills_one_batch(store, tmp_path, monkeypatch, request):
    """`folder`: every process on one data dir. `bucket`: files in an S3 bucket (moto), the API on a
    data dir of its own (what it uploads reaches the workers, and what they write reaches it, only
    through the bucket), the workers on one data dir (the work folders are a host's)."""
    data, count_dir = tmp_path / "data", tmp_path / "counts"
    count_dir.mkdir()
    monkeypatch.setenv("TOKABATCH_TEST_COUNT_DIR", str(count_dir))
    blobs = ["--blobs", request.getfixturevalue("s3_server").new_bucket()] if store == "bucket" else []
    api_data = tmp_path / "api-data" if store == "bucket" else data
    rng = random.Random(16)
    with fresh_database("postgres", tmp_path) as db_url:
        api = ServeProcess(api_data, tmp_path / "api.log", "--role", "api", "--served-model-name", "fake", *blobs,
                           db_url=db_url)
        started = 0

        def new_worker(wait: bool = True) -> ServeProcess:
            nonlocal started
            started += 1
            return ServeProcess(data, tmp_path / f"worker{started}.log", "--role", "worker", "--shard-lines", "250",
                                "--lease", "2", *blobs, engine=COUNTING, db_url=db_url, wait=wait)

        workers = [new_worker() for _ in range(3)]
        kills: list[tuple[float, int]] = []
        try:
            client = api.client()
            lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": "fake", "messages": [{"role": "user", "content": f"question {i}"}],
                               "max_tokens": 8, "ignore_eos": True}} for i in range(NUM_LINES)]
            f = client.files.create(file="".join(json.dumps(x) + "\n" for x in lines).encode(), purpose="batch")
            batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")
            began = time.monotonic()
            while client.batches.retrieve(batch.id).request_counts.completed < 100:     # the workers are at it
                assert time.monotonic() - began < 120, "no line was written"
                time.sleep(0.2)
            seen_written: dict[str, str] = {}
            while len(kills) < NUM_KILLS:
                time.sleep(rng.uniform(0.8, 1.5))
                b = client.batches.retrieve(batch.id)
                assert b.status == "in_progress", (b.status, f"only {len(kills)} kills before the end")
                victim = rng.randrange(len(workers))
                workers[victim].signal_group(signal.SIGKILL)        # the worker and its engine process
                workers[victim].proc.wait(timeout=30)
                kills.append((round(time.monotonic() - began, 1), b.request_counts.completed))
                seen_written.update(_written_lines(data))
                workers[victim] = new_worker(wait=False)      # it joins when it has started
            deadline = time.monotonic() + 240
            while (b := client.batches.retrieve(batch.id)).status != "completed":
                assert b.status in ("in_progress", "finalizing") and time.monotonic() < deadline, b
                time.sleep(0.5)
            elapsed_s = time.monotonic() - began
            output = client.files.content(b.output_file_id).text.splitlines()
        finally:
            for server in (api, *workers):
                server.stop()

    by_id = {json.loads(x)["custom_id"]: x + "\n" for x in output}
    assert len(output) == NUM_LINES and sorted(by_id) == sorted(x["custom_id"] for x in lines)
    assert b.request_counts.completed == NUM_LINES and b.request_counts.failed == 0 and b.error_file_id is None
    changed = [cid for cid, raw in seen_written.items() if by_id[cid] != raw]
    assert not changed, f"{len(changed)} lines written before a kill differ in the output"
    assert len(seen_written) > 0
    finished = _finished_line_numbers(count_dir)
    assert sorted(finished) == list(range(1, NUM_LINES + 1)), "every line was computed"
    twice = sum(finished.values()) - NUM_LINES
    print(f"\n[{store}] 3,000 lines, 3 workers, {NUM_KILLS} kill -9s at (s, lines completed) {kills}: completed in "
          f"{elapsed_s:.0f} s; the engines finished {sum(finished.values())} requests, {twice} lines twice "
          f"(in flight at a kill); {len(seen_written)} lines seen written before the kills, all unchanged")
    # In flight at a kill: at most an engine's 32 held requests (finished, not yet written by its worker).
    assert twice <= NUM_KILLS * 32, twice
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(1, started + 1)]
    assert sum("shard " in log and " claimed (" in log for log in logs) >= 4
