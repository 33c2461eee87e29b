"""A batch's results on disk: output.jsonl, error.jsonl and a Parquet-row sidecar in a work folder.

The files ARE the checkpoint. Each finished line is appended (and flushed) as it finishes; after a
crash `ResultWriter.open()` reads both JSONL files back, cuts a torn last line, and returns every
custom_id already written with the counts and usage so far, so the runner skips exactly those
lines and recomputes none. `rows.jsonl` holds one Parquet row per line (prompt text included,
which the JSONL lines lack); it is written BEFORE the result line, and on resume rows whose line
never made it into output/error are dropped, so the sidecar always matches output ∪ error.

One process at a time writes a work folder: `hold_work_folder` takes an exclusive lock on its
`.lock` file (flock) for the whole claim, so a runner whose lease lapsed while it was paused (and
still holds the folder) and a runner that claimed the batch since never both append; the second
gets WorkFolderBusy and lets the batch go until the first has stopped.

Line shapes are the contract's §3.8. `write_parquet` turns the sidecar into a typed Parquet file in
row groups (bounded memory). Imports pyarrow (lazily) and the stdlib; no torch, no aiohttp.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

OUTPUT_NAME = "output.jsonl"
ERROR_NAME = "error.jsonl"
ROWS_NAME = "rows.jsonl"
LOCK_NAME = ".lock"
PARQUET_ROW_GROUP = 4096
JSON_BLOCK_BYTES = 16 << 20              # pyarrow's JSON reader parses the sidecar in blocks this large


class WorkFolderBusy(Exception):
    """Another process holds this work folder: a runner still working on a claim of the batch."""


@contextlib.contextmanager
def hold_work_folder(work_dir: Path) -> Iterator[None]:
    """Hold `work_dir`'s exclusive lock for the block (released when the block ends or the process
    dies, never left behind); WorkFolderBusy at once when another holder has it."""
    work_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(work_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkFolderBusy(f"another process is writing {work_dir}") from None
        yield
    finally:
        os.close(fd)


@dataclass(slots=True)
class ResultTotals:
    """Counts and usage of the lines written so far (contract §3.5 request_counts / usage)."""

    num_completed: int = 0               # lines with a 2xx response (output file)
    num_failed: int = 0                  # every error-file line
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def add_usage(self, usage: dict | None) -> None:
        if not usage:
            return
        self.input_tokens += int(usage.get("prompt_tokens") or 0)
        self.output_tokens += int(usage.get("completion_tokens") or 0)
        self.cached_tokens += int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        self.reasoning_tokens += int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)


@dataclass(slots=True)
class ResumeState:
    done_custom_ids: set[str] = field(default_factory=set)
    totals: ResultTotals = field(default_factory=ResultTotals)


def new_line_id() -> str:
    return "batch_req_" + secrets.token_hex(16)


def _read_complete_lines(path: Path) -> Iterator[dict]:
    """Yield each complete JSON line of `path`, truncating the file at the first torn/garbled line."""
    if not path.exists():
        return
    good_end = 0
    with path.open("rb+") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                obj = json.loads(raw)
            except ValueError:
                break
            good_end += len(raw)
            yield obj
        f.truncate(good_end)


def _row(custom_id: str, status_code: int | None, request_id: str | None, body: dict | None,
         error: dict | None, prompt_text: str | None, line: int | None, choice_tokens: list[int] | None) -> dict:
    """One Parquet row, derived from what the line says (see parquet_schema and docs/parquet.md)."""
    completions: list[str] = []
    finish_reasons: list[str] = []
    logprobs: list[list[float | None] | None] = []
    usage: dict = {}
    if body is not None and "choices" in body:
        for choice in body["choices"]:
            message = choice.get("message")
            completions.append((message.get("content") or "") if message is not None else choice.get("text", ""))
            finish_reasons.append(choice.get("finish_reason") or "")
            logprobs.append(_token_logprobs(choice.get("logprobs")))
        usage = body.get("usage") or {}
    if error is None and body is not None and isinstance(body.get("error"), dict):
        error = body["error"]
    return {
        "custom_id": custom_id, "line": line, "status_code": status_code, "request_id": request_id,
        "model": body.get("model") if body is not None else None, "prompt": prompt_text,
        "completions": completions, "finish_reasons": finish_reasons,
        "choice_completion_tokens": choice_tokens if choice_tokens is not None and completions else None,
        "choice_logprobs": logprobs if any(x is not None for x in logprobs) else None,
        "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
        "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens") if usage else None,
        "error_code": error.get("code") if error else None, "error_message": error.get("message") if error else None,
    }


def _token_logprobs(logprobs: dict | None) -> list[float | None] | None:
    """A choice's sampled-token logprobs: chat's `content[].logprob`, completions' `token_logprobs`."""
    if not logprobs:
        return None
    if "content" in logprobs:
        return [entry.get("logprob") for entry in logprobs.get("content") or ()]
    return list(logprobs.get("token_logprobs") or ())


