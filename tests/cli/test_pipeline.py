"""For the nightly pipeline, end to end against a live server (runner + fake engine, the demo
tokenizer): a batch whose engine fails some lines is retried through the official openai client's
`post` and through `tokabatch retry`, and `download --merge` gives every custom_id once with no
error left (JSONL and Parquet); a line rejected for what it asks is not retried unless --all; a dry
run counts exactly the prompt tokens the run reports and estimates its duration from the last one."""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tests.cli.conftest import needs_demo_tokenizer
from tokabatch.cli import app

pytestmark = needs_demo_tokenizer

FAST_RETRIES = {"retry_after_s": 0.05, "max_retry_after_s": 0.1}
NUM_LINES = 10


def _write(path: Path, num_lines: int = NUM_LINES, **extra) -> list[str]:
    """Completions lines whose token-id prompt starts with the line's index + 1 (the fake engine
    decides by that which lines it fails)."""
    with path.open("w") as f:
        for i in range(num_lines):
            body = {"model": "demo", "prompt": [i + 1, 7, 7], "max_tokens": 3, "temperature": 0, **extra}
            f.write(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/completions",
                                "body": body}) + "\n")
    return [f"q{i}" for i in range(num_lines)]


class Failing:
    """The fake engine fails (500) the requests whose prompt starts with one of `firsts`."""

    def __init__(self, *firsts: int) -> None:
        self.firsts = set(firsts)

    def __call__(self, request) -> bool:
        return request.prompt_token_ids[0] in self.firsts


def _cli(server, *args: str):
    return CliRunner().invoke(app, [*args, "--base-url", server.base_url])


def _wait(client: openai.OpenAI, batch_id: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status}"
        time.sleep(0.05)
    return batch


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_failed_lines_are_retried_and_merged_with_every_custom_id_once(fake_server_factory, tmp_path):
    failing = Failing(3, 6, 9)                         # q2, q5, q8
    server = fake_server_factory(loop_kwargs={"fail_request": failing}, runner=FAST_RETRIES)
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    src = tmp_path / "in.jsonl"
    ids = _write(src)
    submitted = _cli(server, "submit", str(src), "--wait", "--poll-interval", "0.05")
    assert submitted.exit_code == 3, submitted.output                  # completed with failed lines
    parent_id = submitted.stdout.split()[0]
    parent = client.batches.retrieve(parent_id)
    assert (parent.request_counts.completed, parent.request_counts.failed) == (7, 3)

    # The engine recovers for two of the three; the official client retries through `post`.
    failing.firsts = {9}
    child = client.post(f"/batches/{parent_id}/retry", cast_to=openai.types.Batch, body={})
    assert child.metadata == {"parent_batch_id": parent_id} and child.model_extra["parent_batch_id"] == parent_id
    child = _wait(client, child.id)
    assert (child.request_counts.total, child.request_counts.completed, child.request_counts.failed) == (3, 2, 1)
    listed = client.get(f"/batches?parent_batch_id={parent_id}", cast_to=object)
    assert [b["id"] for b in listed["data"]] == [child.id]

    # The CLI retries the child's last failure, waits, and writes the family's merged results.
    failing.firsts = set()
    merged_child = tmp_path / "child-merged.jsonl"
    retried = _cli(server, "retry", child.id, "--wait", "--poll-interval", "0.05", "-o", str(merged_child))
    assert retried.exit_code == 0, retried.output
    grandchild = client.batches.retrieve(retried.stdout.split()[0])
    assert grandchild.metadata["parent_batch_id"] == child.id and grandchild.request_counts.completed == 1
    assert sorted(x["custom_id"] for x in _lines(merged_child)) == ["q2", "q5", "q8"]

    for name in ("all.jsonl", "all.parquet"):
        out = tmp_path / name
        merged = _cli(server, "download", parent_id, "--merge", "-o", str(out))
        assert merged.exit_code == 0, merged.output
        assert "3 batch(es)" in merged.output and "10 lines succeeded, 0 failed" in merged.output
        if name.endswith(".jsonl"):
            lines = _lines(out)
            assert sorted(x["custom_id"] for x in lines) == ids
            assert all(x["error"] is None and x["response"]["status_code"] == 200 for x in lines)
            assert [x["custom_id"] for x in lines][:7] == [f"q{i}" for i in range(10) if i not in (2, 5, 8)]
        else:
            rows = pq.read_table(out).to_pylist()
            assert sorted(r["custom_id"] for r in rows) == ids
            assert all(r["status_code"] == 200 and r["error_code"] is None for r in rows)
            assert {r["custom_id"]: r["line"] for r in rows} == {f"q{i}": i + 1 for i in range(10)}   # the parent's


