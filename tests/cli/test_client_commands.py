"""The client commands (submit, status, list, cancel, download, files) against a live server on
loopback with no engine: what they print (tables and --json) and how server errors become one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.service.live_server import LiveServer, server_config
from tokabatch.cli import app


@pytest.fixture
def server(tmp_path):
    live = LiveServer(server_config(tmp_path / "data"), served_model_names=("demo",)).start()
    yield live
    live.stop()


def _input(tmp_path: Path, n: int = 3, url: str = "/v1/chat/completions") -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": url,
                                        "body": {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}})
                            + "\n" for i in range(n)))
    return path


def cli(server: LiveServer, *argv: str):
    return CliRunner().invoke(app, [*argv, "--base-url", server.base_url])


def test_submit_prints_the_batch_id_and_status_shows_it(server, tmp_path):
    result = cli(server, "submit", str(_input(tmp_path)), "--metadata", "team=nlp", "--metadata", "run=1")
    assert result.exit_code == 0, result.output
    batch_id = result.stdout.strip()
    assert batch_id.startswith("batch_") and "\n" not in batch_id

    shown = cli(server, "status", batch_id, "--json")
    assert shown.exit_code == 0
    batch = json.loads(shown.stdout)
    assert batch["endpoint"] == "/v1/chat/completions"          # inferred from the lines
    assert batch["metadata"] == {"team": "nlp", "run": "1"}
    assert batch["completion_window"] == "24h"

    table = cli(server, "status", batch_id)
    assert batch_id in table.stdout and "validating" in table.stdout

    listed = cli(server, "list", "--json")
    assert [b["id"] for b in json.loads(listed.stdout)] == [batch_id]
    assert batch_id in cli(server, "list").stdout


def test_cancel_then_cancel_a_finished_batch_is_one_line(server, tmp_path):
    batch_id = cli(server, "submit", str(_input(tmp_path))).stdout.strip()
    result = cli(server, "cancel", batch_id)
    assert result.exit_code == 0 and result.stdout.split() == [batch_id, "cancelling"]
    missing = cli(server, "cancel", "batch_doesnotexist")
    assert missing.exit_code == 2
    assert missing.stderr.count("\n") == 1 and "No batch found" in missing.stderr


def test_server_rejections_are_usage_errors(server, tmp_path):
    bad_endpoint = cli(server, "submit", str(_input(tmp_path)), "--endpoint", "/v1/nope")
    assert bad_endpoint.exit_code == 2 and "endpoint" in bad_endpoint.stderr
    assert bad_endpoint.stderr.count("\n") == 1
    window = cli(server, "submit", str(_input(tmp_path)), "--completion-window", "1h")
    assert window.exit_code == 2 and "completion_window" in window.stderr


def test_files_list_download_and_rm(server, tmp_path):
    src = _input(tmp_path)
    cli(server, "submit", str(src))
    files = json.loads(cli(server, "files", "list", "--json").stdout)
    assert len(files) == 1 and files[0]["filename"] == "in.jsonl" and files[0]["purpose"] == "batch"
    file_id = files[0]["id"]
    assert file_id in cli(server, "files", "list").stdout

    got = tmp_path / "copy.jsonl"
    assert cli(server, "download", file_id, "-o", str(got)).exit_code == 0
    assert got.read_bytes() == src.read_bytes()
    assert cli(server, "download", file_id).stdout == src.read_text()

    other = tmp_path / "other.jsonl"
    other.write_text(src.read_text())
    resp = CliRunner().invoke(app, ["files", "rm", file_id, "--base-url", server.base_url])
    # the input of a batch that is still validating cannot be deleted (409) -> one line, exit 2
    assert resp.exit_code == 2 and resp.stderr.count("\n") == 1


def test_download_of_an_unfinished_batch_says_why(server, tmp_path):
    batch_id = cli(server, "submit", str(_input(tmp_path))).stdout.strip()
    result = cli(server, "download", batch_id, "-o", str(tmp_path / "out.jsonl"))
    assert result.exit_code == 2 and "has no results" in result.stderr


def test_api_key_is_sent(tmp_path):
    live = LiveServer(server_config(tmp_path / "data", api_keys=("sekret",)), served_model_names=("demo",)).start()
    try:
        denied = CliRunner().invoke(app, ["list", "--base-url", live.base_url, "--api-key", "wrong"])
        assert denied.exit_code == 1 and "401" in denied.stderr
        ok = CliRunner().invoke(app, ["list", "--base-url", live.base_url], env={"OPENAI_API_KEY": "sekret"})
        assert ok.exit_code == 0, ok.output
    finally:
        live.stop()


def test_an_upload_streams_the_file_and_arrives_byte_for_byte(server, tmp_path, monkeypatch):
    """`submit` sends its file a chunk at a time (no whole-file read: a 150 MB input is not held in
    the client's memory) and the server stores exactly those bytes."""
    from tokabatch.cli import client as client_module

    line = json.dumps({"custom_id": "r", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "demo", "messages": [{"role": "user", "content": "x" * 1000}]}})
    src = tmp_path / "big.jsonl"
    src.write_text("".join(line.replace('"r"', f'"r{i}"') + "\n" for i in range(3000)))   # ~3 MB: 3+ chunks
    reads: list[int] = []
    real_body = client_module._multipart_body

    def counting_body(head, f, size, tail):
        for part in real_body(head, f, size, tail):
            reads.append(len(part))
            yield part

    monkeypatch.setattr(client_module, "_multipart_body", counting_body)
    assert cli(server, "submit", str(src)).exit_code == 0
    assert len(reads) >= 5 and max(reads) <= client_module._CHUNK_BYTES
    file_id = json.loads(cli(server, "files", "list", "--json").stdout)[0]["id"]
    got = tmp_path / "copy.jsonl"
    assert cli(server, "download", file_id, "-o", str(got)).exit_code == 0
    assert got.read_bytes() == src.read_bytes()


def test_a_file_that_shrinks_mid_upload_is_one_error_line():
    import io

    from tokabatch.cli.client import _multipart_body
    from tokabatch.cli.common import CliError

    with pytest.raises(CliError, match="shrank while it was being uploaded"):
        list(_multipart_body(b"head", io.BytesIO(b"12345"), 10, b"tail"))
    assert b"".join(_multipart_body(b"h", io.BytesIO(b"12345"), 5, b"t")) == b"h12345t"
