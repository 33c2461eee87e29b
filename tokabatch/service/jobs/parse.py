"""Streaming validation and reading of a batch input file (OpenAI batch JSONL).

Owns the file-level checks of an upload (contract §2.1: non-empty, UTF-8, the first non-blank
line a JSON object: FirstLineCheck, shared by POST /v1/files and `tokabatch run`) and the per-line
rules of contract §3.7: every error code with its 1-based physical line number,
`\\n` and `\\r\\n` endings, a UTF-8 BOM on line 1, blank lines skipped but counted. The file is read
one line at a time and never held whole (a 200 MB / 50,000-line file validates in a few MB);
duplicate `custom_id`s are found through a set of 16-byte digests.

Body-level problems that only the endpoint would detect (temperature 7, an unknown parameter, a
prompt too long for the context) are NOT validation errors: they become per-line 4xx results at
execution (render.prepare_request), exactly as OpenAI does.

Imports only the stdlib: no torch, no aiohttp, no SQLAlchemy.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

BOM = b"\xef\xbb\xbf"
FIRST_LINE_CAP_BYTES = 16 << 20      # a longer first line is left to the line-by-line validation
MAX_CUSTOM_ID_CHARS = 512
REQUIRED_FIELDS = ("custom_id", "method", "url", "body")
CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETIONS_ENDPOINT = "/v1/completions"


@dataclass(frozen=True, slots=True)
class BatchError:
    """One entry of a batch's `errors.data` (OpenAI's BatchError)."""

    code: str
    message: str
    param: str | None = None
    line: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(slots=True)
class ValidationReport:
    num_requests: int = 0
    errors: list[BatchError] = field(default_factory=list)
    truncated: bool = False              # more errors existed than max_errors; scanning stopped

    @property
    def ok(self) -> bool:
        return not self.errors


class _LineRejected(Exception):
    """Internal: the current line has a validation error (one error per line)."""

    def __init__(self, code: str, message: str, param: str | None) -> None:
        super().__init__(message)
        self.error = (code, message, param)


class FirstLineCheck:
    """Streaming check of a batch file: valid UTF-8 throughout, and a JSON object as the first
    non-blank line. Keeps at most FIRST_LINE_CAP_BYTES of the head in memory."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._head = bytearray()
        self._first_line: bytes | None = None
        self.utf8_ok = True
        self.num_bytes = 0

    def feed(self, chunk: bytes) -> None:
        self.num_bytes += len(chunk)
        if self.utf8_ok:
            try:
                self._decoder.decode(chunk)
            except UnicodeDecodeError:
                self.utf8_ok = False
        if self._first_line is None and len(self._head) < FIRST_LINE_CAP_BYTES:
            self._head += chunk
            self._find_first_line(final=False)

    def _find_first_line(self, *, final: bool) -> None:
        head = bytes(self._head).removeprefix(codecs.BOM_UTF8)
        lines = head.split(b"\n")
        complete = lines if final else lines[:-1]
        for line in complete:
            if line.strip():
                self._first_line = line
                self._head = bytearray()
                return

    def problem(self) -> str | None:
        """Finish and return why the file is not a batch JSONL file, or None."""
        if self.utf8_ok:
            try:
                self._decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                self.utf8_ok = False
        if self.num_bytes == 0:
            return "The file is empty. A batch input file must be JSONL: one JSON request object per line."
        if not self.utf8_ok:
            return "The file is not valid UTF-8. A batch input file must be UTF-8 encoded JSONL."
        if self._first_line is None:
            if len(self._head) >= FIRST_LINE_CAP_BYTES:
                return None          # a huge first line: the runner validates it line by line
            self._find_first_line(final=True)
        if self._first_line is None:
            return "The file contains only blank lines. A batch input file must be JSONL."
        try:
            first = json.loads(self._first_line)
        except (ValueError, RecursionError):    # RecursionError: nested too deeply
            first = None
        if not isinstance(first, dict):
            return ("Invalid file format: the first line is not a JSON object. A batch input file "
                    "must be JSONL (.jsonl): one JSON request object per line.")
        return None


