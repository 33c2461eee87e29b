"""`tokabatch submit --wait` end to end against a live server (runner + fake engine): each
documented exit code, the downloaded results (JSONL and Parquet) and one line per failure."""

from __future__ import annotations

import collections
import json
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.cli.conftest import needs_demo_tokenizer
from tokabatch.cli import app

pytestmark = needs_demo_tokenizer


def _write(path: Path, bodies: list[dict | str]) -> list[str]:
    ids = []
    with path.open("w") as f:
        for i, body in enumerate(bodies):
            if isinstance(body, str):
                f.write(body + "\n")
                continue
            f.write(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body}) + "\n")
            ids.append(f"c{i}")
    return ids


def _chat(i: int, **extra) -> dict:
    return {"model": "demo", "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 4,
            "temperature": 0, **extra}


def _submit(server, src: Path, *extra: str):
    return CliRunner().invoke(app, ["submit", str(src), "--wait", "--poll-interval", "0.1",
                                    "--base-url", server.base_url, *extra])


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def test_completed_is_exit_0_and_results_are_downloaded(fake_server_factory, tmp_path):
    server = fake_server_factory(loop_kwargs={})
    src = tmp_path / "in.jsonl"
    ids = _write(src, [_chat(i) for i in range(5)])
    out = tmp_path / "res.jsonl"
    result = _submit(server, src, "-o", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().startswith("batch_")
    lines = _lines(out)
    assert sorted(x["custom_id"] for x in lines) == ids
    assert all(x["response"]["status_code"] == 200 for x in lines)
    assert not (tmp_path / "res.errors.jsonl").exists()


def test_completed_with_failed_lines_is_exit_3_with_the_error_file(fake_server_factory, tmp_path):
    server = fake_server_factory(loop_kwargs={})
    src = tmp_path / "in.jsonl"
    ids = _write(src, [_chat(0), _chat(1, temperature=7), _chat(2)])
    out = tmp_path / "res.jsonl"
    result = _submit(server, src, "-o", str(out))
    assert result.exit_code == 3, result.output
    assert "1 of 3 lines failed" in result.stderr and "Traceback" not in result.output
    ok, errors = _lines(out), _lines(tmp_path / "res.errors.jsonl")
    assert sorted(x["custom_id"] for x in ok + errors) == ids
    assert [(x["custom_id"], x["response"]["status_code"]) for x in errors] == [("c1", 400)]


def test_parquet_output_by_extension(fake_server_factory, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    server = fake_server_factory(loop_kwargs={})
    src = tmp_path / "in.jsonl"
    ids = _write(src, [_chat(i) for i in range(3)])
    out = tmp_path / "res.parquet"
    result = _submit(server, src, "--output", str(out))
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["custom_id"] for r in rows) == ids and all(r["status_code"] == 200 for r in rows)


def test_validation_failure_is_exit_4_with_line_numbers_on_one_line(fake_server_factory, tmp_path):
    server = fake_server_factory(loop_kwargs={})
    src = tmp_path / "in.jsonl"
    _write(src, [_chat(0), "{not json", _chat(2, stream=True)])
    result = _submit(server, src, "-o", str(tmp_path / "res.jsonl"))
    assert result.exit_code == 4, result.output
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: batch ")
    assert "line 2: invalid_json_line" in err[0] and "line 3: streaming_unsupported" in err[0]


def test_expired_is_exit_5_and_every_line_is_accounted_for(fake_server_factory, tmp_path):
    # The runner's clock runs 30x: the 1-minute window ends after about 2 s; each line takes ~1 s.
    server = fake_server_factory(loop_kwargs={"token_interval_s": 0.25, "max_running": 1, "max_waiting": 1},
                                 clock_speed=30.0)
    src = tmp_path / "in.jsonl"
    ids = _write(src, [_chat(i) for i in range(8)])
    out = tmp_path / "res.jsonl"
    result = _submit(server, src, "--completion-window", "1m", "-o", str(out))
    assert result.exit_code == 5, result.output
    assert "expired" in result.stderr and result.stderr.count("error:") == 1
    done = collections.Counter(x["custom_id"] for x in _lines(out) + _lines(tmp_path / "res.errors.jsonl"))
    assert sorted(done) == ids and set(done.values()) == {1}
    assert any(x["error"] and x["error"]["code"] == "batch_expired" for x in _lines(tmp_path / "res.errors.jsonl"))


def test_cancelled_is_exit_6(fake_server_factory, tmp_path):
    server = fake_server_factory(loop_kwargs={"token_interval_s": 0.1, "max_running": 1, "max_waiting": 1})
    src = tmp_path / "in.jsonl"
    _write(src, [_chat(i) for i in range(20)])

    def cancel_when_running() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"{server.base_url}/batches") as resp:
                data = json.loads(resp.read())["data"]
            if data and data[0]["status"] == "in_progress" and data[0]["request_counts"]["completed"] >= 1:
                req = urllib.request.Request(f"{server.base_url}/batches/{data[0]['id']}/cancel", method="POST")
                urllib.request.urlopen(req).close()
                return
            time.sleep(0.05)

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    result = _submit(server, src, "-o", str(tmp_path / "res.jsonl"))
    canceller.join()
    assert result.exit_code == 6, result.output
    assert "cancelled" in result.stderr
    assert 1 <= len(_lines(tmp_path / "res.jsonl")) < 20


def test_submit_wait_as_a_subprocess(fake_server_factory, tmp_path):
    import os
    import subprocess
    import sys

    server = fake_server_factory(loop_kwargs={})
    src = tmp_path / "in.jsonl"
    ids = _write(src, [_chat(i) for i in range(3)] + ["{broken"])
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OPENAI_BASE_URL": server.base_url}
    proc = subprocess.run([sys.executable, "-m", "tokabatch", "submit", str(src), "-o", str(tmp_path / "r.jsonl"),
                           "--poll-interval", "0.1"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 4, proc.stderr
    assert proc.stdout.strip().startswith("batch_")
    assert proc.stderr.strip().count("\n") == 0 and "line 4: invalid_json_line" in proc.stderr

    src.write_text("".join(line + "\n" for line in src.read_text().splitlines()[:3]))
    proc = subprocess.run([sys.executable, "-m", "tokabatch", "submit", str(src), "-o", str(tmp_path / "r.jsonl"),
                           "--poll-interval", "0.1"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(x["custom_id"] for x in _lines(tmp_path / "r.jsonl")) == ids
