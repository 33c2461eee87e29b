"""examples/ stay valid: the JSONL files pass batch validation, and examples/openai_client.py runs a
batch end to end with the official client against a live server (fake engine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.conftest import needs_demo_tokenizer
from tokabatch.service.jobs.parse import validate_input_file

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name,endpoint", [("chat.jsonl", "/v1/chat/completions"),
                                           ("completions.jsonl", "/v1/completions")])
def test_example_inputs_validate(name, endpoint):
    report = validate_input_file(REPO / "examples" / name, endpoint=endpoint, served_model_names={"demo"},
                                 max_lines=50_000)
    assert report.ok, report.errors
    assert report.num_requests >= 4


@needs_demo_tokenizer
def test_openai_client_example_runs(fake_server_factory, tmp_path):
    server = fake_server_factory(loop_kwargs={})
    src = tmp_path / "chat.jsonl"
    src.write_bytes((REPO / "examples" / "chat.jsonl").read_bytes())
    env = {**os.environ, "OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "EMPTY"}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "openai_client.py"), str(src)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "capital-fr:" in proc.stdout and (tmp_path / "chat.output.jsonl").is_file()
