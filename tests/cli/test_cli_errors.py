"""The CLI's argument errors and one-line errors, through typer's runner and one real subprocess.

No server is started here: an unreachable server must give exit 1 and one line on stderr.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokabatch.cli import app
from tokabatch.cli.batches import errors_path_for, infer_endpoint, parse_metadata
from tokabatch.cli.common import CliError
from tokabatch.cli.waiting import exit_code_for, format_batch_errors

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def _dead_url() -> str:
    """A loopback URL nobody listens on (the port was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def _assert_one_line_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0]


def _chat_file(tmp_path: Path, n: int = 2) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                        "body": {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}})
                            + "\n" for i in range(n)))
    return path


def test_submit_missing_file_is_one_line_usage_error(runner, tmp_path):
    result = runner.invoke(app, ["submit", str(tmp_path / "nope.jsonl")])
    _assert_one_line_error(result, 2, "no such file", "nope.jsonl")


@pytest.mark.parametrize("argv", [
    ["status", "batch_abc"], ["list"], ["cancel", "batch_abc"], ["download", "batch_abc"], ["files", "list"],
    ["files", "rm", "file-abc"],
])
def test_unreachable_server_is_exit_1_with_one_line(runner, argv):
    result = runner.invoke(app, [*argv, "--base-url", _dead_url()])
    _assert_one_line_error(result, 1, "cannot reach the server")


def test_submit_unreachable_server_uses_env_url(runner, tmp_path, monkeypatch):
    url = _dead_url()
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    result = runner.invoke(app, ["submit", str(_chat_file(tmp_path)), "--wait"])
    _assert_one_line_error(result, 1, "cannot reach the server", url)


def test_submit_bad_metadata_and_output_are_usage_errors(runner, tmp_path):
    path = _chat_file(tmp_path)
    _assert_one_line_error(runner.invoke(app, ["submit", str(path), "--metadata", "novalue"]), 2, "key=value")
    _assert_one_line_error(runner.invoke(app, ["submit", str(path), "-o", str(tmp_path / "out.csv")]), 2, ".parquet")
    _assert_one_line_error(runner.invoke(app, ["download", "batch_x", "-o", str(tmp_path / "out.csv")]), 2, ".parquet")


def test_submit_cannot_infer_endpoint(runner, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"custom_id": "a"}\nnot json\n')
    _assert_one_line_error(runner.invoke(app, ["submit", str(path)]), 2, "--endpoint")


