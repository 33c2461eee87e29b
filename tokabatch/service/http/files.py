"""The Files API: upload (streamed multipart), list, retrieve, content (Range-aware), delete.

Owns upload handling: the body is read part by part with `request.multipart()`, the file part is
streamed to a temporary blob while its bytes are counted against `max_upload_bytes` (413 envelope,
never a buffered body or aiohttp's plain-text page), and `purpose=batch` files get the cheap
upload-time checks of contract §2.1 (non-empty, UTF-8, first non-blank line a JSON object).
Expired files (`expires_at` reached, by the app's clock) answer exactly like deleted ones: not
listed, 404 on retrieve/content/delete (repo hides them; storage/sweeper.py removes them later).
With an `Idempotency-Key` header (http/idempotency.py) the upload's bytes are hashed while they
stream; a repeat's bytes are read in full, compared by sha256 (with filename, purpose and
expires_after) and discarded. Must not import torch.
"""

from __future__ import annotations

import asyncio

import hashlib
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from tokabatch.errors import InvalidRequest, NotFound, PayloadTooLarge
from tokabatch.service.http import idempotency
from tokabatch.service.http.context import BLOBS, CONFIG, DB, now_s, owner_of
from tokabatch.service.http.schemas import (
    FILE_LIST_LIMIT, file_object, list_object, parse_expires_after, parse_limit, parse_order, query_value,
)
from tokabatch.service.jobs.parse import FirstLineCheck
from tokabatch.service.storage import repo
from tokabatch.service.storage.blobs import BlobWriter
from tokabatch.service.storage.db import is_storage_full

UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
BATCH_FILE_TTL_S = 2_592_000        # purpose=batch files expire 30 days after creation
CHUNK_BYTES = 256 * 1024
MAX_FIELD_BYTES = 4096               # text form fields are tiny; never buffer a big one
MULTIPART_SLACK_BYTES = 64 * 1024    # boundaries and part headers around the file bytes
routes = web.RouteTableDef()


@dataclass(slots=True)
class UploadForm:
    fields: dict[str, str]
    writer: BlobWriter | None = None
    filename: str = "upload"
    check: FirstLineCheck | None = None
    sha256: Any = None       # a hashlib object when the request has an Idempotency-Key


async def _read_field(part: BodyPartReader) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(1024):
        data += chunk
        if len(data) > MAX_FIELD_BYTES:
            raise InvalidRequest(f"Form field '{part.name}' is too long.", param=part.name)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"Form field '{part.name}' is not UTF-8.", param=part.name) from None


async def _drain(request: web.Request) -> None:
    """Read and drop the rest of the body so the client sees our 413, not a reset connection."""
    while await request.content.readany():
        pass


async def _stream_file(request: web.Request, part: BodyPartReader, form: UploadForm, max_bytes: int) -> None:
    if form.writer is not None:
        raise InvalidRequest("Only one 'file' part is allowed.", param="file")
    form.filename = part.filename or "upload"
    form.writer = request.app[BLOBS].writer(repo.new_file_id())
    form.check = FirstLineCheck()
    while chunk := await part.read_chunk(CHUNK_BYTES):
        form.check.feed(chunk)
        if form.sha256 is not None:
            form.sha256.update(chunk)
        if form.check.num_bytes > max_bytes:
            await _drain(request)
            raise PayloadTooLarge(f"File is too large: the limit is {max_bytes} bytes.", param="file",
                                  code="file_too_large")
        await form.writer.write(chunk)


async def _read_form(request: web.Request, form: UploadForm, max_bytes: int) -> None:
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError, KeyError) as e:
        raise InvalidRequest(f"Expected a multipart/form-data body: {e}") from None
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise InvalidRequest("Nested multipart bodies are not supported.")
            if part.name == "file":
                await _stream_file(request, part, form, max_bytes)
            elif part.name:
                form.fields[part.name] = await _read_field(part)
            else:
                await part.release()
    except (ValueError, HttpProcessingError) as e:   # malformed boundaries or part headers
        reason = e.message if isinstance(e, HttpProcessingError) else e
        raise InvalidRequest(f"Malformed multipart/form-data body: {' '.join(str(reason).split())}") from None


def _expires_at(form: UploadForm, purpose: str, created_at: int) -> int | None:
    anchor = form.fields.get("expires_after[anchor]")
    seconds = form.fields.get("expires_after[seconds]")
    if anchor is not None or seconds is not None:
        return created_at + parse_expires_after(anchor, seconds, param="expires_after")
    return created_at + BATCH_FILE_TTL_S if purpose == "batch" else None


def _check_form(form: UploadForm) -> str:
    purpose = form.fields.get("purpose")
    if not purpose:
        raise InvalidRequest("Missing required parameter: 'purpose'.", param="purpose",
                             code="missing_required_parameter")
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(f"Invalid value for 'purpose': {purpose!r}. Supported values are: "
                             f"{', '.join(repr(p) for p in UPLOAD_PURPOSES)}.", param="purpose",
                             code="invalid_value")
    if form.writer is None or form.check is None:
        raise InvalidRequest("Missing required parameter: 'file'.", param="file",
                             code="missing_required_parameter")
    if purpose == "batch" and (problem := form.check.problem()):
        raise InvalidRequest(problem, param="file", code="invalid_file_format")
    return purpose


