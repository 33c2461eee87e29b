"""Hostile lines through `tokabatch serve`: each line built to exhaust the server or the engine (huge n,
max_tokens far past the context, thousands of logit_bias entries or stop strings, a 1 MB stop
string, 100k messages, a prompt past the context, a nesting bomb, a huge schema) becomes its own
400 in the error file, naming the parameter; the good lines beside them complete; the server's
peak memory stays bounded (printed for docs/reliability.md)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.service.serve_process import ServeProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _hostile(model: str) -> list[tuple[str, dict, str]]:
    """(custom_id, body changes, the param the 400 names)."""
    return [
        ("n", {"n": 100_000}, "n"),
        ("max_tokens", {"max_tokens": 10**12}, "messages"),
        ("logit_bias", {"logit_bias": {str(i): 1 for i in range(20_000)}}, "logit_bias"),
        ("stop_many", {"stop": ["s"] * 5_000}, "stop"),
        ("stop_long", {"stop": ["x" * 1_000_000]}, "stop"),
        ("stop_token_ids", {"stop_token_ids": list(range(100_000))}, "stop_token_ids"),
        ("messages", {"messages": [{"role": "user", "content": "hi"}] * 100_000}, "messages"),
        ("prompt", {"messages": [{"role": "user", "content": "word " * 400_000}]}, "messages"),
        ("schema", {"response_format": {"type": "json_schema", "json_schema": {
            "name": "big", "schema": {"type": "object", "properties": {f"p{i}": {"type": "string"}
                                                                      for i in range(20_000)}}}}},
         "response_format.json_schema.schema"),
        ("top_logprobs", {"logprobs": True, "top_logprobs": 10_000}, "top_logprobs"),
    ]


def test_hostile_lines_are_each_a_400_and_memory_stays_bounded(tmp_path, serve_db):
    server = ServeProcess(tmp_path / "data", tmp_path / "serve.log", db_url=serve_db)
    try:
        client = server.client()
        model = client.models.list().data[0].id
        hostile = _hostile(model)
        lines = []
        for cid, changes, _ in hostile:
            body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, **changes}
            lines.append({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body})
        lines += [{"custom_id": f"good{i}", "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": model, "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 4}}
                  for i in range(4)]
        raw = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
        rss_before = server.rss_mb()
        f = client.files.create(file=("hostile.jsonl", raw), purpose="batch")
        batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        deadline = time.monotonic() + 240
        while (b := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "expired", "cancelled"):
            assert time.monotonic() < deadline, b.status
            time.sleep(0.2)
        peak = _peak_rss_mb(server.proc.pid)
        assert b.status == "completed", b
        errors = {x["custom_id"]: x for x in map(json.loads, client.files.content(b.error_file_id).text.splitlines())}
    finally:
        server.stop()
    assert b.request_counts.completed == 4 and b.request_counts.failed == len(hostile)
    for cid, _, param in hostile:
        response = errors[cid]["response"]
        assert response["status_code"] == 400, (cid, response)
        error = response["body"]["error"]
        assert error["type"] == "invalid_request_error" and error["message"], (cid, error)
        if param is not None:
            assert error["param"] == param, (cid, error)
    print(f"\nhostile lines: {len(raw) / 1e6:.1f} MB file, {len(hostile)} hostile + 4 good lines; server RSS "
          f"{rss_before:.0f} MB before, peak {peak:.0f} MB")
    assert peak - rss_before < 400, (rss_before, peak)
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def test_a_nesting_bomb_fails_its_batch_at_validation_with_the_line_number(tmp_path, serve_db):
    server = ServeProcess(tmp_path / "data", tmp_path / "serve.log", db_url=serve_db)
    try:
        client = server.client()
        model = client.models.list().data[0].id
        good = {"custom_id": "good", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}}
        # 100,000 arrays deep, written by hand: json.dumps itself cannot.
        bomb = json.dumps({**good, "custom_id": "bomb", "body": {**good["body"], "user": "NEST"}})
        raw = (json.dumps(good) + "\n" + bomb.replace('"NEST"', "[" * 100_000 + "]" * 100_000) + "\n").encode()
        f = client.files.create(file=("bomb.jsonl", raw), purpose="batch")
        batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        deadline = time.monotonic() + 60
        while (b := client.batches.retrieve(batch.id)).status in ("validating", "in_progress"):
            assert time.monotonic() < deadline, b.status
            time.sleep(0.1)
    finally:
        server.stop()
    assert b.status == "failed" and [(e.code, e.line) for e in b.errors.data] == [("invalid_json_line", 2)], b
    assert "nested too deeply" in b.errors.data[0].message
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")