def file_problem(path: str | Path, chunk_bytes: int = 1 << 20) -> str | None:
    """FirstLineCheck over a file on disk: why it cannot be a batch input file, or None (what an
    upload of it would be refused for; `tokabatch run` checks its input the same way)."""
    check = FirstLineCheck()
    with Path(path).open("rb") as f:
        while chunk := f.read(chunk_bytes):
            check.feed(chunk)
    return check.problem()


def _physical_lines(f: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line without its ending and without a BOM on line 1)."""
    for line_no, _, raw in _physical_lines_at(f):
        yield line_no, raw


def _physical_lines_at(f: BinaryIO) -> Iterator[tuple[int, int, bytes]]:
    """_physical_lines with the byte offset in the file where each yielded raw line starts."""
    offset = 0
    for line_no, raw in enumerate(f, start=1):
        start, offset = offset, offset + len(raw)
        if line_no == 1 and raw.startswith(BOM):
            raw = raw[len(BOM):]
            start += len(BOM)
        if raw.endswith(b"\n"):
            raw = raw[:-1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        yield line_no, start, raw


def _parse_line(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _LineRejected("invalid_json_line", "This line is not valid UTF-8.", None) from None
    except json.JSONDecodeError as exc:
        message = f"This line is not parseable as valid JSON: {exc.msg}."
        raise _LineRejected("invalid_json_line", message, None) from None
    except RecursionError:
        raise _LineRejected("invalid_json_line", "This line is nested too deeply to be parsed.", None) from None


def _check_line(obj: Any, *, endpoint: str, served_model_names: set[str]) -> str:
    """Apply the §3.7 per-line rules; return the custom_id or raise _LineRejected."""
    custom_id = _check_envelope(obj, endpoint)
    _check_body(obj["body"], endpoint, served_model_names)
    return custom_id


def _check_envelope(obj: Any, endpoint: str) -> str:
    """The line's own fields (custom_id, method, url, body present); returns the custom_id."""
    if not isinstance(obj, dict):
        raise _LineRejected("invalid_request", "Each line must be a JSON object.", None)
    for name in REQUIRED_FIELDS:
        if name not in obj or obj[name] is None:
            raise _LineRejected("missing_required_parameter", f"Missing required parameter: '{name}'.", name)
    custom_id = obj["custom_id"]
    if not isinstance(custom_id, str) or not custom_id:
        raise _LineRejected("invalid_request", "'custom_id' must be a non-empty string.", "custom_id")
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        raise _LineRejected("invalid_request", f"'custom_id' must be at most {MAX_CUSTOM_ID_CHARS} characters.",
                            "custom_id")
    if obj["method"] != "POST":
        raise _LineRejected("invalid_request", f"Only the method 'POST' is supported, not {obj['method']!r}.", "method")
    if obj["url"] != endpoint:
        raise _LineRejected("invalid_url", f"The URL provided for this request does not match the batch endpoint "
                            f"{endpoint!r}.", "url")
    return custom_id


def _check_body(body: Any, endpoint: str, served_model_names: set[str]) -> None:
    """What validation checks of the body (the rest is the endpoint's, at execution)."""
    if not isinstance(body, dict):
        raise _LineRejected("invalid_request", "'body' must be a JSON object.", "body")
    if body.get("stream") is True:
        raise _LineRejected("streaming_unsupported", "Streaming is not supported in batch requests.", "body.stream")
    model = body.get("model")
    if model is None:
        raise _LineRejected("invalid_request", "Missing required parameter: 'body.model'.", "body.model")
    if not isinstance(model, str) or model not in served_model_names:
        served = ", ".join(sorted(served_model_names))
        raise _LineRejected("model_not_found", f"The model {model!r} does not exist or cannot be served here "
                            f"(served: {served}).", "body.model")
    if endpoint == CHAT_ENDPOINT and body.get("messages") is None:
        raise _LineRejected("invalid_request", "Missing required parameter: 'body.messages'.", "body.messages")
    if endpoint == COMPLETIONS_ENDPOINT and body.get("prompt") is None:
        raise _LineRejected("invalid_request", "Missing required parameter: 'body.prompt'.", "body.prompt")


