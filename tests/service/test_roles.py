"""One API process and two workers over one database and data dir (`serve --role api`, `tokabatch
worker`): the API takes files and batches and runs no engine, the workers claim the batches (both of
them work), answer online requests and /health, and serve no Files or Batch API. On SQLite (one
host) and PostgreSQL."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from tests.service.dbutil import backends, fresh_database
from tests.service.serve_process import ServeProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _status(url: str, method: str = "GET", body: dict | None = None) -> int:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, method=method, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.parametrize("backend", backends())
def test_an_api_process_and_two_workers_share_the_batches(backend, tmp_path):
    data = tmp_path / "data"
    with fresh_database(backend, tmp_path) as url:
        db_url = None if backend == "sqlite" else url
        # The API writes batches with the name the workers serve (the fake engine's here).
        api = ServeProcess(data, tmp_path / "api.log", "--role", "api", "--served-model-name", "fake", db_url=db_url)
        workers = [ServeProcess(data, tmp_path / f"worker{i}.log", "--role", "worker", db_url=db_url)
                   for i in range(2)]
        try:
            client = api.client()
            model = client.models.list().data[0].id
            batch_ids = []
            for b in range(4):
                lines = [{"custom_id": f"b{b}-{i}", "method": "POST", "url": "/v1/chat/completions",
                          "body": {"model": model, "messages": [{"role": "user", "content": f"{b} {i}"}],
                                   "max_tokens": 4, "ignore_eos": True}} for i in range(8)]
                f = client.files.create(file="\n".join(json.dumps(x) for x in lines).encode() + b"\n",
                                        purpose="batch")
                batch_ids.append(client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                                       completion_window="24h").id)
            deadline = time.monotonic() + 120
            for n, batch_id in enumerate(batch_ids):
                while (b := client.batches.retrieve(batch_id)).status != "completed":
                    assert b.status in ("validating", "in_progress", "finalizing") and time.monotonic() < deadline, b
                    time.sleep(0.1)
                out = client.files.content(b.output_file_id).text.splitlines()
                assert sorted(json.loads(x)["custom_id"] for x in out) == sorted(f"b{n}-{i}" for i in range(8))
                assert b.request_counts.completed == 8 and b.request_counts.failed == 0
            # A dry run on the API node: its tokenizer and limits come from the model folder, no engine.
            dry = urllib.request.Request(api.url + "/v1/batches", method="POST", headers={
                "Content-Type": "application/json"}, data=json.dumps({
                    "input_file_id": f.id, "endpoint": "/v1/chat/completions", "completion_window": "24h",
                    "dry_run": True}).encode())
            with urllib.request.urlopen(dry, timeout=60) as r:
                report = json.loads(r.read())
            assert report["valid"] and report["request_counts"]["total"] == 8, report
            assert report["usage"]["input_tokens"] > 0 and report["usage"]["expected_output_tokens"] == 8 * 4
            # Who serves what: the API has no engine (no online endpoints), workers no Files/Batch API.
            chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            assert _status(api.url + "/v1/chat/completions", "POST", chat) == 404
            assert _status(workers[0].url + "/v1/chat/completions", "POST", chat) == 200
            assert _status(workers[0].url + "/v1/files") == 404
            assert _status(workers[0].url + "/health") == 200 and _status(api.url + "/health") == 200
        finally:
            for server in (api, *workers):
                server.stop()
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert all(" claimed (" in log for log in logs), "both workers claimed batches"
    assert " claimed (" not in (tmp_path / "api.log").read_text()
    assert not any("Traceback" in log for log in logs)
