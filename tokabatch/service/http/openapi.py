"""GET /openapi.json: the HTTP API as an OpenAPI 3.1 document.

Request bodies are the JSON Schemas the handlers validate with (schemas.BATCH_CREATE or its
custom-window twin, as the server is configured, and schemas.BATCH_RETRY: jsonschema checks them,
then the contract's envelope names the first error),
and the limits of query parameters and uploads are the handlers' own constants, so the document and
the server cannot drift apart; the response shapes are checked against real responses by the
schemathesis run in tests/service/test_openapi.py. The online endpoints' bodies are validated field
by field as each endpoint renders them (jobs/render.py); the document names their main fields.
Must not import torch.
"""

from __future__ import annotations

import functools
from typing import Any

from aiohttp import web

from tokabatch import __version__
from tokabatch.service.http import files as files_http
from tokabatch.service.http.context import CONFIG
from tokabatch.service.http.schemas import (
    BATCH_LIST_LIMIT, BATCH_RETRY, FILE_LIST_LIMIT, MAX_EXPIRES_AFTER_S, MIN_EXPIRES_AFTER_S, NO_NUL,
    SUPPORTED_ENDPOINTS, batch_create_schema,
)
from tokabatch.service.storage.states import BatchStatus

routes = web.RouteTableDef()


def _nullable(kind: str | list[str]) -> dict:
    return {"type": [*(kind if isinstance(kind, list) else [kind]), "null"]}


def _object(required: list[str], properties: dict[str, Any]) -> dict:
    return {"type": "object", "required": required, "properties": properties}


ERROR = _object(["error"], {"error": _object(["message", "type"], {
    "message": {"type": "string"}, "type": {"type": "string"}, "param": _nullable("string"),
    "code": _nullable("string")})})
FILE = _object(["id", "object", "bytes", "created_at", "filename", "purpose", "status"], {
    "id": {"type": "string"}, "object": {"const": "file"}, "bytes": {"type": "integer"},
    "created_at": {"type": "integer"}, "filename": {"type": "string"}, "purpose": {"type": "string"},
    "status": {"type": "string"}, "expires_at": _nullable("integer"), "status_details": _nullable("string")})
DELETED_FILE = _object(["id", "object", "deleted"], {
    "id": {"type": "string"}, "object": {"const": "file"}, "deleted": {"type": "boolean"}})
_TIMES = ("in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
          "cancelling_at", "cancelled_at")
BATCH = _object(["id", "object", "endpoint", "input_file_id", "completion_window", "status", "created_at",
                 "request_counts"], {
    "id": {"type": "string"}, "object": {"const": "batch"}, "endpoint": {"type": "string"},
    "model": _nullable("string"), "input_file_id": {"type": "string"}, "completion_window": {"type": "string"},
    "status": {"enum": [s.value for s in BatchStatus]}, "created_at": {"type": "integer"},
    **{name: _nullable("integer") for name in _TIMES},
    "errors": _nullable("object"), "output_file_id": _nullable("string"), "error_file_id": _nullable("string"),
    "request_counts": _object(["total", "completed", "failed"], {
        name: {"type": "integer"} for name in ("total", "completed", "failed")}),
    "usage": _nullable("object"), "metadata": _nullable("object"), "output_expires_after": _nullable("object"),
    "output_parquet_file_id": _nullable("string"), "parent_batch_id": _nullable("string"),
    "throughput": _nullable("number"), "eta_seconds": _nullable("number")})
MODEL = _object(["id", "object", "created", "owned_by"], {
    "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
    "owned_by": {"type": "string"}})
HEALTH = _object(["status", "models"], {
    "status": {"enum": ["ok", "unavailable"]}, "models": {"type": "array", "items": {"type": "string"}},
    "problems": {"type": "array", "items": {"type": "string"}}})
DRY_RUN = {"type": "object", "description": "What the batch would be (dry_run): lines, errors, tokens, prefix "
                                            "sharing and an estimated duration; nothing is created."}
ONLINE = {"type": "object", "required": ["model"], "properties": {"model": {"type": "string"}},
          "description": "An OpenAI chat completion or completion request; every field is checked as the "
                         "endpoint renders it, and one it cannot honour is a 400 naming it."}


def _list(item: dict) -> dict:
    return _object(["object", "data", "has_more"], {
        "object": {"const": "list"}, "data": {"type": "array", "items": item}, "first_id": _nullable("string"),
        "last_id": _nullable("string"), "has_more": {"type": "boolean"}})


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _op(summary: str, ok: dict, *, body: dict | None = None, params: list[dict] | None = None,
        ok_status: str = "200") -> dict:
    """One operation: its success response, and every error as the envelope."""
    op: dict[str, Any] = {"summary": summary, "responses": {
        ok_status: {"description": "OK", **ok}, "default": {"description": "An error", **_json(ERROR)}}}
    if body is not None:
        op["requestBody"] = body
    if params:
        op["parameters"] = params
    return op