def validate_input_file(
    path: str | Path,
    *,
    endpoint: str,
    served_model_names: set[str],
    max_lines: int,
    max_errors: int = 1000,
    max_bytes: int | None = None,
    on_request: Callable[[int, int, int, dict[str, Any]], None] | None = None,
) -> ValidationReport:
    """Validate a batch input file line by line with bounded memory.

    Records at most one error per line and at most `max_errors` errors (then stops scanning and sets
    `truncated`). File-level errors (too_many_requests, empty_file, file_too_large) have line None.
    `on_request(line number, byte offset, byte length, parsed line)` sees every line that passed, so
    a caller can learn what it needs of the file in the same pass (ordering.SpanCollector).
    """
    report = ValidationReport()
    path = Path(path)

    def add(code: str, message: str, param: str | None, line: int | None) -> bool:
        report.errors.append(BatchError(code, message, param, line))
        return len(report.errors) < max_errors

    if max_bytes is not None and path.stat().st_size > max_bytes:
        add("file_too_large", f"The input file is larger than the {max_bytes} byte limit.", None, None)
        return report
    seen: set[bytes] = set()
    too_many_reported = False
    with path.open("rb") as f:
        for line_no, offset, raw in _physical_lines_at(f):
            if not raw.strip():
                continue
            report.num_requests += 1
            if report.num_requests > max_lines and not too_many_reported:
                too_many_reported = True
                if not add("too_many_requests", f"The input file has more than {max_lines} requests.", None, None):
                    report.truncated = True
                    return report
            try:
                obj = _parse_line(raw)
                custom_id = _check_line(obj, endpoint=endpoint, served_model_names=served_model_names)
                digest = hashlib.blake2b(custom_id.encode("utf-8"), digest_size=16).digest()
                if digest in seen:
                    raise _LineRejected("duplicate_custom_id", f"The custom_id {custom_id!r} appears more than once "
                                        "in the input file.", "custom_id")
                seen.add(digest)
                if on_request is not None:
                    on_request(line_no, offset, len(raw), obj)
            except _LineRejected as rejected:
                if not add(*rejected.error, line_no):
                    report.truncated = True
                    return report
    if report.num_requests == 0:
        add("empty_file", "The input file contains no requests.", None, None)
    return report


def iter_requests(path: str | Path) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """Yield (line number, custom_id, body) for each request of an already validated file, streaming."""
    with Path(path).open("rb") as f:
        for line_no, raw in _physical_lines(f):
            if not raw.strip():
                continue
            obj = json.loads(raw.decode("utf-8"))
            yield line_no, obj["custom_id"], obj["body"]


def iter_request_spans(path: str | Path) -> Iterator[tuple[int, int, int, dict[str, Any]]]:
    """Yield (line number, byte offset, byte length, parsed line) for each request of an already
    validated file, streaming; `read_request` reads one back from its offset and length."""
    with Path(path).open("rb") as f:
        for line_no, offset, raw in _physical_lines_at(f):
            if raw.strip():
                yield line_no, offset, len(raw), json.loads(raw.decode("utf-8"))


def read_request(f: BinaryIO, offset: int, length: int) -> tuple[str, dict[str, Any]]:
    """(custom_id, body) of the request line at `offset` (from iter_request_spans) in the open file."""
    f.seek(offset)
    obj = json.loads(f.read(length).decode("utf-8"))
    return obj["custom_id"], obj["body"]


__all__ = ["BatchError", "FirstLineCheck", "ValidationReport", "file_problem", "iter_request_spans", "iter_requests",
           "read_request",
           "validate_input_file"]
