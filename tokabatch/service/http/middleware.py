"""Middlewares: request ids, the OpenAI error envelope for every failure, and API-key auth.

Owns the rule that every response carries `x-request-id`, that every non-2xx body is
`{"error": {message, type, param, code}}` (including aiohttp's own 404/405/413), that 409s carry
`x-should-retry: false`, and who the caller is (`owner`: the key's sha256, "" without keys).
Must not import torch.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from typing import Awaitable, Callable

from aiohttp import web

from tokabatch.errors import (
    AuthenticationFailed, InsufficientStorage, InternalError, InvalidRequest, MethodNotAllowed, NotFound,
    PayloadTooLarge, TokabatchError,
)
from tokabatch.service.http.context import CLIENT_CLOSED_REQUEST, KEY_HASHES, OWNER, REQUEST_ID, client_gone
from tokabatch.service.storage.db import is_storage_full

log = logging.getLogger(__name__)
access_log = logging.getLogger("tokabatch.access")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC_PATHS = frozenset({"/health", "/ready", "/openapi.json"})


def new_request_id() -> str:
    return "req_" + secrets.token_hex(16)


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def error_response(error: TokabatchError) -> web.Response:
    response = web.json_response(error.to_dict(), status=error.status)
    if error.status == 409:
        # Deterministic conflicts: without this the openai client retries them twice.
        response.headers["x-should-retry"] = "false"
    return response


def _from_http_exception(request: web.Request, e: web.HTTPException) -> TokabatchError:
    if e.status == 404:
        return NotFound(f"Invalid URL ({request.method} {request.path})")
    if e.status == 405:
        return MethodNotAllowed(f"Method {request.method} is not allowed for {request.path}")
    if e.status == 413:
        return PayloadTooLarge(f"Request body is too large: {e.text or ''}".rstrip(": "))
    error = InvalidRequest(e.reason or "Bad request")
    error.status = e.status
    return error


@web.middleware
async def request_id_and_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: give the request an id, turn every exception into the envelope, stamp the id,
    and write one access-log record with the id, status and duration."""
    start = time.perf_counter()
    request_id = new_request_id()
    request[REQUEST_ID] = request_id
    try:
        if "\x00" in request.path or any("\x00" in k or "\x00" in v for k, v in request.query.items()):
            raise InvalidRequest("The request's path or query holds a NUL character (%00), which no id or "
                                 "parameter can hold.")
        response = await handler(request)
    except TokabatchError as e:
        response = error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            e.headers["x-request-id"] = request_id
            raise
        response = error_response(_from_http_exception(request, e))
    except asyncio.CancelledError:
        raise
    except ConnectionResetError as e:
        if not client_gone(request):
            response = _unexpected(request, request_id, e)   # (a connection of ours: a server error)
        else:   # the client hung up (mid-upload, mid-stream): not an error of the server; nobody reads this
            log.info("%s %s (%s): the client closed the connection", request.method, request.path, request_id)
            response = web.Response(status=CLIENT_CLOSED_REQUEST)
    except Exception as e:
        response = _unexpected(request, request_id, e)
    response.headers["x-request-id"] = request_id
    access_log.info("%s %s %s", request.method, request.path, response.status, extra={
        "request_id": request_id, "method": request.method, "path": request.path, "status": response.status,
        "duration_ms": round((time.perf_counter() - start) * 1000, 1)})
    return response


def _unexpected(request: web.Request, request_id: str, e: Exception) -> web.Response:
    """A full disk is a 507 that stored nothing (uploads remove their part file), logged as a
    warning; anything else is a 500 with its traceback in the log."""
    if is_storage_full(e):
        log.warning("%s %s (%s): the disk is full: %s", request.method, request.path, request_id, e)
        return error_response(InsufficientStorage(
            "The server has no space left to store this; nothing was stored. Retry once space is freed."))
    log.exception("unhandled error in %s %s (%s)", request.method, request.path, request_id)
    return error_response(InternalError(
        f"The server had an error while processing your request (request id {request_id})."))


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Without configured keys anyone is owner ""; with keys a missing/wrong bearer is 401."""
    key_hashes = request.app[KEY_HASHES]
    if not key_hashes or request.path in PUBLIC_PATHS:
        request[OWNER] = ""
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed("You didn't provide an API key. Provide it in the Authorization "
                                   "header as 'Bearer YOUR_KEY'.")
    digest = hash_key(token.strip())
    if digest not in key_hashes:
        raise AuthenticationFailed("Incorrect API key provided.")
    request[OWNER] = digest
    return await handler(request)


__all__ = ["request_id_and_errors", "auth", "error_response", "hash_key", "new_request_id"]
