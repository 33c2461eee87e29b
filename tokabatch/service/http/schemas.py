"""The wire shapes: File/Batch objects, list envelopes, and validation of request parameters.

Owns how rows become OpenAI JSON (strict-valid against openai-python's FileObject and Batch) and
how a POST /v1/batches body and list query strings are checked, raising tokabatch.errors with the
contract's codes and params. A JSON body is checked against its JSON Schema here (BATCH_CREATE,
BATCH_RETRY: the same dicts the OpenAPI document publishes, http/openapi.py) by jsonschema, the
first error mapped to the contract's envelope; what a schema cannot say (the server's window
setting) is checked after it. Must not import torch; no database access here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from jsonschema import Draft202012Validator, ValidationError

from tokabatch.errors import InvalidRequest
from tokabatch.service.storage.models import Batch, File

SUPPORTED_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
DEFAULT_WINDOW = "24h"
WINDOW_UNITS_S = {"m": 60, "h": 3600, "d": 86400}
MIN_EXPIRES_AFTER_S, MAX_EXPIRES_AFTER_S = 3600, 2_592_000
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
NO_NUL = "^[^\\u0000]*$"                # no stored string may hold U+0000 (PostgreSQL cannot store it)
CUSTOM_WINDOW = r"^(24h|[1-9][0-9]{0,6}[mhd])$"
PATTERN_REASONS = {NO_NUL: "a string may not hold a NUL character (\\u0000).",
                   CUSTOM_WINDOW: "expected '24h' or <N>m, <N>h, <N>d."}
BATCH_LIST_LIMIT = 100                   # GET /v1/batches ?limit= at most
FILE_LIST_LIMIT = 10_000                 # GET /v1/files ?limit= at most (and its default)

METADATA = {
    "type": ["object", "null"], "maxProperties": MAX_METADATA_PAIRS,
    "propertyNames": {"maxLength": MAX_METADATA_KEY, "pattern": NO_NUL},
    "additionalProperties": {"type": "string", "maxLength": MAX_METADATA_VALUE, "pattern": NO_NUL},
    "description": f"Up to {MAX_METADATA_PAIRS} string pairs (keys up to {MAX_METADATA_KEY} characters, values up to "
                   f"{MAX_METADATA_VALUE}). tokabatch reads `webhook_url` and `dry_run` from it.",
}
BATCH_CREATE = {
    "type": "object",
    "properties": {
        "input_file_id": {"type": "string", "minLength": 1, "pattern": NO_NUL,
                          "description": "A file uploaded with purpose batch."},
        "endpoint": {"type": "string", "enum": list(SUPPORTED_ENDPOINTS)},
        "completion_window": {"type": "string", "enum": [DEFAULT_WINDOW]},
        "metadata": METADATA,
        "output_expires_after": {
            "type": ["object", "null"], "required": ["anchor", "seconds"], "additionalProperties": False,
            "properties": {"anchor": {"const": "created_at"},
                           "seconds": {"type": "integer", "minimum": MIN_EXPIRES_AFTER_S,
                                       "maximum": MAX_EXPIRES_AFTER_S}}},
        "dry_run": {"type": "boolean", "description": "tokabatch: answer what the batch would be (lines, "
                                                      "tokens, an estimated duration) and create nothing."},
    },
    "required": ["input_file_id", "endpoint", "completion_window"],
    "additionalProperties": False,
}
BATCH_RETRY = {
    "type": "object",
    "properties": {"all": {"type": "boolean", "description": "Retry every failed line, 4xx too (default: only "
                                                             "those that can succeed on a retry)."},
                   "metadata": METADATA},
    "additionalProperties": False,
}
# With `serve --allow-custom-windows`: windows of <N> minutes, hours or days too (the document follows).
BATCH_CREATE_CUSTOM_WINDOWS = {**BATCH_CREATE, "properties": {
    **BATCH_CREATE["properties"],
    "completion_window": {"type": "string", "pattern": CUSTOM_WINDOW, "examples": ["24h", "30m"],
                          "description": "<N>m, <N>h or <N>d (this server allows custom windows)"}}}
_METADATA_ONLY = {"type": "object", "properties": {"metadata": METADATA}}
_VALIDATORS = {id(schema): Draft202012Validator(schema)
               for schema in (BATCH_CREATE, BATCH_CREATE_CUSTOM_WINDOWS, BATCH_RETRY, _METADATA_ONLY)}
_ORDER = {"type": 0, "additionalProperties": 1, "required": 2}      # which error a body hears first


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


def query_value(query: Mapping[str, str], name: str) -> str | None:
    """A query parameter given at most once (None when absent); given twice is a 400, not a guess."""
    values = query.getall(name, []) if hasattr(query, "getall") else [query[name]] if name in query else []
    if len(values) > 1:
        raise InvalidRequest(f"Invalid '{name}': given {len(values)} times; give it once.", param=name,
                             code="invalid_value")
    return values[0] if values else None


def parse_limit(query: Mapping[str, str], *, default: int, maximum: int) -> int:
    raw = query_value(query, "limit")
    if raw is None:
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
    order = query_value(query, "order")
    order = "desc" if order is None else order
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
    """`metadata` checked as the METADATA schema says (a retry's merged metadata is checked again)."""
    check_body({"metadata": metadata}, _METADATA_ONLY)
    return dict(metadata) if metadata is not None else None


@dataclass(frozen=True, slots=True)
class BatchCreate:
    input_file_id: str
    endpoint: str
    completion_window: str
    window_s: int
    metadata: dict[str, str] | None
    output_expires_after_s: int | None
    dry_run: bool = False


def check_body(body: Any, schema: dict) -> dict:
    """`body` if it satisfies `schema` (BATCH_CREATE, BATCH_RETRY), else InvalidRequest for its first
    error in the contract's terms: unknown_parameter, missing_required_parameter, invalid_type or
    invalid_value, with the dotted path of the field as `param`."""
    errors = list(_VALIDATORS[id(schema)].iter_errors(body))
    if not errors:
        return body
    error = min(errors, key=lambda e: (len(e.absolute_path), _ORDER.get(str(e.validator), 3)))
    raise _contract_error(error)


def _contract_error(error: ValidationError) -> InvalidRequest:
    path = ".".join(str(part) for part in error.absolute_path)
    kind, value = str(error.validator), error.validator_value
    if kind == "type" and not path:
        return InvalidRequest("The request body must be a JSON object.")
    if kind == "additionalProperties":
        known = error.schema.get("properties", {})
        name = next(str(k) for k in error.instance if k not in known)
        return InvalidRequest(f"Unrecognized request argument supplied: {_join(path, name)}",
                              param=_join(path, name), code="unknown_parameter")
    if kind == "required":
        name = next(n for n in value if n not in error.instance)
        return InvalidRequest(f"Missing required parameter: '{_join(path, name)}'.", param=_join(path, name),
                              code="missing_required_parameter")
    if kind == "type":
        expected = " or ".join(["an object" if t == "object" else "null" if t == "null" else f"a {t}"
                                for t in (value if isinstance(value, list) else [value])])
        return InvalidRequest(f"Invalid type for '{path}': expected {expected}, but got "
                              f"{type(error.instance).__name__}.", param=path, code="invalid_type")
    if "propertyNames" in error.schema_path:
        path = _join(path, str(error.instance)[:80])
    reason = {
        "enum": lambda: f"supported values are {', '.join(repr(v) for v in value)}.",
        "const": lambda: f"the only supported value is {value!r}.",
        "maxProperties": lambda: f"at most {value} pairs are allowed.",
        "minLength": lambda: f"expected at least {value} characters.",
        "maxLength": lambda: f"expected at most {value} characters.",
        "minimum": lambda: f"expected at least {value}.",
        "pattern": lambda: PATTERN_REASONS.get(value, f"expected a match of {value}."),
        "maximum": lambda: f"expected at most {value}.",
    }.get(kind, lambda: error.message[:200])()
    if isinstance(error.instance, (dict, list)):
        return InvalidRequest(f"Invalid '{path}': {reason}", param=path, code="invalid_value")
    return InvalidRequest(f"Invalid value for '{path}': {repr(error.instance)[:120]}; {reason}", param=path,
                          code="invalid_value")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


@dataclass(frozen=True, slots=True)
class BatchRetry:
    include_all: bool
    metadata: dict[str, str] | None


def parse_batch_retry(body: Any) -> BatchRetry:
    """A POST /v1/batches/{id}/retry body (an extension): {"all": bool, "metadata": {...}}, both optional."""
    check_body(body, BATCH_RETRY)
    return BatchRetry(include_all=body.get("all", False), metadata=parse_metadata(body.get("metadata")))


def batch_create_schema(allow_custom_windows: bool) -> dict:
    """The POST /v1/batches body schema of a server with or without custom completion windows."""
    return BATCH_CREATE_CUSTOM_WINDOWS if allow_custom_windows else BATCH_CREATE


def parse_batch_create(body: Any, *, allow_custom_windows: bool) -> BatchCreate:
    """Check a POST /v1/batches body (already JSON-decoded) against contract §3.1: BATCH_CREATE, then
    the completion window against the server's setting."""
    check_body(body, batch_create_schema(allow_custom_windows))
    window_s = parse_window(body["completion_window"], allow_custom=allow_custom_windows)
    expires_after = body.get("output_expires_after")
    return BatchCreate(input_file_id=body["input_file_id"], endpoint=body["endpoint"],
                       completion_window=body["completion_window"], window_s=window_s,
                       metadata=parse_metadata(body.get("metadata")),
                       output_expires_after_s=None if expires_after is None else int(expires_after["seconds"]),
                       dry_run=body.get("dry_run", False))