def _claim(key: str | None, form: UploadForm, purpose: str) -> repo.IdempotencyClaim | None:
    """What makes a repeat "the same upload": filename, purpose, expires_after and the bytes."""
    if key is None or form.sha256 is None:
        return None
    return repo.IdempotencyClaim(key, "/v1/files", idempotency.fingerprint(
        form.filename, purpose, form.fields.get("expires_after[anchor]", ""),
        form.fields.get("expires_after[seconds]", ""), form.sha256.hexdigest()))


def _file_loader(request: web.Request) -> idempotency.Loader:
    async def load(file_id: str) -> Any:
        return await repo.get_file(request.app[DB], file_id, owner=owner_of(request), now_s=now_s(request))
    return load


@routes.post("/v1/files")
async def upload_file(request: web.Request) -> web.Response:
    max_bytes = request.app[CONFIG].server.max_upload_bytes
    if request.content_length is not None and request.content_length > max_bytes + MULTIPART_SLACK_BYTES:
        await _drain(request)
        raise PayloadTooLarge(f"File is too large: the limit is {max_bytes} bytes.", param="file",
                              code="file_too_large")
    key = idempotency.key_of(request)
    form = UploadForm(fields={}, sha256=hashlib.sha256() if key is not None else None)
    try:
        await _read_form(request, form, max_bytes)
        purpose = _check_form(form)
        created_at = now_s(request)
        expires_at = _expires_at(form, purpose, created_at)
        assert form.writer is not None
        claim = _claim(key, form, purpose)
        if claim is not None and (replayed := await idempotency.replay(
                request, claim, _file_loader(request), file_object)) is not None:
            await form.writer.abort()      # a repeat: its bytes are dropped
            return replayed
        num_bytes = await form.writer.commit()
    except BaseException as e:
        if form.writer is not None:
            await form.writer.abort()
        if isinstance(e, OSError) and is_storage_full(e):
            await _drain(request)          # the client reads our 507, not a reset connection
        raise
    try:
        row = await repo.create_file(request.app[DB], owner=owner_of(request), filename=form.filename,
                                     purpose=purpose, num_bytes=num_bytes, now_s=created_at,
                                     expires_at=expires_at, file_id=form.writer.file_id, idempotency=claim)
    except repo.IdempotencyKeyTaken:
        await asyncio.to_thread(request.app[BLOBS].delete, form.writer.file_id)
        assert claim is not None
        return await idempotency.replay_after_race(request, claim, _file_loader(request), file_object)
    except BaseException:
        request.app[BLOBS].delete(form.writer.file_id)
        raise
    return web.json_response(file_object(row))


async def _get_or_404(request: web.Request) -> Any:
    file_id = request.match_info["file_id"]
    row = await repo.get_file(request.app[DB], file_id, owner=owner_of(request), now_s=now_s(request))
    if row is None:
        raise NotFound(f"No such File object: {file_id}", param="id")
    return row


@routes.get("/v1/files")
async def list_files(request: web.Request) -> web.Response:
    q = request.query
    page = await repo.list_files(request.app[DB], owner=owner_of(request), after=query_value(q, "after") or None,
                                 limit=parse_limit(q, default=FILE_LIST_LIMIT, maximum=FILE_LIST_LIMIT),
                                 order=parse_order(q), purpose=query_value(q, "purpose") or None,
                                 now_s=now_s(request))
    return web.json_response(list_object([file_object(f) for f in page.items], page.has_more))


@routes.get("/v1/files/{file_id}")
async def retrieve_file(request: web.Request) -> web.Response:
    return web.json_response(file_object(await _get_or_404(request)))


@routes.get("/v1/files/{file_id}/content")
async def file_content(request: web.Request) -> web.StreamResponse:
    row = await _get_or_404(request)
    try:
        path = await asyncio.to_thread(request.app[BLOBS].local, row.id)
    except FileNotFoundError:
        raise NotFound(f"The content of File {row.id} is no longer available.", param="id") from None
    # FileResponse streams from disk in chunks and answers Range requests with 206.
    return web.FileResponse(path, chunk_size=CHUNK_BYTES,
                            headers={"Content-Type": "application/octet-stream"})


@routes.delete("/v1/files/{file_id}")
async def delete_file(request: web.Request) -> web.Response:
    file_id = request.match_info["file_id"]
    row = await repo.delete_file(request.app[DB], file_id, owner=owner_of(request), now_s=now_s(request))
    if row is None:
        raise NotFound(f"No such File object: {file_id}", param="id")
    await asyncio.to_thread(request.app[BLOBS].delete, row.id)
    return web.json_response({"id": row.id, "object": "file", "deleted": True})