class ResultWriter:
    """Appends result lines for one batch; every line is flushed, fsync runs every `fsync_interval_s`."""

    def __init__(self, work_dir: Path | str, *, fsync_interval_s: float = 1.0) -> None:
        self.work_dir = Path(work_dir)
        self.fsync_interval_s = fsync_interval_s
        self.totals = ResultTotals()
        self.done_custom_ids: set[str] = set()
        self._files: dict[str, IO[bytes]] = {}
        self._last_fsync = time.monotonic()

    @property
    def output_path(self) -> Path:
        return self.work_dir / OUTPUT_NAME

    @property
    def error_path(self) -> Path:
        return self.work_dir / ERROR_NAME

    @property
    def rows_path(self) -> Path:
        return self.work_dir / ROWS_NAME

    def open(self) -> ResumeState:
        """Recover what a previous run wrote (possibly nothing) and open the files for appending."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        totals, done = ResultTotals(), set()
        for line in _read_complete_lines(self.output_path):
            done.add(line["custom_id"])
            totals.num_completed += 1
            totals.add_usage(((line.get("response") or {}).get("body") or {}).get("usage"))
        for line in _read_complete_lines(self.error_path):
            done.add(line["custom_id"])
            totals.num_failed += 1
        self._filter_rows(done)
        self.totals, self.done_custom_ids = totals, done
        for name in (OUTPUT_NAME, ERROR_NAME, ROWS_NAME):
            self._files[name] = (self.work_dir / name).open("ab")
        return ResumeState(set(done), dataclasses.replace(totals))

    def _filter_rows(self, done: set[str]) -> None:
        """Keep exactly one sidecar row per written line (drop rows of lines that never finished)."""
        kept: set[str] = set()
        temp = self.rows_path.with_suffix(".tmp")
        with temp.open("wb") as out:
            for row in _read_complete_lines(self.rows_path):
                if row["custom_id"] in done and row["custom_id"] not in kept:
                    kept.add(row["custom_id"])
                    out.write(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, self.rows_path)

    def write_response(self, custom_id: str, *, status_code: int, request_id: str, body: dict,
                       prompt_text: str | None = None, line_no: int | None = None,
                       choice_tokens: list[int] | None = None) -> None:
        """An HTTP-style result: 2xx to the output file (counted completed), else to the error file.
        `line_no` (the input's line number) and `choice_tokens` (each choice's completion tokens, in
        the body's order) go to the Parquet row only."""
        line = {"id": new_line_id(), "custom_id": custom_id,
                "response": {"status_code": status_code, "request_id": request_id, "body": body}, "error": None}
        ok = 200 <= status_code < 300
        row = _row(custom_id, status_code, request_id, body, None, prompt_text, line_no, choice_tokens)
        self._append(custom_id, line, row, ok)
        if ok:
            self.totals.add_usage(body.get("usage"))

    def write_error(self, custom_id: str, *, code: str, message: str, prompt_text: str | None = None,
                    line_no: int | None = None) -> None:
        """A line that produced no HTTP response (batch_cancelled, batch_expired, request_timeout)."""
        error = {"code": code, "message": message}
        line = {"id": new_line_id(), "custom_id": custom_id, "response": None, "error": error}
        self._append(custom_id, line, _row(custom_id, None, None, None, error, prompt_text, line_no, None), False)

    def _append(self, custom_id: str, line: dict, row: dict, ok: bool) -> None:
        if custom_id in self.done_custom_ids:
            raise ValueError(f"custom_id {custom_id!r} already has a result line")
        rows = self._files[ROWS_NAME]
        rows.write(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
        rows.flush()
        f = self._files[OUTPUT_NAME if ok else ERROR_NAME]
        f.write(json.dumps(line, ensure_ascii=False, allow_nan=False).encode("utf-8") + b"\n")
        f.flush()
        self.done_custom_ids.add(custom_id)
        if ok:
            self.totals.num_completed += 1
        else:
            self.totals.num_failed += 1
        if time.monotonic() - self._last_fsync >= self.fsync_interval_s:
            self.sync()

    def sync(self) -> None:
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
        self._last_fsync = time.monotonic()

    def close(self) -> None:
        """Sync and close every file. The files are closed even when the sync fails (a full disk):
        bytes left in a buffer are dropped then, never appended later, when the objects are collected,
        behind lines a resumed run has written since (the torn last line is cut on resume)."""
        try:
            if self._files:
                self.sync()
        finally:
            files, self._files = self._files, {}
            for f in files.values():
                with contextlib.suppress(OSError):
                    f.close()


def parquet_schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("custom_id", pa.string()), ("line", pa.int64()), ("status_code", pa.int32()), ("request_id", pa.string()),
        ("model", pa.string()), ("prompt", pa.string()), ("completions", pa.list_(pa.string())),
        ("finish_reasons", pa.list_(pa.string())), ("choice_completion_tokens", pa.list_(pa.int64())),
        ("choice_logprobs", pa.list_(pa.list_(pa.float64()))),
        ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()), ("cached_tokens", pa.int64()),
        ("error_code", pa.string()), ("error_message", pa.string()),
    ])


