"""outputs: contract §3.8 line shapes, resume after a torn line (the files are the checkpoint), and
the Parquet file read back with pyarrow (typed columns, one row per line)."""

from __future__ import annotations

import errno
import gc
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokabatch.service.jobs import outputs
from tokabatch.service.jobs.outputs import ResultWriter, parquet_schema, write_parquet


def chat_body(text: str, prompt_tokens: int = 10, completion_tokens: int = 3, cached: int = 4) -> dict:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "tiny",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens,
                  "prompt_tokens_details": {"cached_tokens": cached},
                  "completion_tokens_details": {"reasoning_tokens": 0}},
    }


ERROR_400 = {"error": {"message": "bad temperature", "type": "invalid_request_error", "param": "temperature",
                       "code": "invalid_value"}}


def read_lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def write_some(w: ResultWriter) -> None:
    w.write_response("a", status_code=200, request_id="req_1", body=chat_body("hello"), prompt_text="hi a")
    w.write_response("b", status_code=400, request_id="req_2", body=ERROR_400, prompt_text="hi b")
    w.write_error("c", code="batch_cancelled", message="cancelled before it ran")


def test_line_shapes_and_routing(tmp_path):
    w = ResultWriter(tmp_path / "work")
    assert w.open().done_custom_ids == set()
    write_some(w)
    w.close()
    (out,) = read_lines(w.output_path)
    assert out["id"].startswith("batch_req_") and out["custom_id"] == "a" and out["error"] is None
    assert out["response"]["status_code"] == 200 and out["response"]["request_id"] == "req_1"
    assert out["response"]["body"]["choices"][0]["message"]["content"] == "hello"
    bad, cancelled = read_lines(w.error_path)
    assert bad["response"] == {"status_code": 400, "request_id": "req_2", "body": ERROR_400} and bad["error"] is None
    assert cancelled["response"] is None and cancelled["error"]["code"] == "batch_cancelled"
    assert (w.totals.num_completed, w.totals.num_failed) == (1, 2)
    assert (w.totals.input_tokens, w.totals.output_tokens, w.totals.cached_tokens) == (10, 3, 4)


def test_duplicate_custom_id_refused(tmp_path):
    w = ResultWriter(tmp_path)
    w.open()
    w.write_error("a", code="batch_expired", message="x")
    with pytest.raises(ValueError):
        w.write_response("a", status_code=200, request_id="r", body=chat_body("x"))
    w.close()


def test_resume_after_torn_lines(tmp_path):
    w = ResultWriter(tmp_path)
    w.open()
    write_some(w)
    w.close()
    # A crash mid-write: torn tails on both files and a sidecar row whose result line never landed.
    with w.output_path.open("ab") as f:
        f.write(b'{"id": "batch_req_x", "custom_id": "d", "respo')
    with w.error_path.open("ab") as f:
        f.write(b'{"id": "batch_req_y", "cus')
    with w.rows_path.open("ab") as f:
        f.write(json.dumps({"custom_id": "e", "status_code": 200}).encode() + b"\n")
    w2 = ResultWriter(tmp_path)
    state = w2.open()
    assert state.done_custom_ids == {"a", "b", "c"}
    assert (state.totals.num_completed, state.totals.num_failed, state.totals.input_tokens) == (1, 2, 10)
    assert state.totals.cached_tokens == 4 and state.totals.total_tokens == 13
    w2.write_response("d", status_code=200, request_id="req_4", body=chat_body("again", 5, 2, 0))
    w2.write_response("e", status_code=200, request_id="req_5", body=chat_body("e", 1, 1, 0))
    w2.close()
    assert [x["custom_id"] for x in read_lines(w2.output_path)] == ["a", "d", "e"]
    assert [x["custom_id"] for x in read_lines(w2.error_path)] == ["b", "c"]
    assert sorted(x["custom_id"] for x in read_lines(w2.rows_path)) == ["a", "b", "c", "d", "e"]
    assert (w2.totals.num_completed, w2.totals.input_tokens) == (3, 16)
    # A third open sees everything once.
    w3 = ResultWriter(tmp_path)
    assert w3.open().done_custom_ids == {"a", "b", "c", "d", "e"}
    w3.close()


