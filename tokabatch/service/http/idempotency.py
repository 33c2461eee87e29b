"""The optional `Idempotency-Key` request header of POST /v1/files and POST /v1/batches
(contract §1.2 [tb]).

Owns the HTTP rules: the first request with a given (owner, key) creates the object; a repeat
within 24 h whose request matches (same endpoint, same fingerprint) gets the same object back
(200, header `Idempotent-Replayed: true`) and creates nothing; a repeat that differs is a 409
(`x-should-retry: false`, added by middleware.py for every 409). If the object the key names was
deleted or has expired since, the key is forgotten and the repeat creates a new object. The
fingerprints (what "the same request" means) are built by the endpoints. Must not import torch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Awaitable, Callable

from aiohttp import web

from tokabatch.errors import Conflict, InternalError, InvalidRequest
from tokabatch.service.http.context import DB, now_s, owner_of
from tokabatch.service.storage import repo

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_CHARS = 255

Loader = Callable[[str], Awaitable[Any]]       # object id -> the live object, or None
Renderer = Callable[[Any], dict]               # object -> its JSON body


def key_of(request: web.Request) -> str | None:
    """The request's key, None without the header; 400 for an empty or over-long one."""
    value = request.headers.get(HEADER)
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > MAX_KEY_CHARS:
        raise InvalidRequest(f"The {HEADER} header must be 1 to {MAX_KEY_CHARS} characters long.",
                             param=HEADER, code="invalid_value")
    return value


def fingerprint(*parts: str) -> str:
    """sha256 hex of the parts (length-prefixed, so ("ab", "c") and ("a", "bc") differ)."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8")
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def json_fingerprint(body: object) -> str:
    """Of a JSON body, insensitive to key order and whitespace."""
    return fingerprint(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False))


async def replay(request: web.Request, claim: repo.IdempotencyClaim, load: Loader,
                 render: Renderer) -> web.Response | None:
    """The response to a repeat of `claim`, or None when the key is new (create the object, passing
    `claim` to the repo). Conflict when the key was first used for a different request."""
    db, owner = request.app[DB], owner_of(request)
    record = await repo.find_idempotency_key(db, owner=owner, key=claim.key, now_s=now_s(request))
    if record is None:
        return None
    if record.endpoint != claim.endpoint or record.fingerprint != claim.fingerprint:
        raise Conflict(f"{HEADER} {claim.key!r} was already used for a different request "
                       f"(POST {record.endpoint} creating {record.object_id}); keys are remembered "
                       "for 24 hours. Send a new key for a new request.", param=HEADER,
                       code="idempotency_key_reused")
    row = await load(record.object_id)
    if row is None:      # deleted or expired since: the key no longer names anything
        await repo.forget_idempotency_key(db, owner=owner, key=claim.key)
        return None
    response = web.json_response(render(row))
    response.headers[REPLAYED_HEADER] = "true"
    return response


async def replay_after_race(request: web.Request, claim: repo.IdempotencyClaim, load: Loader,
                            render: Renderer) -> web.Response:
    """After repo.IdempotencyKeyTaken: a concurrent request with the key won; answer with its
    object (or a 409 if it was a different request)."""
    response = await replay(request, claim, load, render)
    if response is None:   # the winner's object vanished at once: let the client retry
        raise InternalError(f"A concurrent request with the same {HEADER} did not complete; retry.")
    return response


__all__ = ["HEADER", "REPLAYED_HEADER", "key_of", "fingerprint", "json_fingerprint", "replay",
           "replay_after_race"]
