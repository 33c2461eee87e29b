"""Contract §8 item 27: kill -9 the serving process mid-batch, restart it on the same data dir, and
the batch is still listed and finishes with every custom_id exactly once (the real `serve_async`
with a FakeEngine; the real engine's version is an e2e test)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from openai.types import Batch

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
NUM_LINES = 16


def start_server(data_dir: Path, tmp_path: Path) -> tuple[subprocess.Popen, openai.OpenAI]:
    port_file = tmp_path / f"port-{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.contract.fake_serve", str(data_dir), str(port_file)],
                            cwd=ROOT, env=env)
    deadline = time.monotonic() + 60
    while not port_file.exists() or not port_file.read_text():
        assert proc.poll() is None, "server exited during start"
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.1)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port_file.read_text()}/v1", api_key="EMPTY")
    return proc, client


def retrieve(client, batch_id) -> Batch:
    return Batch.model_validate(client.batches.retrieve(batch_id).model_dump())


def test_kill_9_mid_batch_then_restart(tmp_path):
    data_dir = tmp_path / "data"
    proc, client = start_server(data_dir, tmp_path)
    try:
        lines = [{"custom_id": f"k{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "fake", "messages": [{"role": "user", "content": f"x{i}"}], "max_tokens": 8,
                           "ignore_eos": True}} for i in range(NUM_LINES)]
        f = client.files.create(file="\n".join(json.dumps(x) for x in lines).encode() + b"\n", purpose="batch")
        batch_id = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                         completion_window="24h").id
        deadline = time.monotonic() + 60
        while (seen := retrieve(client, batch_id)).request_counts.completed < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert seen.status == "in_progress" and seen.request_counts.completed < NUM_LINES, "killed too late"

    proc, client = start_server(data_dir, tmp_path)
    try:
        assert batch_id in [b.id for b in client.batches.list()]
        deadline = time.monotonic() + 90
        while (b := retrieve(client, batch_id)).status not in ("completed", "failed", "expired", "cancelled"):
            assert time.monotonic() < deadline, f"stuck in {b.status}"
            time.sleep(0.1)
        assert b.status == "completed" and b.error_file_id is None
        out = [json.loads(x) for x in client.files.content(b.output_file_id).text.splitlines()]
        assert sorted(x["custom_id"] for x in out) == sorted(x["custom_id"] for x in lines)
        assert b.request_counts.completed == NUM_LINES and b.request_counts.failed == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