def preload() -> None:
    """Import pyarrow's Parquet and JSON modules now (about a second, once), not when the first
    batch is sealed. Blocking: run it in a thread."""
    import pyarrow.json  # noqa: F401
    import pyarrow.parquet  # noqa: F401


def write_parquet(rows_path: Path | str, parquet_path: Path | str, *, row_group_size: int = PARQUET_ROW_GROUP) -> int:
    """Stream the sidecar into a Parquet file, one row group per `row_group_size` rows; returns rows.

    The sidecar (complete lines only: the writer is closed) is parsed by pyarrow's own JSON reader,
    in blocks and on its threads; a row larger than a block falls back to Python's json."""
    import pyarrow as pa
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    schema = parquet_schema()
    rows_path = Path(rows_path)
    if rows_path.exists() and rows_path.stat().st_size > 0:
        try:
            reader = pj.open_json(str(rows_path), read_options=pj.ReadOptions(block_size=JSON_BLOCK_BYTES),
                                  parse_options=pj.ParseOptions(explicit_schema=schema,
                                                                unexpected_field_behavior="ignore"))
            num_rows = 0
            with pq.ParquetWriter(str(parquet_path), schema) as writer:
                for batch in reader:
                    writer.write_batch(batch, row_group_size=row_group_size)
                    num_rows += batch.num_rows
            return num_rows
        except pa.ArrowInvalid:
            pass                              # a row over JSON_BLOCK_BYTES: the streaming Python path below
    num_rows = 0
    with pq.ParquetWriter(str(parquet_path), schema) as writer:
        chunk: list[dict] = []
        lines = _read_complete_lines(rows_path) if rows_path.exists() else iter(())
        for row in lines:
            chunk.append(row)
            if len(chunk) >= row_group_size:
                writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
                num_rows += len(chunk)
                chunk = []
        if chunk or num_rows == 0:
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
            num_rows += len(chunk)
    return num_rows


__all__ = ["ResultTotals", "ResultWriter", "ResumeState", "WorkFolderBusy", "hold_work_folder", "new_line_id",
           "parquet_schema", "preload", "write_parquet"]