def _path_param(name: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "pattern": NO_NUL}}


def _query(name: str, schema: dict) -> dict:
    """A query parameter, given at most once (twice is a 400: schemas.query_value)."""
    return {"name": name, "in": "query", "required": False,
            "schema": {**schema, "pattern": NO_NUL} if schema.get("type") == "string" else schema}


def _limit(maximum: int) -> dict:
    return _query("limit", {"type": "integer", "minimum": 1, "maximum": maximum})


@functools.lru_cache(maxsize=2)
def document(allow_custom_windows: bool = False) -> dict:
    """The document of a server with (or without) `serve --allow-custom-windows`."""
    upload = {"required": True, "content": {"multipart/form-data": {"schema": _object(["file", "purpose"], {
        "file": {"type": "string", "contentMediaType": "application/octet-stream",
                 "description": "For purpose batch: JSONL, one request object per line (a 400 otherwise; "
                                "the content is checked beyond what a schema can say)."},
        "purpose": {"enum": list(files_http.UPLOAD_PURPOSES)},
        "expires_after[anchor]": {"const": "created_at"},
        "expires_after[seconds]": {"type": "integer", "minimum": MIN_EXPIRES_AFTER_S,
                                   "maximum": MAX_EXPIRES_AFTER_S}}) | {
        "dependentRequired": {"expires_after[anchor]": ["expires_after[seconds]"],
                              "expires_after[seconds]": ["expires_after[anchor]"]},
        "propertyNames": {"pattern": "^[\\x20-\\x7e]+$"}}}}}     # other parts are ignored; names are header text
    batch_id, file_id = _path_param("batch_id"), _path_param("file_id")
    paths = {
        "/v1/files": {
            "post": _op("Upload a file (streamed to disk)", _json(FILE), body=upload),
            "get": _op("List files", _json(_list(FILE)), params=[
                _query("purpose", {"type": "string"}), _limit(FILE_LIST_LIMIT), _query("after", {"type": "string"}),
                _query("order", {"enum": ["asc", "desc"]})])},
        "/v1/files/{file_id}": {
            "get": _op("Retrieve a file", _json(FILE), params=[file_id]),
            "delete": _op("Delete a file (409 while a batch reads it)", _json(DELETED_FILE), params=[file_id])},
        "/v1/files/{file_id}/content": {
            "get": _op("A file's bytes (Range requests answer 206)", {"content": {"application/octet-stream": {
                "schema": {"type": "string", "contentMediaType": "application/octet-stream"}}}},
                params=[file_id])},
        "/v1/batches": {
            "post": _op("Create a batch (or, with dry_run, say what it would be)",
                        _json({"anyOf": [BATCH, DRY_RUN]}),
                        body={"required": True, **_json(batch_create_schema(allow_custom_windows))}),
            "get": _op("List batches, newest first", _json(_list(BATCH)), params=[
                _limit(BATCH_LIST_LIMIT), _query("after", {"type": "string"}),
                _query("parent_batch_id", {"type": "string"})])},
        "/v1/batches/{batch_id}": {"get": _op("Retrieve a batch", _json(BATCH), params=[batch_id])},
        "/v1/batches/{batch_id}/cancel": {"post": _op("Cancel a batch", _json(BATCH), params=[batch_id])},
        "/v1/batches/{batch_id}/retry": {"post": _op(
            "A new batch of the failed lines that can succeed (tokabatch)", _json(BATCH), params=[batch_id],
            body={"required": False, **_json(BATCH_RETRY)})},
        "/v1/models": {"get": _op("The served model", _json(_object(["object", "data"], {
            "object": {"const": "list"}, "data": {"type": "array", "items": MODEL}})))},
        "/v1/models/{model}": {"get": _op("One model", _json(MODEL), params=[_path_param("model")])},
        **{endpoint: {"post": _op(f"Online {endpoint.rsplit('/', 1)[1]} (ahead of batch work)",
                                  _json({"type": "object"}), body={"required": True, **_json(ONLINE)})}
           for endpoint in SUPPORTED_ENDPOINTS},
        "/health": {"get": _op("200 while the server works, 503 with the reasons", _json(HEALTH))},
        "/ready": {"get": _op("As /health", _json(HEALTH))},
        "/metrics": {"get": _op("Prometheus metrics", {"content": {"text/plain": {"schema": {"type": "string"}}}})},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "tokabatch", "version": __version__,
                 "description": "OpenAI's Files and Batch APIs and online completions, served by a batch engine."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}, {}],
        "paths": paths,
    }


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document(request.app[CONFIG].server.allow_custom_windows))


__all__ = ["document", "routes"]
