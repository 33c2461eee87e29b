"""What a newcomer hits at the front door: the README's crontab line under cron's bare environment,
progress lines in a log, Ctrl-C and SIGTERM of `run`, and the messages that must say what is wrong
(a missing model, a taken port, an empty or non-UTF-8 file, a cancelled batch) before anything slow."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.cli.conftest import needs_demo_tokenizer
from tokabatch.cli import app
from tokabatch.cli.waiting import exit_code_for

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _write(path: Path, count: int, **body) -> list[str]:
    with path.open("w") as f:
        for i in range(count):
            line = {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "demo", "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 4,
                             **body}}
            f.write(json.dumps(line) + "\n")
    return [f"c{i}" for i in range(count)]


def _tokabatch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokabatch", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout, cwd=REPO)


# ---- the README's crontab line ------------------------------------------------------------------

@needs_demo_tokenizer
def test_the_readme_crontab_line_works_under_crons_environment(fake_server_factory, tmp_path):
    server = fake_server_factory(loop_kwargs={})
    line = next(x.strip() for x in (REPO / "README.md").read_text().splitlines() if x.strip().startswith("0 2 * * *"))
    command = line.split(maxsplit=5)[5]            # cron: five time fields, then the command for /bin/sh
    command = (command.replace("/opt/tokabatch/.venv/bin/tokabatch", str(Path(sys.executable).parent / "tokabatch"))
               .replace("/srv/jobs", str(tmp_path)).replace("http://127.0.0.1:8000/v1", server.base_url)
               .replace("\\%", "%"))               # cron turns an unescaped % into a newline
    ids = _write(tmp_path / "today.jsonl", 3)
    (tmp_path / "out").mkdir()
    done = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", "/bin/sh", "-c", command], capture_output=True,
                          text=True, timeout=120)
    log = (tmp_path / "submit.log").read_text()
    assert done.returncode == 0, log
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "out" / f"{dt.date.today():%Y-%m-%d}.parquet")
    assert sorted(table.column("custom_id").to_pylist()) == ids
    assert re.match(r"batch_\w+\n", log) and "completed: 3 of 3 lines succeeded" in log


# ---- progress without a terminal ----------------------------------------------------------------

@needs_demo_tokenizer
def test_submit_wait_logs_progress_lines_when_not_on_a_terminal(fake_server_factory, tmp_path):
    server = fake_server_factory(loop_kwargs={"token_interval_s": 0.15, "max_running": 2, "max_waiting": 0})
    _write(tmp_path / "in.jsonl", 8)
    done = _tokabatch("submit", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"), "--base-url",
                      server.base_url, "--poll-interval", "0.1", "--progress-every", "0.3")
    assert done.returncode == 0, done.stderr
    progress = [x for x in done.stderr.splitlines() if ": in_progress: " in x]
    assert len(progress) >= 2, done.stderr
    assert re.search(r"\d+ ok, 0 failed / 8", progress[-1])
    # An ETA only once lines have finished over a measurable time: never on a line showing 0 done.
    assert not any("0 ok, 0 failed" in x and "ETA" in x for x in progress)


def test_run_logs_progress_lines_when_not_on_a_terminal(tmp_path):
    _write(tmp_path / "in.jsonl", 6)
    done = _tokabatch("run", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"), "--progress-every",
                      "0.2", "--engine-factory", "tests.cli.fake_loops:slow")
    assert done.returncode == 0, done.stderr
    progress = [x for x in done.stderr.splitlines() if x.startswith("run: running: ")]
    assert progress and re.search(r"\d+ ok, 0 failed / 6", progress[-1]), done.stderr


# ---- Ctrl-C and SIGTERM of `run` ----------------------------------------------------------------

@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_run_stops_cleanly_on_a_signal_and_resumes(tmp_path, signum, code):
    ids = _write(tmp_path / "in.jsonl", 30)
    out = tmp_path / "out.jsonl"
    argv = [sys.executable, "-m", "tokabatch", "run", str(tmp_path / "in.jsonl"), "-o", str(out),
            "--engine-factory", "tests.cli.fake_loops:slow"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    work = tmp_path / ".out.jsonl.tokabatch" / "output.jsonl"
    deadline = time.monotonic() + 60
    while not (work.is_file() and work.stat().st_size > 0):        # some lines written, the rest running
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    sent = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code and time.monotonic() - sent < 10, err
    assert "re-run the same command to resume" in err
    assert "Traceback" not in err and "terminate called" not in err
    written = [json.loads(x)["custom_id"] for x in work.read_text().splitlines()]
    assert 0 < len(written) < len(ids)
    done = _tokabatch("run", str(tmp_path / "in.jsonl"), "-o", str(out), "--engine-factory",
                      "tests.cli.fake_loops:healthy")
    assert done.returncode == 0, done.stderr
    assert sorted(json.loads(x)["custom_id"] for x in out.read_text().splitlines()) == sorted(ids)


def test_a_finished_run_run_again_starts_no_engine(tmp_path):
    _write(tmp_path / "in.jsonl", 3)
    out = str(tmp_path / "out.jsonl")
    first = _tokabatch("run", str(tmp_path / "in.jsonl"), "-o", out, "--engine-factory", "tests.cli.fake_loops:healthy")
    assert first.returncode == 0, first.stderr
    again = _tokabatch("run", str(tmp_path / "in.jsonl"), "-o", out, "--engine-factory",
                       "tests.cli.fake_loops:refuses_to_start")
    assert again.returncode == 0, again.stderr
    assert "0 succeeded, 0 failed, 3 already done of 3" in again.stderr


# ---- messages that say what is wrong --------------------------------------------------------------

def test_run_with_a_missing_model_folder_names_it_before_the_file(tmp_path):
    _write(tmp_path / "in.jsonl", 2)
    result = CliRunner().invoke(app, ["run", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o.jsonl"),
                                      "--model", str(tmp_path / "nonexistent")])
    assert result.exit_code == 1
    assert f"error: no such model folder: {tmp_path / 'nonexistent'}" in result.output
    assert "model_not_found" not in result.output


def test_serve_on_a_taken_port_fails_before_loading_the_model(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = _tokabatch("serve", "--model", "demo", "--port", str(port), "--data-dir", str(tmp_path))
    assert done.returncode == 1 and time.monotonic() - started < 30
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "engine" not in done.stderr


def test_submit_of_an_empty_file_says_it_is_empty(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    result = CliRunner().invoke(app, ["submit", str(path)])
    assert result.exit_code == 2 and "only blank lines" in result.output and "--endpoint" not in result.output


def test_run_refuses_a_file_that_is_not_utf8_as_an_upload_is_refused(tmp_path):
    # submit: the server refuses the upload (a 4xx: exit 2); run: the same check, the same exit code.
    path = tmp_path / "latin1.jsonl"
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "demo", "messages": [{"role": "user", "content": "café"}]}}
    path.write_bytes(json.dumps(line, ensure_ascii=False).encode("latin-1") + b"\n")
    result = CliRunner().invoke(app, ["run", str(path), "-o", str(tmp_path / "o.jsonl"),
                                      "--engine-factory", "tests.cli.fake_loops:healthy"])
    assert result.exit_code == 2 and "not valid UTF-8" in result.output


def test_a_batch_cancelled_before_any_line_ran_says_so():
    batch = {"id": "batch_x", "status": "cancelled", "request_counts": {"total": 200, "completed": 0, "failed": 200}}
    code, reason = exit_code_for(batch)
    assert code == 6 and "with 0 of 200 lines completed" in reason and "after 200 of 200" not in reason


def test_serve_help_shows_every_option_whole():
    result = CliRunner().invoke(app, ["serve", "--help"], terminal_width=80)
    for option in ("--max-tokens-per-step", "--kv-memory-fraction", "--allow-custom-windows", "--served-model-name"):
        assert option in result.output
    assert "TOKABATCH_DATA_DIR)" in result.output and "…" not in result.output


@needs_demo_tokenizer
def test_the_readme_nightly_pipeline_retries_what_the_engine_failed(fake_server_factory, tmp_path):
    """The README's second crontab line (examples/nightly.sh) under cron's environment: a dry run, the
    batch, whose engine fails two lines through every attempt, then their retry, which succeeds; the
    merged Parquet holds every custom_id once, all succeeded."""
    seen: dict[int, int] = {}
    failing: set[int] = set()

    def fails_first_five(request) -> bool:     # the batch's five claims fail these lines; the retry runs them
        key = sum(request.prompt_token_ids)
        seen[key] = seen.get(key, 0) + 1
        return key in failing and seen[key] <= 5

    server = fake_server_factory(loop_kwargs={"fail_request": fails_first_five},
                                 runner={"retry_after_s": 0.05, "max_retry_after_s": 0.1})
    line = next(x.strip() for x in (REPO / "README.md").read_text().splitlines() if x.strip().startswith("30 2 * * *"))
    command = (line.split(maxsplit=5)[5]
               .replace("/opt/tokabatch/.venv/bin/tokabatch", str(Path(sys.executable).parent / "tokabatch"))
               .replace("/opt/tokabatch/", str(REPO) + "/").replace("/srv/jobs", str(tmp_path))
               .replace("http://127.0.0.1:8000/v1", server.base_url).replace("\\%", "%"))
    ids = _write(tmp_path / "today.jsonl", 6)
    from tokabatch import model_store
    from tokabatch.text import Tokenizer

    tokenizer = Tokenizer.from_folder(model_store.resolve_model_path("demo"))
    lines = [json.loads(x) for x in (tmp_path / "today.jsonl").read_text().splitlines()]
    prompts = [tokenizer.encode(tokenizer.render_chat(x["body"]["messages"]), add_special_tokens=False)
               for x in lines]
    failing |= {sum(prompts[1]), sum(prompts[4])} - {sum(prompts[i]) for i in (0, 2, 3, 5)}
    assert len(failing) == 2, "the chosen lines' prompts must be told apart by their sums"
    (tmp_path / "out").mkdir()
    done = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", "/bin/sh", "-c", command], capture_output=True,
                          text=True, timeout=180)
    log = (tmp_path / "nightly.log").read_text()
    assert done.returncode == 0, log
    assert "lines: 6" in log and "prompt tokens:" in log and "estimated duration" in log      # the dry run
    assert "completed with 2 of 6 lines failed" in log and "merged 2 batch(es)" in log
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "out" / f"{dt.date.today():%Y-%m-%d}.parquet").to_pylist()
    assert sorted(r["custom_id"] for r in rows) == ids and all(r["status_code"] == 200 for r in rows)
