"""Retrying a finished batch's failed lines as a child batch (POST /v1/batches/{id}/retry).

Owns which error lines can succeed on a retry and the child's input: the parent's own input
lines (byte for byte, in input order) whose custom_id ended in a retryable error. Retryable: what
the line did not cause — the engine failed it (a 5xx, `engine_error`), the batch ended before it
ran (`batch_expired`, `batch_cancelled`, `batch_failed`), a timeout or rate limit (408, 429). A 4xx
the line caused itself (an unknown parameter, a prompt too long) fails the same way again, so it is
retried only when asked for (`all`). The child names its parent in `parent_batch_id` and in
`metadata.parent_batch_id`; `tokabatch download --merge` puts the family's answers back together.
Must not import torch or aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

from tokabatch.errors import Conflict, InvalidRequest
from tokabatch.service.jobs.parse import iter_request_spans
from tokabatch.service.storage import repo
from tokabatch.service.storage.blobs import BlobStore
from tokabatch.service.storage.db import Database
from tokabatch.service.storage.models import Batch

RETRYABLE_CODES = frozenset({"engine_error", "batch_expired", "batch_cancelled", "batch_failed", "request_timeout"})
RETRYABLE_STATUSES = frozenset({408, 429})
RETRY_PURPOSE = "batch"


def is_retryable(line: dict) -> bool:
    """Whether an error-file line may succeed if run again (see the module's docstring)."""
    error = line.get("error")
    if error:
        return error.get("code") in RETRYABLE_CODES
    status = (line.get("response") or {}).get("status_code") or 0
    return status >= 500 or status in RETRYABLE_STATUSES


def custom_ids_to_retry(error_path: Path, *, include_all: bool) -> set[str]:
    """The custom_ids of the error file's lines to run again."""
    wanted: set[str] = set()
    with error_path.open("rb") as f:
        for raw in f:
            if raw.strip():
                line = json.loads(raw)
                if include_all or is_retryable(line):
                    wanted.add(line["custom_id"])
    return wanted


def write_retry_input(input_path: Path, custom_ids: set[str], out_path: Path) -> int:
    """Copy the input lines whose custom_id is in `custom_ids` (bytes unchanged); returns how many."""
    count = 0
    with input_path.open("rb") as src, out_path.open("wb") as out:
        for _line_no, offset, length, obj in iter_request_spans(input_path):
            if obj["custom_id"] in custom_ids:
                src.seek(offset)
                out.write(src.read(length) + b"\n")
                count += 1
    return count


def child_metadata(parent: Batch, overrides: dict[str, str] | None) -> dict[str, str]:
    """The parent's metadata, the caller's on top, and `parent_batch_id` (the HTTP layer checks the limits)."""
    return {**(parent.metadata_ or {}), **(overrides or {}), "parent_batch_id": parent.id}


async def create_retry(db: Database, blobs: BlobStore, parent: Batch, *, include_all: bool, now_s: int,
                       metadata: dict[str, str], idempotency: repo.IdempotencyClaim | None = None) -> Batch:
    """Create the child batch (its input file first) with `metadata` (child_metadata's). Raises
    Conflict while the parent runs and InvalidRequest when it has nothing to retry or its input is gone."""
    if not parent.is_terminal:
        raise Conflict(f"Batch {parent.id} is {parent.status}; retry its failed lines once it has ended.")
    error_path = input_path = None
    if parent.error_file_id is not None:
        with contextlib.suppress(FileNotFoundError):
            error_path = await asyncio.to_thread(blobs.local, parent.error_file_id)
    if error_path is None:
        raise InvalidRequest(f"Batch {parent.id} has no failed lines to retry.", param="batch_id",
                             code="nothing_to_retry")
    if await repo.get_file(db, parent.input_file_id, owner=parent.owner, now_s=now_s) is not None:
        with contextlib.suppress(FileNotFoundError):
            input_path = await asyncio.to_thread(blobs.local, parent.input_file_id)
    if input_path is None:
        raise InvalidRequest(f"The input file {parent.input_file_id} of batch {parent.id} is gone (deleted or "
                             "expired); a retry needs its lines.", param="batch_id", code="input_file_gone")
    wanted = await asyncio.to_thread(custom_ids_to_retry, error_path, include_all=include_all)
    if not wanted:
        raise InvalidRequest(f"None of the failed lines of batch {parent.id} can succeed on a retry (each was "
                             "rejected for what it asks); pass all=true to run them again anyway.",
                             param="all", code="nothing_to_retry")
    file_id = repo.new_file_id()
    temp = blobs.temp_path(file_id)
    try:
        await asyncio.to_thread(write_retry_input, input_path, wanted, temp)
        num_bytes = await asyncio.to_thread(blobs.commit, temp, file_id)
    finally:
        temp.unlink(missing_ok=True)
    await repo.create_file(db, owner=parent.owner, filename=f"{parent.id}_retry.jsonl", purpose=RETRY_PURPOSE,
                           num_bytes=num_bytes, now_s=now_s, file_id=file_id)
    window_s = (parent.expires_at - parent.created_at) if parent.expires_at is not None else 86_400
    try:
        return await repo.create_batch(
            db, owner=parent.owner, input_file_id=file_id, endpoint=parent.endpoint,
            completion_window=parent.completion_window, now_s=now_s, window_s=window_s, model=parent.model,
            metadata=metadata, output_expires_after_s=parent.output_expires_after_s, idempotency=idempotency,
            parent_batch_id=parent.id)
    except repo.IdempotencyKeyTaken:
        await repo.delete_file(db, file_id, owner=parent.owner)
        await asyncio.to_thread(blobs.delete, file_id)
        raise


__all__ = ["RETRYABLE_CODES", "child_metadata", "create_retry", "custom_ids_to_retry", "is_retryable",
           "write_retry_input"]
