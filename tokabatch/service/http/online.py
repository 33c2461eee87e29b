"""The online endpoints: POST /v1/chat/completions and POST /v1/completions, plain and streaming.

A request is validated and rendered exactly like a batch line (jobs/render.prepare_request and
render_response), then run with `Engine.submit`, which bypasses the batch back-pressure and runs at
Priority.ONLINE, so an interactive call is not stuck behind a 50,000-line batch. `stream: true`
answers with server-sent events as OpenAI sends them (`data: <chunk>\\n\\n` ..., `data: [DONE]\\n\\n`),
chunks from jobs/render_stream. A client that disconnects aborts its engine requests: a request looks
at its connection every CLIENT_CHECK_S (and a stream finds out at its next write), since aiohttp
cancels no handler when its client leaves (handler_cancellation stays off, so that no upload stops
between its blob and its row).

The app must hold ENGINE and TOKENIZER (set by server.py); without an engine the endpoints answer
503. A request is prepared (tokenized) in a worker thread, so a huge prompt does not stall the event
loop. Latency goes to metrics.LATENCY. Must not import torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any, AsyncIterator, Awaitable, TypeVar

from aiohttp import web

from tokabatch.engine.api import Engine, GenerationOutput, GenerationRequest, GenerationUpdate, Priority
from tokabatch.errors import EngineUnavailable, InvalidRequest
from tokabatch.service.http.batches import read_json
from tokabatch.service.http.context import CLIENT_CLOSED_REQUEST, MODELS, REQUEST_ID, client_gone, now_s
from tokabatch.service.http.metrics import LATENCY
from tokabatch.service.jobs import render
from tokabatch.service.jobs.render_stream import StreamRenderer
from tokabatch.text import Tokenizer

ENGINE = web.AppKey("engine", Engine)
TOKENIZER = web.AppKey("tokenizer", Tokenizer)

routes = web.RouteTableDef()
CLIENT_CHECK_S = 1.0               # how often a request checks that its client is still there
T = TypeVar("T")


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, render.CHAT_ENDPOINT)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, render.COMPLETIONS_ENDPOINT)


async def _complete(request: web.Request, endpoint: str) -> web.StreamResponse:
    started = time.monotonic()
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_type")
    engine = request.app.get(ENGINE)
    if engine is None:
        raise EngineUnavailable("No model is loaded on this server.")
    # In a worker thread: a prompt of megabytes takes seconds to tokenize, and the event loop must go
    # on answering (/health, other requests, the batch runner's heartbeats) meanwhile.
    prepared = await asyncio.to_thread(
        render.prepare_request, endpoint, body, tokenizer=request.app[TOKENIZER], model_info=engine.info,
        served_model_names=set(request.app[MODELS].names), request_id=request[REQUEST_ID],
        priority=Priority.ONLINE)
    created = now_s(request)
    status = "ok"
    try:
        if prepared.stream:
            response, client_left = await _stream(request, engine, prepared, created)
            if client_left:
                status = "cancelled"
            return response
        outputs = await _unless_client_leaves(
            request, asyncio.gather(*(_final_output(engine, r) for r in prepared.requests)))
        if outputs is None:
            status = "cancelled"
            return web.Response(status=CLIENT_CLOSED_REQUEST)
        failure = render.first_failure(list(outputs))
        if failure is not None:
            status = "error"
            return _failure_response(failure)
        return web.json_response(render.render_response(prepared, list(outputs), created=created))
    except asyncio.CancelledError:
        status = "cancelled"
        raise
    finally:
        latency = request.app.get(LATENCY)
        if latency is not None:
            latency.observe(endpoint, status, time.monotonic() - started)


async def _unless_client_leaves(request: web.Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None once the client has disconnected; `work` is then cancelled, which
    aborts its engine requests."""
    task = asyncio.ensure_future(work)
    try:
        while not (await asyncio.wait({task}, timeout=CLIENT_CHECK_S))[0]:
            if client_gone(request):
                return None
        return task.result()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _final_output(engine: Engine, req: GenerationRequest) -> GenerationOutput:
    async for item in engine.submit(req):
        if isinstance(item, GenerationOutput):
            return item
    raise EngineUnavailable("The engine ended the request without an output.")


def _failure_response(output: GenerationOutput) -> web.Response:
    if output.error is not None:
        return web.json_response(render.error_body(output.error), status=output.error.status)
    error = EngineUnavailable("The request was aborted (the engine is shutting down); retry it.")
    return web.json_response(error.to_dict(), status=error.status)


async def _merged(engine: Engine, requests: tuple[GenerationRequest, ...]
                  ) -> AsyncIterator[GenerationUpdate | GenerationOutput]:
    """Every request's items as they come, interleaved; cancelling this aborts them all."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def pump(req: GenerationRequest) -> None:
        try:
            async for item in engine.submit(req):
                await queue.put(item)
        except Exception as e:  # re-raised in the consumer, never lost
            await queue.put(e)

    tasks = [asyncio.create_task(pump(r), name=f"online-{r.request_id}") for r in requests]
    try:
        remaining = len(requests)
        while remaining:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if isinstance(item, GenerationOutput):
                remaining -= 1
            yield item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _stream(request: web.Request, engine: Engine, prepared: render.PreparedRequest,
                  created: int) -> tuple[web.StreamResponse, bool]:
    """The response, and whether the client left before its end (its requests are then aborted).
    A write to a gone client fails at once; between writes (before the first token, or a long
    wait for the next) the connection is watched as a plain request's is."""
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
        "x-request-id": request[REQUEST_ID]})
    answered = await _unless_client_leaves(request, _stream_to(request, response, engine, prepared, created))
    return (response, True) if answered is None else answered


async def _stream_to(request: web.Request, response: web.StreamResponse, engine: Engine,
                     prepared: render.PreparedRequest, created: int) -> tuple[web.StreamResponse, bool]:
    renderer = StreamRenderer(prepared, created=created)
    outputs: list[GenerationOutput] = []
    items = _merged(engine, prepared.requests)
    try:
        first = await anext(items)   # a request the engine rejects at once is a plain HTTP error
        if isinstance(first, GenerationOutput) and not first.ok:
            return _failure_response(first), False
        await response.prepare(request)
        for chunk in renderer.start():
            await _send(response, chunk)
        pending: list[GenerationUpdate | GenerationOutput] = [first]
        while True:
            for item in pending:
                if isinstance(item, GenerationUpdate):
                    for chunk in renderer.update(item):
                        await _send(response, chunk)
                    continue
                if not item.ok:       # failed mid-stream: OpenAI sends an error event, then ends
                    body = render.error_body(item.error) if item.error is not None else EngineUnavailable(
                        "The request was aborted (the engine is shutting down).").to_dict()
                    await _send(response, body)
                    await response.write(b"data: [DONE]\n\n")
                    return response, False
                outputs.append(item)
            try:
                pending = [await anext(items)]
            except StopAsyncIteration:
                break
        for chunk in renderer.finish(outputs):
            await _send(response, chunk)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response, False
    except ConnectionResetError:      # the client left mid-stream: nobody to answer; the finally aborts
        return response, True
    finally:
        await items.aclose()


async def _send(response: web.StreamResponse, chunk: dict) -> None:
    await response.write(b"data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
                         + b"\n\n")


__all__ = ["ENGINE", "TOKENIZER", "routes"]
