"""Batch input validation (contract §3.7): every code with its line and param, file-reading rules,
and bounded memory on a 50,000-line / ~150 MB file."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from tokabatch.service.jobs.parse import BatchError, iter_requests, validate_input_file

CHAT = "/v1/chat/completions"
MODELS = {"demo", "tiny"}


def chat_line(custom_id: str, **body_changes) -> dict:
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    body.update(body_changes)
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}


def write(tmp_path: Path, lines: list, *, raw: bytes | None = None) -> Path:
    path = tmp_path / "input.jsonl"
    if raw is None:
        raw = b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)
    path.write_bytes(raw)
    return path


def validate(path: Path, **kwargs):
    kwargs.setdefault("endpoint", CHAT)
    kwargs.setdefault("served_model_names", MODELS)
    kwargs.setdefault("max_lines", 50_000)
    return validate_input_file(path, **kwargs)


def test_valid_file(tmp_path):
    report = validate(write(tmp_path, [chat_line("a"), chat_line("b", model="tiny")]))
    assert report.ok and report.num_requests == 2 and report.errors == []


def test_broken_second_line_is_invalid_json_line(tmp_path):
    report = validate(write(tmp_path, [chat_line("a"), b'{"custom_id": "b", ', chat_line("c")]))
    assert [(e.code, e.param, e.line) for e in report.errors] == [("invalid_json_line", None, 2)]
    assert report.num_requests == 3


def test_each_missing_field_is_its_own_error(tmp_path):
    lines = []
    for name in ("custom_id", "method", "url", "body"):
        line = chat_line(f"id-{name}")
        del line[name]
        lines.append(line)
    report = validate(write(tmp_path, lines))
    assert [(e.code, e.param, e.line) for e in report.errors] == [
        ("missing_required_parameter", "custom_id", 1),
        ("missing_required_parameter", "method", 2),
        ("missing_required_parameter", "url", 3),
        ("missing_required_parameter", "body", 4),
    ]


@pytest.mark.parametrize(
    "line, code, param",
    [
        ({**chat_line("x"), "url": "/v1/completions"}, "invalid_url", "url"),
        (chat_line("x", stream=True), "streaming_unsupported", "body.stream"),
        (chat_line("x", model="gpt-4o"), "model_not_found", "body.model"),
        (chat_line("x", model=None), "invalid_request", "body.model"),
        (chat_line("x", messages=None), "invalid_request", "body.messages"),
        ({**chat_line("x"), "method": "GET"}, "invalid_request", "method"),
        ({**chat_line("x"), "body": "text"}, "invalid_request", "body"),
        ({**chat_line("x"), "custom_id": 7}, "invalid_request", "custom_id"),
        ({**chat_line("x"), "custom_id": "c" * 513}, "invalid_request", "custom_id"),
        ([1, 2, 3], "invalid_request", None),
    ],
)
def test_line_level_codes(tmp_path, line, code, param):
    report = validate(write(tmp_path, [chat_line("ok"), line]))
    assert [(e.code, e.param, e.line) for e in report.errors] == [(code, param, 2)]
    assert all(isinstance(e, BatchError) and e.message for e in report.errors)


def test_stream_false_is_fine_and_body_level_problems_are_not_validation_errors(tmp_path):
    report = validate(write(tmp_path, [chat_line("a", stream=False, temperature=7, bogus=1)]))
    assert report.ok


def test_completions_prompt_required(tmp_path):
    line = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "demo"}}
    report = validate(write(tmp_path, [line]), endpoint="/v1/completions")
    assert [(e.code, e.param, e.line) for e in report.errors] == [("invalid_request", "body.prompt", 1)]


def test_duplicate_custom_id_reported_on_the_later_line(tmp_path):
    report = validate(write(tmp_path, [chat_line("a"), chat_line("b"), chat_line("a")]))
    assert [(e.code, e.param, e.line) for e in report.errors] == [("duplicate_custom_id", "custom_id", 3)]


def test_all_errors_recorded_and_capped(tmp_path):
    path = write(tmp_path, [b"nope"] * 30)
    report = validate(path)
    assert [e.line for e in report.errors] == list(range(1, 31))
    capped = validate(path, max_errors=5)
    assert [e.line for e in capped.errors] == [1, 2, 3, 4, 5] and capped.truncated


def test_file_level_errors(tmp_path):
    report = validate(write(tmp_path, [chat_line(str(i)) for i in range(4)]), max_lines=3)
    assert [(e.code, e.param, e.line) for e in report.errors] == [("too_many_requests", None, None)]
    report = validate(write(tmp_path, [], raw=b"\n  \r\n\n"))
    assert [(e.code, e.line) for e in report.errors] == [("empty_file", None)] and report.num_requests == 0
    report = validate(write(tmp_path, [chat_line("a")]), max_bytes=10)
    assert [(e.code, e.line) for e in report.errors] == [("file_too_large", None)]


def test_bom_crlf_and_blank_lines_keep_physical_numbers(tmp_path):
    good = json.dumps(chat_line("a")).encode()
    raw = b"\xef\xbb\xbf" + good + b"\r\n\r\n   \n" + json.dumps(chat_line("b")).encode() + b"\r\nbad\r\n"
    path = write(tmp_path, [], raw=raw)
    report = validate(path)
    assert report.num_requests == 3
    assert [(e.code, e.line) for e in report.errors] == [("invalid_json_line", 5)]
    # Without the bad line, iter_requests yields physical line numbers and the parsed bodies.
    path.write_bytes(raw.replace(b"bad\r\n", b""))
    assert [(n, cid) for n, cid, _ in iter_requests(path)] == [(1, "a"), (4, "b")]
    assert next(iter_requests(path))[2]["messages"][0]["content"] == "hi"


def test_last_line_without_newline(tmp_path):
    path = write(tmp_path, [], raw=json.dumps(chat_line("a")).encode() + b"\n" + json.dumps(chat_line("b")).encode())
    assert validate(path).num_requests == 2
    assert [cid for _, cid, _ in iter_requests(path)] == ["a", "b"]


def test_invalid_utf8_is_invalid_json_line(tmp_path):
    report = validate(write(tmp_path, [chat_line("a"), b'{"custom_id": "\xff"}']))
    assert [(e.code, e.line) for e in report.errors] == [("invalid_json_line", 2)]


@pytest.mark.slow
def test_50k_lines_150mb_validates_with_bounded_memory(tmp_path):
    path = tmp_path / "big.jsonl"
    filler = "lorem ipsum dolor sit amet " * 110        # ~3 KB of content per line
    with path.open("w") as f:
        for i in range(50_000):
            f.write(json.dumps(chat_line(f"request-{i:05d}", messages=[{"role": "user", "content": filler}])) + "\n")
    size = path.stat().st_size
    assert 140e6 < size < 200e6
    tracemalloc.start()
    try:
        report = validate(path, max_lines=50_000)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.ok and report.num_requests == 50_000
    # The custom_id digest set is ~5 MB at 50k lines; the file is ~150 MB. A regression that holds
    # the file (or every body) in memory shows up as 150+ MB here.
    assert peak_bytes < 16e6, f"peak traced memory {peak_bytes / 1e6:.1f} MB"
