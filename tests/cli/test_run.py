"""`tokabatch run`: a whole job in one process on the fake engine, the same lines as a batch, resume."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokabatch import model_store
from tokabatch.cli import app

pytestmark = pytest.mark.skipif(not (model_store.models_dir() / model_store.DEMO_FOLDER / "config.json").is_file(),
                                reason="needs the demo model's tokenizer (`tokabatch models fetch`)")


def _write_input(path: Path, num_lines: int, *, bad_param_ids: tuple[int, ...] = ()) -> list[str]:
    ids = []
    with path.open("w") as f:
        for i in range(num_lines):
            body = {"model": "demo", "messages": [{"role": "user", "content": f"question {i}"}],
                    "max_tokens": 3 + i % 4, "temperature": 0}
            if i in bad_param_ids:
                body["temperature"] = 7          # the endpoint rejects it: a 400 line, not a validation error
            f.write(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body}) + "\n")
            ids.append(f"q{i}")
    return ids


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def _run(tmp_path: Path, src: Path, out: Path, factory: str):
    return CliRunner().invoke(app, ["run", str(src), "-o", str(out), "--model", "demo",
                                    "--engine-factory", f"tests.cli.fake_loops:{factory}"])


def test_run_writes_batch_lines_and_errors(tmp_path):
    src = tmp_path / "in.jsonl"
    ids = _write_input(src, 5, bad_param_ids=(3,))
    out = tmp_path / "out.jsonl"
    result = _run(tmp_path, src, out, "healthy")
    assert result.exit_code == 3, result.output          # completed with one failed line
    ok, errors = _lines(out), _lines(tmp_path / "out.errors.jsonl")
    assert sorted(x["custom_id"] for x in ok + errors) == sorted(ids)
    assert [x["custom_id"] for x in errors] == ["q3"]
    assert errors[0]["response"]["status_code"] == 400 and errors[0]["error"] is None
    assert errors[0]["response"]["body"]["error"]["param"] == "temperature"
    for line in ok:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200 and body["object"] == "chat.completion"
        assert body["choices"][0]["finish_reason"] in ("stop", "length")


def test_run_resumes_after_an_engine_crash_and_each_custom_id_appears_once(tmp_path):
    src = tmp_path / "in.jsonl"
    ids = _write_input(src, 12)
    out = tmp_path / "out.jsonl"
    first = _run(tmp_path, src, out, "dies_at_step_6")
    assert first.exit_code == 1, first.output
    assert "re-run the same command to resume" in first.stderr
    work_output = tmp_path / ".out.jsonl.tokabatch" / "output.jsonl"
    written_first = {x["custom_id"] for x in _lines(work_output)}
    assert 0 < len(written_first) < len(ids)              # the crash came in the middle

    second = _run(tmp_path, src, out, "healthy")
    assert second.exit_code == 0, second.output
    assert f"{len(written_first)} already done" in second.stderr
    final = _lines(out)
    counts = collections.Counter(x["custom_id"] for x in final)
    assert sorted(counts) == sorted(ids) and set(counts.values()) == {1}
    assert not (tmp_path / "out.errors.jsonl").exists()
    # the lines from before the crash were kept, not recomputed
    before = {x["custom_id"]: x["id"] for x in _lines(work_output) if x["custom_id"] in written_first}
    assert all(before[c] == next(x["id"] for x in final if x["custom_id"] == c) for c in written_first)

    third = _run(tmp_path, src, out, "healthy")           # a finished job re-run is a no-op
    assert third.exit_code == 0 and f"{len(ids)} already done" in third.stderr
    assert _lines(out) == final


def test_run_parquet_output_has_one_row_per_line(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    src = tmp_path / "in.jsonl"
    ids = _write_input(src, 4, bad_param_ids=(1,))
    out = tmp_path / "res.parquet"
    result = _run(tmp_path, src, out, "healthy")
    assert result.exit_code == 3, result.output
    table = pq.read_table(out).to_pylist()
    assert sorted(r["custom_id"] for r in table) == ids
    assert {r["custom_id"]: r["status_code"] for r in table}["q1"] == 400
    assert (tmp_path / "res.errors.jsonl").is_file()


def test_run_validation_failure_is_exit_4_with_line_numbers(tmp_path):
    src = tmp_path / "in.jsonl"
    _write_input(src, 3)
    src.write_text(src.read_text() + "{not json\n")
    result = _run(tmp_path, src, tmp_path / "out.jsonl", "healthy")
    assert result.exit_code == 4
    assert result.stderr.count("\n") == 1 and "line 4: invalid_json_line" in result.stderr


def test_run_refuses_results_of_another_input(tmp_path):
    src = tmp_path / "in.jsonl"
    _write_input(src, 2)
    out = tmp_path / "out.jsonl"
    assert _run(tmp_path, src, out, "healthy").exit_code == 0
    _write_input(src, 3)
    result = _run(tmp_path, src, out, "healthy")
    assert result.exit_code == 2 and "results of another input" in result.stderr
