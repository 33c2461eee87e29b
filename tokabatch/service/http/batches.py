"""The Batch API: create, list, retrieve, cancel; and the extensions retry and dry run.

Owns the HTTP side of batches only: it validates the create body (schemas.parse_batch_create),
writes the row in `validating` and returns. It never runs or validates the input file — the runner
claims the batch and does that (a nonexistent input_file_id is accepted here and fails there, as
OpenAI does). An `Idempotency-Key` header makes a repeat of the same JSON body (compared
ignoring key order and whitespace) return the first batch (http/idempotency.py), on create and on retry.

Extensions: `"dry_run": true` on create validates and prices the file without creating a batch
(jobs/dry_run.py: it needs the served model, so a server without one answers 503);
`POST /v1/batches/{id}/retry` creates a child batch of the failed lines that can succeed
(jobs/retry.py); `GET /v1/batches?parent_batch_id=` lists a batch's retries. Must not import torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from aiohttp import web

from tokabatch.engine.api import EngineStats
from tokabatch.errors import EngineUnavailable, InvalidRequest, NotFound
from tokabatch.service.http import idempotency
from tokabatch.service.http.context import BATCH_CREATED, BLOBS, CONFIG, DB, MODELS, now_s, owner_of
from tokabatch.service.http.schemas import (
    BATCH_LIST_LIMIT, BatchCreate, batch_object, list_object, parse_batch_create, parse_batch_retry, parse_limit,
    parse_metadata, query_value,
)
from tokabatch.service.jobs import dry_run, retry
from tokabatch.service.jobs.webhooks import check_webhook_metadata
from tokabatch.service.storage import repo

routes = web.RouteTableDef()


async def read_json(request: web.Request) -> object:
    """The decoded JSON body, or a 400 envelope for an empty or unparseable one."""
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):      # RecursionError: nested too deeply
        raise InvalidRequest("We could not parse the JSON body of your request. (HINT: This likely means "
                             "you aren't using your HTTP library correctly. The OpenAI API expects a "
                             "JSON payload.)") from None


def _check_webhook(request: web.Request, metadata: dict[str, str] | None) -> None:
    webhooks = request.app[CONFIG].webhooks
    check_webhook_metadata(metadata, secret_configured=webhooks.secret is not None,
                           allowed_hosts=webhooks.allowed_hosts)


def _batch_loader(request: web.Request) -> idempotency.Loader:
    async def load(batch_id: str) -> Any:
        return await repo.get_batch(request.app[DB], batch_id, owner=owner_of(request))
    return load


@routes.post("/v1/batches")
async def create_batch(request: web.Request) -> web.Response:
    body = await read_json(request)
    params = parse_batch_create(body, allow_custom_windows=request.app[CONFIG].server.allow_custom_windows)
    _check_webhook(request, params.metadata)
    if params.dry_run:
        return await _dry_run(request, params)
    claim = None
    if (key := idempotency.key_of(request)) is not None:
        claim = repo.IdempotencyClaim(key, "/v1/batches", idempotency.json_fingerprint(body))
        replayed = await idempotency.replay(request, claim, _batch_loader(request), batch_object)
        if replayed is not None:
            return replayed
    try:
        row = await repo.create_batch(
            request.app[DB], owner=owner_of(request), input_file_id=params.input_file_id,
            endpoint=params.endpoint, completion_window=params.completion_window, now_s=now_s(request),
            window_s=params.window_s, model=request.app[MODELS].primary, metadata=params.metadata,
            output_expires_after_s=params.output_expires_after_s, idempotency=claim)
    except repo.IdempotencyKeyTaken:
        assert claim is not None
        return await idempotency.replay_after_race(request, claim, _batch_loader(request), batch_object)
    request.app[BATCH_CREATED]()
    return web.json_response(batch_object(row))


async def _dry_run(request: web.Request, params: BatchCreate) -> web.Response:
    """What the batch would be: lines, errors, tokens, prefix sharing and an estimated duration."""
    from tokabatch.service.http.online import ENGINE, TOKENIZER   # online imports this module (read_json)

    engine, tokenizer = request.app.get(ENGINE), request.app.get(TOKENIZER)
    info = engine.info if engine is not None else request.app[MODELS].info
    if tokenizer is None or info is None:
        raise EngineUnavailable("A dry run prepares every line with the served model's tokenizer; this server "
                                "has no model.")
    # An API node (serve --role api) has no engine: no length history, so every max_tokens counts in full.
    stats = engine.stats() if engine is not None else EngineStats()
    db, owner = request.app[DB], owner_of(request)
    input_file = await repo.get_file(db, params.input_file_id, owner=owner, now_s=now_s(request))
    input_path = None
    if input_file is not None and input_file.purpose == "batch":
        with contextlib.suppress(FileNotFoundError):
            input_path = await asyncio.to_thread(request.app[BLOBS].local, input_file.id)
    if input_path is None:
        raise InvalidRequest(f"No batch input file with id '{params.input_file_id}' (purpose 'batch').",
                             param="input_file_id", code="invalid_value")
    report = await asyncio.to_thread(
        dry_run.dry_run, input_path, endpoint=params.endpoint,
        served_model_names=set(request.app[MODELS].names), max_lines=request.app[CONFIG].server.max_batch_lines,
        tokenizer=tokenizer, model_info=info, stats=stats)
    dry_run.estimate(report, await repo.recent_output_rate(db, model=info.model_id))
    return web.json_response(report.to_dict(input_file_id=input_file.id, endpoint=params.endpoint,
                                            model=request.app[MODELS].primary))


@routes.post("/v1/batches/{batch_id}/retry")
async def retry_batch(request: web.Request) -> web.Response:
    """A child batch of the parent's failed lines that can succeed (all of them with "all": true)."""
    batch_id = request.match_info["batch_id"]
    body = await read_json(request) if await request.read() else {}
    params = parse_batch_retry(body)
    db, owner = request.app[DB], owner_of(request)
    parent = await repo.get_batch(db, batch_id, owner=owner)
    if parent is None:
        raise _not_found(batch_id)
    metadata = parse_metadata(retry.child_metadata(parent, params.metadata))
    assert metadata is not None
    _check_webhook(request, metadata)
    claim = None
    if (key := idempotency.key_of(request)) is not None:
        claim = repo.IdempotencyClaim(key, f"/v1/batches/{batch_id}/retry", idempotency.json_fingerprint(body))
        replayed = await idempotency.replay(request, claim, _batch_loader(request), batch_object)
        if replayed is not None:
            return replayed
    try:
        row = await retry.create_retry(db, request.app[BLOBS], parent, include_all=params.include_all,
                                       now_s=now_s(request), metadata=metadata, idempotency=claim)
    except repo.IdempotencyKeyTaken:
        assert claim is not None
        return await idempotency.replay_after_race(request, claim, _batch_loader(request), batch_object)
    request.app[BATCH_CREATED]()
    return web.json_response(batch_object(row))