@pytest.mark.parametrize("json_reader", ["pyarrow", "python"])
def test_parquet_schema_and_rows(tmp_path, monkeypatch, json_reader):
    if json_reader == "python":      # a row larger than pyarrow's JSON block: the Python fallback
        monkeypatch.setattr(outputs, "JSON_BLOCK_BYTES", 64)
    w = ResultWriter(tmp_path)
    w.open()
    write_some(w)
    multi = chat_body("x")
    multi["choices"].append({"index": 1, "message": {"role": "assistant", "content": "y", "refusal": None},
                             "finish_reason": "length", "logprobs": None})
    w.write_response("m", status_code=200, request_id="req_9", body=multi, prompt_text="multi")
    text_completion = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "tiny",
                       "choices": [{"index": 0, "text": "fox", "finish_reason": "length", "logprobs": None}],
                       "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}
    w.write_response("t", status_code=200, request_id="req_10", body=text_completion, prompt_text="the")
    w.close()
    path = tmp_path / "out.parquet"
    assert write_parquet(w.rows_path, path, row_group_size=2) == 5
    pf = pq.ParquetFile(path)
    assert pf.schema_arrow == parquet_schema() and pf.num_row_groups == 3
    rows = {r["custom_id"]: r for r in pf.read().to_pylist()}
    assert rows["a"]["status_code"] == 200 and rows["a"]["completions"] == ["hello"]
    assert rows["a"]["prompt"] == "hi a" and rows["a"]["prompt_tokens"] == 10 and rows["a"]["cached_tokens"] == 4
    assert rows["b"]["status_code"] == 400 and rows["b"]["error_code"] == "invalid_value"
    assert rows["b"]["completions"] == [] and rows["b"]["prompt_tokens"] is None
    assert rows["c"]["status_code"] is None and rows["c"]["error_code"] == "batch_cancelled"
    assert rows["m"]["completions"] == ["x", "y"] and rows["m"]["finish_reasons"] == ["stop", "length"]
    assert rows["t"]["completions"] == ["fox"] and rows["t"]["cached_tokens"] is None
    assert pf.schema_arrow.field("status_code").type == pa.int32()


def test_empty_parquet_has_the_schema(tmp_path):
    path = tmp_path / "empty.parquet"
    assert write_parquet(tmp_path / "missing.jsonl", path) == 0
    table = pq.read_table(path)
    assert table.num_rows == 0 and table.schema == parquet_schema()


class _FullDisk(io.RawIOBase):
    """A file whose writes fail with ENOSPC while `full` (the write layer of a full filesystem)."""

    def __init__(self, path) -> None:
        self._f = open(path, "ab", buffering=0)
        self.full = False

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._f.write(data)

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        self._f.close()
        super().close()


def test_a_full_disk_never_leaves_a_torn_line_inside_the_output(tmp_path):
    # A flush that fails used to leave the files open: their buffers were written when the objects
    # were collected, behind the lines a resumed run had written since (one unparseable line).
    w = ResultWriter(tmp_path)
    w.open()
    raw = _FullDisk(w.output_path)
    w._files[outputs.OUTPUT_NAME] = io.BufferedWriter(raw, buffer_size=1 << 16)
    w.write_response("a", status_code=200, request_id="r1", body=chat_body("first"))
    raw.full = True
    with pytest.raises(OSError):
        w.write_response("b", status_code=200, request_id="r2", body=chat_body("x" * 5000))
    with pytest.raises(OSError):
        w.close()                                  # the sync fails: the files are closed anyway
    raw.full = False
    resumed = ResultWriter(tmp_path)
    state = resumed.open()
    resumed.write_response("c", status_code=200, request_id="r3", body=chat_body("after"))
    resumed.close()
    del w
    gc.collect()                                   # nothing of the first writer is written now
    lines = [json.loads(x) for x in (tmp_path / outputs.OUTPUT_NAME).read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == ["a", "c"] and state.done_custom_ids == {"a"}
