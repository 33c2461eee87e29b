"""The Batch API: create, list, retrieve, cancel.

Owns the HTTP side of batches only: it validates the create body (schemas.parse_batch_create),
writes the row in `validating` and returns. It never runs or validates the input file — the runner
claims the batch and does that (a nonexistent input_file_id is accepted here and fails there, as
OpenAI does). An `Idempotency-Key` header makes a repeat of the same JSON body (compared
ignoring key order and whitespace) return the first batch (http/idempotency.py). Must not import torch.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from tokabatch.errors import InvalidRequest, NotFound
from tokabatch.service.http import idempotency
from tokabatch.service.http.context import BATCH_CREATED, CONFIG, DB, MODELS, now_s, owner_of
from tokabatch.service.http.schemas import batch_object, list_object, parse_batch_create, parse_limit
from tokabatch.service.storage import repo

routes = web.RouteTableDef()


async def read_json(request: web.Request) -> object:
    """The decoded JSON body, or a 400 envelope for an empty or unparseable one."""
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("We could not parse the JSON body of your request. (HINT: This likely means "
                             "you aren't using your HTTP library correctly. The OpenAI API expects a "
                             "JSON payload.)") from None


def _batch_loader(request: web.Request) -> idempotency.Loader:
    async def load(batch_id: str) -> Any:
        return await repo.get_batch(request.app[DB], batch_id, owner=owner_of(request))
    return load


@routes.post("/v1/batches")
async def create_batch(request: web.Request) -> web.Response:
    body = await read_json(request)
    params = parse_batch_create(body, allow_custom_windows=request.app[CONFIG].server.allow_custom_windows)
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


@routes.get("/v1/batches")
async def list_batches(request: web.Request) -> web.Response:
    q = request.query
    page = await repo.list_batches(request.app[DB], owner=owner_of(request), after=q.get("after") or None,
                                   limit=parse_limit(q, default=20, maximum=100))
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