@routes.get("/v1/batches")
async def list_batches(request: web.Request) -> web.Response:
    q = request.query
    page = await repo.list_batches(request.app[DB], owner=owner_of(request), after=query_value(q, "after") or None,
                                   limit=parse_limit(q, default=20, maximum=BATCH_LIST_LIMIT),
                                   parent_batch_id=query_value(q, "parent_batch_id") or None)
    return web.json_response(list_object([batch_object(b) for b in page.items], page.has_more))


def _not_found(batch_id: str) -> NotFound:
    return NotFound(f"No batch found with id '{batch_id}'.")


@routes.get("/v1/batches/{batch_id}")
async def retrieve_batch(request: web.Request) -> web.Response:
    batch_id = request.match_info["batch_id"]
    row = await repo.get_batch(request.app[DB], batch_id, owner=owner_of(request))
    if row is None:
        raise _not_found(batch_id)
    return web.json_response(batch_object(row))


@routes.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(request: web.Request) -> web.Response:
    """validating/in_progress -> cancelling; cancelling/cancelled unchanged; otherwise 409."""
    batch_id = request.match_info["batch_id"]
    row = await repo.cancel_batch(request.app[DB], batch_id, owner=owner_of(request), now_s=now_s(request))
    if row is None:
        raise _not_found(batch_id)
    return web.json_response(batch_object(row))