def test_lines_rejected_for_what_they_ask_are_retried_only_with_all(fake_server_factory, tmp_path):
    server = fake_server_factory(loop_kwargs={}, runner=FAST_RETRIES)
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    src = tmp_path / "in.jsonl"
    _write(src, 3, temperature=7)                      # every line: 400 invalid temperature
    batch_id = _cli(server, "submit", str(src), "--wait", "--poll-interval", "0.05").stdout.split()[0]
    with pytest.raises(openai.BadRequestError) as refused:
        client.post(f"/batches/{batch_id}/retry", cast_to=openai.types.Batch, body={})
    assert refused.value.code == "nothing_to_retry"
    assert "all=true" in refused.value.message
    retried = _cli(server, "retry", batch_id, "--all", "--wait", "--poll-interval", "0.05")
    assert retried.exit_code == 3, retried.output    # run again, rejected again
    assert client.batches.retrieve(retried.stdout.split()[0]).request_counts.failed == 3


def test_retry_errors(fake_server_factory, tmp_path):
    server = fake_server_factory(loop_kwargs={"token_interval_s": 0.2}, runner=FAST_RETRIES)
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.post("/batches/batch_nope/retry", cast_to=openai.types.Batch, body={})
    src = tmp_path / "in.jsonl"
    _write(src, 2)
    batch_id = _cli(server, "submit", str(src)).stdout.split()[0]
    with pytest.raises(openai.ConflictError):                       # still running
        client.post(f"/batches/{batch_id}/retry", cast_to=openai.types.Batch, body={})
    with pytest.raises(openai.BadRequestError) as unknown:
        client.post(f"/batches/{batch_id}/retry", cast_to=openai.types.Batch, body={"al": True})
    assert unknown.value.code == "unknown_parameter"
    done = _wait(client, batch_id)
    assert done.request_counts.failed == 0
    with pytest.raises(openai.BadRequestError) as nothing:           # nothing failed
        client.post(f"/batches/{batch_id}/retry", cast_to=openai.types.Batch, body={})
    assert nothing.value.code == "nothing_to_retry"
    usage = _cli(server, "download", batch_id, "--merge")
    assert usage.exit_code == 2 and "-o FILE" in usage.output


def test_dry_run_counts_the_prompt_tokens_the_run_reports_and_estimates_its_duration(fake_server_factory, tmp_path):
    server = fake_server_factory(loop_kwargs={"token_interval_s": 0.01, "max_running": 4}, runner=FAST_RETRIES)
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    src = tmp_path / "chat.jsonl"
    with src.open("w") as f:
        for i in range(40):
            messages = [{"role": "system", "content": "You answer briefly."},
                        {"role": "user", "content": f"Question number {i}: what is {i} plus {i * 7}?"}]
            f.write(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "demo", "messages": messages, "max_tokens": 40,
                                         "temperature": 0}}) + "\n")
        f.write(json.dumps({"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
                            "body": {"model": "demo", "messages": [{"role": "user", "content": "x"}],
                                     "temperature": 9}}) + "\n")
    first = _cli(server, "submit", str(src), "--dry-run")
    assert first.exit_code == 0, first.output
    assert "lines: 41 (1 would be rejected by the endpoint)" in first.output
    assert "estimated duration: unknown" in first.output       # nothing has run on this server yet
    file_id = client.files.create(file=src.open("rb"), purpose="batch").id
    report = client.post("/batches", cast_to=object, body={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                            "completion_window": "24h", "dry_run": True})
    assert report["object"] == "batch.dry_run" and report["valid"] and report["request_counts"]["rejected"] == 1
    assert report["prefix_sharing"]["shared_prompt_tokens"] > 0          # the system prompt's pages
    assert not client.batches.list().data                                # a dry run creates no batch

    began = time.monotonic()
    batch = _wait(client, client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                                completion_window="24h").id)
    took = time.monotonic() - began
    assert batch.usage.input_tokens == report["usage"]["input_tokens"]            # exactly
    assert batch.usage.output_tokens <= report["usage"]["max_output_tokens"]
    second = client.post("/batches", cast_to=object, body={"input_file_id": file_id, "dry_run": True,
                                                            "endpoint": "/v1/chat/completions",
                                                            "completion_window": "24h"})
    assert second["throughput_basis"]["batches"] == 1
    assert second["usage"]["expected_output_tokens"] == pytest.approx(batch.usage.output_tokens, rel=0.05)
    assert second["estimated_seconds"] == pytest.approx(took, rel=0.5, abs=1.0)


def test_dry_run_reports_validation_errors_with_line_numbers(fake_server_factory, tmp_path):
    server = fake_server_factory(loop_kwargs={})
    src = tmp_path / "bad.jsonl"
    _write(src, 2)
    with src.open("a") as f:
        f.write("{not json\n")
    result = _cli(server, "submit", str(src), "--dry-run")
    assert result.exit_code == 4, result.output
    assert "line 3: invalid_json_line" in result.output