def test_submit_refuses_what_the_upload_would_before_sending_it(runner, tmp_path):
    """A first line nested too deeply to parse was a RecursionError (exit 1); a file that is not UTF-8
    was named "cannot infer the endpoint". Both are the upload's own refusals now, before any upload
    (the server is unreachable here)."""
    bomb, latin1 = tmp_path / "bomb.jsonl", tmp_path / "latin1.jsonl"
    bomb.write_bytes(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    latin1.write_bytes(b"\xe9\n")
    _assert_one_line_error(runner.invoke(app, ["submit", str(bomb), "--base-url", _dead_url()]), 2,
                           "first line is not a JSON object")
    _assert_one_line_error(runner.invoke(app, ["submit", str(latin1), "--base-url", _dead_url()]), 2, "UTF-8")
    bomb.write_bytes(_chat_file(tmp_path).read_bytes().replace(b"}}\n", b', "user": ' + b"[" * 100_000
                                                                + b"]" * 100_000 + b"}}\n", 1))
    assert infer_endpoint(bomb) == "/v1/chat/completions"      # (the bomb on line 1 skipped: line 2 tells)


def test_submit_bad_poll_interval_and_base_url_are_usage_errors(runner, tmp_path):
    """A negative --poll-interval crashed after the batch was created; a URL without a scheme said
    "ValueError: unknown url type"."""
    path = _chat_file(tmp_path)
    result = runner.invoke(app, ["submit", str(path), "--wait", "--poll-interval", "-1", "--base-url", _dead_url()])
    assert result.exit_code == 2 and "--poll-interval" in result.output, result.output
    _assert_one_line_error(runner.invoke(app, ["submit", str(path), "--base-url", "notaurl"]), 2, "http://host:port/v1")


def test_unknown_option_is_usage_error(runner):
    result = runner.invoke(app, ["submit", "--no-such-flag"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_infer_endpoint_skips_blank_and_broken_lines(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('\n{broken\n{"url": "/v1/completions"}\n')
    assert infer_endpoint(path) == "/v1/completions"


def test_parse_metadata_keeps_equals_in_values():
    assert parse_metadata(["a=1", "b=x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    with pytest.raises(CliError):
        parse_metadata(["=v"])


def test_errors_path_sits_beside_the_output():
    assert errors_path_for(Path("/t/results.parquet")) == Path("/t/results.errors.jsonl")
    assert errors_path_for(Path("out.jsonl")) == Path("out.errors.jsonl")


@pytest.mark.parametrize("status,counts,code", [
    ("completed", {"total": 3, "completed": 3, "failed": 0}, 0),
    ("completed", {"total": 3, "completed": 2, "failed": 1}, 3),
    ("failed", {"total": 0, "completed": 0, "failed": 0}, 4),
    ("expired", {"total": 3, "completed": 1, "failed": 2}, 5),
    ("cancelled", {"total": 3, "completed": 1, "failed": 2}, 6),
])
def test_exit_code_for_each_terminal_state(status, counts, code):
    got, reason = exit_code_for({"id": "batch_x", "status": status, "request_counts": counts,
                                 "completion_window": "24h", "errors": None})
    assert got == code
    assert "batch_x" in reason and "\n" not in reason


def test_batch_errors_show_the_first_line_numbers():
    batch = {"errors": {"data": [
        {"code": "invalid_json_line", "message": "bad", "param": None, "line": 2},
        {"code": "missing_required_parameter", "message": "no url", "param": "url", "line": 5},
        {"code": "invalid_url", "message": "x", "param": "url", "line": 7},
        {"code": "invalid_url", "message": "y", "param": "url", "line": 9},
    ]}}
    text = format_batch_errors(batch)
    assert text.startswith("line 2: invalid_json_line: bad; line 5: missing_required_parameter [url]: no url")
    assert "line 9" not in text and "(and 1 more)" in text


def test_python_m_tokabatch_help_in_a_subprocess():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "tokabatch", "--help"], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    listed = {m.group(1) for m in re.finditer(r"^\W*([a-z]+)\s{2,}\S", proc.stdout, re.MULTILINE)}
    assert {"serve", "submit", "run", "status", "list", "cancel", "download", "files", "db", "models"} <= listed
    assert "Exit codes" in proc.stdout


def test_client_commands_do_not_import_torch():
    code = ("import sys; from typer.testing import CliRunner; from tokabatch.cli import app; "
            "CliRunner().invoke(app, ['list', '--base-url', 'http://127.0.0.1:9/v1']); "
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr


def test_serve_with_a_missing_model_folder_is_one_line(runner, tmp_path):
    result = runner.invoke(app, ["serve", "--model", str(tmp_path / "no-model"), "--data-dir", str(tmp_path)])
    _assert_one_line_error(result, 1, "no-model")


def test_serve_with_a_bad_dtype_is_one_line(runner, tmp_path):
    result = runner.invoke(app, ["serve", "--dtype", "float8", "--data-dir", str(tmp_path)])
    _assert_one_line_error(result, 2, "--dtype")


def test_db_upgrade_creates_the_sqlite_database(runner, tmp_path):
    result = runner.invoke(app, ["db", "upgrade", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "up to date" in result.stdout and (tmp_path / "tokabatch.db").is_file()
    again = runner.invoke(app, ["db", "upgrade", "--data-dir", str(tmp_path)])
    assert again.exit_code == 0


def test_db_upgrade_unreachable_postgres_is_one_line(runner):
    result = runner.invoke(app, ["db", "upgrade", "--db", "postgresql+asyncpg://nobody:pw@127.0.0.1:1/none"])
    _assert_one_line_error(result, 1, "cannot reach the database", "nobody:***@127.0.0.1:1")
    assert ":pw@" not in result.stderr


def test_a_closed_stdout_ends_a_command_quietly(tmp_path):
    """`tokabatch list --json | head -1` on a long list: the reader leaves, the command stops without
    blaming the server (a broken pipe is also a ConnectionError)."""
    script = ("import typer\nfrom tokabatch.cli.common import one_line_errors\n"
              "@one_line_errors\ndef dump():\n    for i in range(200000):\n        print('line', i)\n"
              "app = typer.Typer()\napp.command()(dump)\napp()\n")
    result = subprocess.run(f"{sys.executable} -c \"{script}\" | head -1", shell=True, capture_output=True,
                            text=True, timeout=60)
    assert result.stdout == "line 0\n"
    assert result.stderr == ""
