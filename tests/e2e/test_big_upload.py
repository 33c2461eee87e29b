"""A 50,000-line, ~150 MB batch input uploaded and validated by a live server with bounded memory.

The server (the real serve_async with the fake engine, as a subprocess) streams the upload to disk
and validates line by line; its peak RSS (VmHWM) is read from /proc and printed.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from openai.types import Batch

from tests.contract.test_batch_restart import start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
NUM_LINES = 50_000


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def write_big_input(path: Path) -> int:
    filler = "lorem ipsum dolor sit amet " * 110            # ~3 KB of content per line
    with path.open("w") as f:
        for i in range(NUM_LINES):
            f.write(json.dumps({"custom_id": f"request-{i:05d}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "fake", "max_tokens": 4,
                                         "messages": [{"role": "user", "content": f"{i} {filler}"}]}}) + "\n")
    return path.stat().st_size


def test_150mb_upload_and_validation_keep_server_memory_bounded(tmp_path):
    src = tmp_path / "big.jsonl"
    size = write_big_input(src)
    assert 140e6 < size < 200e6
    proc, client = start_server(tmp_path / "data", tmp_path)
    try:
        baseline_mb = peak_rss_mb(proc.pid)
        with src.open("rb") as f:
            uploaded = client.files.create(file=f, purpose="batch")
        assert uploaded.bytes == size
        after_upload_mb = peak_rss_mb(proc.pid)
        batch_id = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                         completion_window="24h").id
        deadline = time.monotonic() + 180
        while (batch := Batch.model_validate(client.batches.retrieve(batch_id).model_dump())).status == "validating":
            assert time.monotonic() < deadline, "validation did not finish"
            time.sleep(0.2)
        assert batch.status == "in_progress", batch.errors
        assert batch.request_counts.total == NUM_LINES
        time.sleep(2.0)                                   # the runner's first read-ahead window is being fed
        peak_mb = peak_rss_mb(proc.pid)
        client.batches.cancel(batch_id)
        print(f"server peak RSS: {baseline_mb:.0f} MB at start, {after_upload_mb:.0f} MB after the "
              f"{size / 1e6:.0f} MB upload, {peak_mb:.0f} MB after validating {NUM_LINES} lines")
        assert after_upload_mb - baseline_mb < 64, "the upload was buffered in memory"
        assert peak_mb - baseline_mb < 150, "validation or feeding held the file in memory"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
