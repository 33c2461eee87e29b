"""The wire shapes: File/Batch objects, list envelopes, and validation of request parameters.

Owns how rows become OpenAI JSON (strict-valid against openai-python's FileObject and Batch) and
how a POST /v1/batches body and list query strings are checked, raising tokabatch.errors with the
contract's codes and params. Must not import torch; no database access here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from tokabatch.errors import InvalidRequest
from tokabatch.service.storage.models import Batch, File

SUPPORTED_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
DEFAULT_WINDOW = "24h"
WINDOW_UNITS_S = {"m": 60, "h": 3600, "d": 86400}
MIN_EXPIRES_AFTER_S, MAX_EXPIRES_AFTER_S = 3600, 2_592_000
BATCH_CREATE_FIELDS = ("input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after",
                       "dry_run")           # dry_run: a tokabatch extension (jobs/dry_run.py)
BATCH_RETRY_FIELDS = ("all", "metadata")
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


def file_object(row: File) -> dict[str, Any]:
    return {
        "id": row.id, "object": "file", "bytes": row.bytes, "created_at": row.created_at,
        "filename": row.filename, "purpose": row.purpose, "status": "processed",
        "expires_at": row.expires_at, "status_details": None,
    }


def batch_object(row: Batch) -> dict[str, Any]:
    return {
        "id": row.id, "object": "batch", "endpoint": row.endpoint, "model": row.model,
        "errors": {"object": "list", "data": row.errors} if row.errors is not None else None,
        "input_file_id": row.input_file_id, "completion_window": row.completion_window,
        "status": row.status, "output_file_id": row.output_file_id, "error_file_id": row.error_file_id,
        "created_at": row.created_at, "in_progress_at": row.in_progress_at,
        "expires_at": row.expires_at, "finalizing_at": row.finalizing_at,
        "completed_at": row.completed_at, "failed_at": row.failed_at, "expired_at": row.expired_at,
        "cancelling_at": row.cancelling_at, "cancelled_at": row.cancelled_at,
        "request_counts": {"total": row.request_total, "completed": row.request_completed,
                           "failed": row.request_failed},
        "usage": {
            "input_tokens": row.input_tokens, "input_tokens_details": {"cached_tokens": row.cached_tokens},
            "output_tokens": row.output_tokens,
            "output_tokens_details": {"reasoning_tokens": row.reasoning_tokens},
            "total_tokens": row.total_tokens,
        },
        "metadata": row.metadata_,
        "output_expires_after": (None if row.output_expires_after_s is None else
                                 {"anchor": "created_at", "seconds": row.output_expires_after_s}),
        # tokabatch extensions: the Parquet twin of the output (null until the batch is terminal);
        # the batch whose failed lines this one retries; while it runs, output tokens per second over
        # the last minute and the seconds left at that pace (null when unknown or not running).
        "output_parquet_file_id": row.output_parquet_file_id,
        "parent_batch_id": row.parent_batch_id,
        "throughput": None if row.throughput is None else round(row.throughput, 1),
        "eta_seconds": None if row.eta_seconds is None else round(row.eta_seconds, 1),
    }


def list_object(data: Sequence[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": list(data), "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


def parse_limit(query: Mapping[str, str], *, default: int, maximum: int) -> int:
    raw = query.get("limit")
    if raw is None or raw == "":
        return default
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= maximum:
        raise InvalidRequest(f"Invalid 'limit': expected an integer between 1 and {maximum}, got {raw!r}.",
                             param="limit", code="invalid_value")
    return limit


def parse_order(query: Mapping[str, str]) -> str:
    order = query.get("order") or "desc"
    if order not in ("asc", "desc"):
        raise InvalidRequest(f"Invalid 'order': {order!r}; expected 'asc' or 'desc'.", param="order",
                             code="invalid_value")
    return order


def parse_expires_after(anchor: Any, seconds: Any, *, param: str) -> int:
    """Validate {anchor: "created_at", seconds: 3600..2592000}; returns seconds."""
    if anchor != "created_at":
        raise InvalidRequest(f"Invalid '{param}.anchor': {anchor!r}; the only supported anchor is "
                             "'created_at'.", param=f"{param}.anchor", code="invalid_value")
    try:
        value = int(seconds)
        if isinstance(seconds, bool) or (isinstance(seconds, float) and seconds != value):
            raise ValueError
    except (TypeError, ValueError):
        value = None
    if value is None or not MIN_EXPIRES_AFTER_S <= value <= MAX_EXPIRES_AFTER_S:
        raise InvalidRequest(f"Invalid '{param}.seconds': {seconds!r}; expected an integer between "
                             f"{MIN_EXPIRES_AFTER_S} and {MAX_EXPIRES_AFTER_S}.",
                             param=f"{param}.seconds", code="invalid_value")
    return value


def parse_window(window: Any, *, allow_custom: bool) -> int:
    """completion_window -> seconds. "24h" always; <N>m|h|d only with allow_custom_windows."""
    if window == DEFAULT_WINDOW:
        return 86400
    match = re.fullmatch(r"([1-9][0-9]{0,6})([mhd])", window) if isinstance(window, str) else None
    if allow_custom and match:
        return int(match.group(1)) * WINDOW_UNITS_S[match.group(2)]
    allowed = "'24h' or <N>m, <N>h, <N>d" if allow_custom else "'24h'"
    raise InvalidRequest(f"Invalid value for 'completion_window': {window!r}. Supported values are: {allowed}.",
                         param="completion_window", code="invalid_value")


def parse_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InvalidRequest("Invalid type for 'metadata': expected an object.", param="metadata",
                             code="invalid_type")
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidRequest(f"Invalid 'metadata': at most {MAX_METADATA_PAIRS} pairs are allowed.",
                             param="metadata", code="invalid_value")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            raise InvalidRequest(f"Invalid 'metadata': key {key[:80]!r} is longer than {MAX_METADATA_KEY} "
                                 "characters.", param=f"metadata.{key}", code="invalid_value")
        if not isinstance(value, str):
            raise InvalidRequest(f"Invalid type for 'metadata.{key}': expected a string, but got "
                                 f"{type(value).__name__}.", param=f"metadata.{key}", code="invalid_type")
        if len(value) > MAX_METADATA_VALUE:
            raise InvalidRequest(f"Invalid 'metadata.{key}': longer than {MAX_METADATA_VALUE} characters.",
                                 param=f"metadata.{key}", code="invalid_value")
    return dict(metadata)


@dataclass(frozen=True, slots=True)
class BatchCreate:
    input_file_id: str
    endpoint: str
    completion_window: str
    window_s: int
    metadata: dict[str, str] | None
    output_expires_after_s: int | None
    dry_run: bool = False


def _check_fields(body: Any, allowed: Sequence[str]) -> None:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    for name in body:
        if name not in allowed:
            raise InvalidRequest(f"Unrecognized request argument supplied: {name}", param=name,
                                 code="unknown_parameter")


def _parse_flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise InvalidRequest(f"Invalid type for '{name}': expected a boolean, but got {type(value).__name__}.",
                             param=name, code="invalid_type")
    return value


@dataclass(frozen=True, slots=True)
class BatchRetry:
    include_all: bool
    metadata: dict[str, str] | None


def parse_batch_retry(body: Any) -> BatchRetry:
    """A POST /v1/batches/{id}/retry body (an extension): {"all": bool, "metadata": {...}}, both optional."""
    _check_fields(body, BATCH_RETRY_FIELDS)
    return BatchRetry(include_all=_parse_flag(body, "all"), metadata=parse_metadata(body.get("metadata")))


def parse_batch_create(body: Any, *, allow_custom_windows: bool) -> BatchCreate:
    """Check a POST /v1/batches body (already JSON-decoded) against contract §3.1."""
    _check_fields(body, BATCH_CREATE_FIELDS)
    for name in ("input_file_id", "endpoint", "completion_window"):
        if body.get(name) is None:
            raise InvalidRequest(f"Missing required parameter: '{name}'.", param=name,
                                 code="missing_required_parameter")
    if not isinstance(body["input_file_id"], str) or not body["input_file_id"]:
        raise InvalidRequest("Invalid type for 'input_file_id': expected a non-empty string.",
                             param="input_file_id", code="invalid_type")
    endpoint = body["endpoint"]
    if endpoint not in SUPPORTED_ENDPOINTS:
        raise InvalidRequest(f"Invalid value for 'endpoint': {endpoint!r}. Supported values are: "
                             f"{', '.join(repr(e) for e in SUPPORTED_ENDPOINTS)}.",
                             param="endpoint", code="invalid_value")
    window_s = parse_window(body["completion_window"], allow_custom=allow_custom_windows)
    expires_after = body.get("output_expires_after")
    output_expires_after_s = None
    if expires_after is not None:
        if not isinstance(expires_after, dict):
            raise InvalidRequest("Invalid type for 'output_expires_after': expected an object.",
                                 param="output_expires_after", code="invalid_type")
        output_expires_after_s = parse_expires_after(expires_after.get("anchor"), expires_after.get("seconds"),
                                                     param="output_expires_after")
    return BatchCreate(input_file_id=body["input_file_id"], endpoint=endpoint,
                       completion_window=body["completion_window"], window_s=window_s,
                       metadata=parse_metadata(body.get("metadata")),
                       output_expires_after_s=output_expires_after_s, dry_run=_parse_flag(body, "dry_run"))
