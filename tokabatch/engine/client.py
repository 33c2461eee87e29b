"""EngineClient: the process boundary. The service's `Engine`, talking to a StepLoop over a Pipe.

Owns the engine process (multiprocessing spawn: a fresh interpreter that builds its loop from a
picklable `LoopSpec`), or, in-process mode, a thread running the same `serve()` over the same kind
of Pipe (fast tests, `tokabatch run`). A reader thread receives the engine's reports and hands them
to the asyncio loop; a writer thread sends, so the event loop never blocks on a busy engine.

Messages queued while the writer thread was sending go together as one ("many", [...]) message.
Back-pressure: the engine reports `num_wanted` (requests it could admit soon) together with how many
add messages it has seen; the client's credits are num_wanted minus adds still in the pipe, and
generate() pulls its next request only while it holds a credit. submit() (online) needs no credit.

Outputs are routed by request_id. If the engine dies, every in-flight request gets an output with
error 503 "engine_error", and later calls raise `EngineUnavailable`.

Must not import torch (the parent process is the torch-free service): stdlib, engine/api,
engine/loop_protocol and errors only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import queue
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import AsyncIterable, AsyncIterator, Iterable

from tokabatch import errors
from tokabatch.config import EngineConfig
from tokabatch.engine.api import (
    EngineStats,
    GenerationOutput,
    GenerationRequest,
    Item,
    ModelInfo,
    Priority,
    RequestError,
)
from tokabatch.engine.loop_protocol import LoopSpec, Report, StartFailure, error_output, serve, serve_in_child

log = logging.getLogger(__name__)

DEFAULT_FACTORY = "tokabatch.engine.runtime.factory:build_loop"
MAX_MESSAGES_PER_SEND = 4096


@dataclass(slots=True)
class _Route:
    """Where one in-flight request's updates and output go."""

    request: GenerationRequest
    sink: asyncio.Queue[Item]
    wants_updates: bool


class EngineClient:
    """The real `Engine`. Create with `await EngineClient.start(spec)`; finish with `await close()`."""

    def __init__(self, conn: Connection, *, process: multiprocessing.process.BaseProcess | None,
                 thread: threading.Thread | None) -> None:
        self._conn = conn
        self._process = process
        self._thread = thread
        self._loop = asyncio.get_running_loop()
        self._info: ModelInfo | None = None
        self._stats = EngineStats()
        self._routes: dict[str, _Route] = {}
        self._num_wanted = 0
        self._num_adds_sent = 0
        self._num_adds_seen = 0
        self._num_reserved = 0
        self._credit_changed = asyncio.Event()   # set whenever credits may have grown (or the engine died)
        self._started: asyncio.Future[ModelInfo] = self._loop.create_future()
        self._closed_event = asyncio.Event()
        self._closing = False
        self.failure: str | None = None   # why the engine stopped, once it has
        self.stopped = asyncio.Event()    # set once it has (died, failed, or was closed)
        self._outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read_forever, name="engine-reader", daemon=True)
        self._writer = threading.Thread(target=self._write_forever, name="engine-writer", daemon=True)

    # ---- start-up -------------------------------------------------------------------------

    @classmethod
    async def start(cls, spec: LoopSpec, *, in_process: bool = False, start_timeout_s: float = 900.0) -> EngineClient:
        """Start the engine (a child process, or a thread when `in_process`) and wait until it is ready.

        Raises the engine's own `tokabatch.errors` type if it failed to start (a bad model folder is
        a `ModelLoadError`), or `EngineUnavailable` if it died or timed out.
        """
        parent_conn, child_conn = multiprocessing.Pipe(duplex=True)
        if in_process:
            thread = threading.Thread(target=serve, args=(child_conn, spec), name="engine-loop", daemon=True)
            client = cls(parent_conn, process=None, thread=thread)
            thread.start()
        else:
            process = multiprocessing.get_context("spawn").Process(
                target=serve_in_child, args=(child_conn, spec), name="tokabatch-engine", daemon=True)
            client = cls(parent_conn, process=process, thread=None)
            process.start()
            child_conn.close()   # our copy: the engine's death must read as EOF on parent_conn
        client._reader.start()
        client._writer.start()
        try:
            await asyncio.wait_for(asyncio.shield(client._started), start_timeout_s)
        except asyncio.TimeoutError:
            client._closing = True
            await client._stop_workers(terminate=True)
            raise errors.EngineUnavailable(f"the engine did not start within {start_timeout_s:.0f} s") from None
        except BaseException:   # failed, or start-up was cancelled: do not wait for a half-built engine
            await client._stop_workers(terminate=True)
            raise
        return client

    @classmethod
    async def from_config(cls, engine_config: EngineConfig, *, in_process: bool = False) -> EngineClient:
        """Start the engine for this config: the real one (engine/runtime/factory.py) unless the config
        names another `loop_factory`."""
        factory = engine_config.loop_factory or DEFAULT_FACTORY
        return await cls.start(LoopSpec(factory, {"engine_config": engine_config}), in_process=in_process)

    # ---- the Engine protocol --------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        assert self._info is not None, "EngineClient.start() has not finished"
        return self._info

    @property
    def pid(self) -> int | None:
        """The engine process id (None in-process)."""
        return self._process.pid if self._process is not None else None

    def stats(self) -> EngineStats:
        return self._stats

    def health(self) -> str | None:
        """None while the engine runs; else why it stopped."""
        return self.failure

    async def generate(self, requests: AsyncIterable[GenerationRequest]) -> AsyncIterator[GenerationOutput]:
        """Run a stream of batch requests with back-pressure; yield outputs as they finish."""
        self._check_alive()
        sink: asyncio.Queue[Item] = asyncio.Queue()
        mine: set[str] = set()
        feeder = asyncio.create_task(self._feed(requests, sink, mine), name="engine-feed")
        try:
            while True:
                if feeder.done():
                    if not mine and sink.empty():
                        feeder.result()   # re-raise what the request source raised
                        break
                    item = await sink.get()
                else:
                    getter = asyncio.ensure_future(sink.get())
                    try:
                        await asyncio.wait({getter, feeder}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        got = getter.done()
                        if not got:
                            getter.cancel()   # asyncio.Queue.get loses nothing when cancelled
                    if not got:
                        continue
                    item = getter.result()
                if isinstance(item, GenerationOutput):
                    mine.discard(item.request_id)
                    yield item
            self._check_alive()
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
            unfinished = [rid for rid in mine if rid in self._routes]
            if unfinished:
                await self.abort(unfinished)
                for rid in unfinished:
                    self._routes.pop(rid, None)   # nobody reads the aborted outputs any more

    async def submit(self, request: GenerationRequest) -> AsyncIterator[Item]:
        """Run one (online) request now, bypassing back-pressure; the last item is its output."""
        self._check_alive()
        if request.priority != Priority.ONLINE:
            request = dataclasses.replace(request, priority=Priority.ONLINE)
        sink: asyncio.Queue[Item] = asyncio.Queue()
        if not self._send_add(request, sink, wants_updates=True):
            yield error_output(request, _duplicate(request))
            return
        finished = False
        try:
            while True:
                item = await sink.get()
                yield item
                if isinstance(item, GenerationOutput):
                    finished = True
                    return
        finally:
            if not finished and request.request_id in self._routes:
                await self.abort([request.request_id])
                self._routes.pop(request.request_id, None)

    async def abort(self, request_ids: Iterable[str]) -> None:
        """Ask the engine to stop these requests; each unfinished one gets an output with aborted=True."""
        for request_id in request_ids:
            if request_id in self._routes and self.failure is None:
                self._outbox.put(("abort", request_id))

    async def close(self) -> None:
        """Stop the engine in order: in-flight requests fail with 503, the process/thread is joined."""
        if self._closing:
            await self._closed_event.wait()
            return
        self._closing = True
        if self.failure is None and self._started.done() and not self._started.exception():
            self._outbox.put(("close",))
        self._fail_all("the engine is shutting down")
        await self._stop_workers()
        self._closed_event.set()

    # ---- feeding --------------------------------------------------------------------------

    async def _feed(self, requests: AsyncIterable[GenerationRequest], sink: asyncio.Queue[Item],
                    mine: set[str]) -> None:
        iterator = aiter(requests)
        while self.failure is None:
            while self._credits() <= 0 and self.failure is None:
                self._credit_changed.clear()
                await self._credit_changed.wait()
            if self.failure is not None:
                return
            self._num_reserved += 1       # held while we pull, so concurrent streams cannot overdraw
            try:
                request = await anext(iterator)
            except StopAsyncIteration:
                return
            finally:
                self._num_reserved -= 1
            if self.failure is not None:
                await sink.put(error_output(request, _engine_error(self.failure)))
                return
            if self._send_add(request, sink, wants_updates=False):
                mine.add(request.request_id)
            else:
                await sink.put(error_output(request, _duplicate(request)))

    def _credits(self) -> int:
        in_pipe = self._num_adds_sent - self._num_adds_seen
        return self._num_wanted - in_pipe - self._num_reserved

    def _send_add(self, request: GenerationRequest, sink: asyncio.Queue[Item], *, wants_updates: bool) -> bool:
        if request.request_id in self._routes:
            return False
        self._routes[request.request_id] = _Route(request, sink, wants_updates)
        self._num_adds_sent += 1
        self._outbox.put(("add", self._num_adds_sent, request))
        return True

    def _check_alive(self) -> None:
        if self.failure is not None:
            raise errors.EngineUnavailable(f"the engine is not running: {self.failure}")

    # ---- receiving (reader thread -> event loop) ------------------------------------------

    def _read_forever(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                self._call_soon(self._on_eof)
                return
            self._call_soon(self._dispatch, message)
            if message[0] in ("closed", "failed", "fatal"):
                return

    def _write_forever(self) -> None:
        """Send what the event loop queued; what piled up while a send ran goes as one "many"
        message (a window of adds is one pickle and one write, not thousands)."""
        stopping = False
        while not stopping:
            message = self._outbox.get()
            if message is None:
                return
            messages = [message]
            while len(messages) < MAX_MESSAGES_PER_SEND:
                try:
                    more = self._outbox.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                messages.append(more)
            try:
                self._conn.send(messages[0] if len(messages) == 1 else ("many", messages))
            except (OSError, ValueError):
                return   # the engine is gone; the reader reports it

    def _call_soon(self, callback, *args) -> None:
        with contextlib.suppress(RuntimeError):   # the event loop is closed: nobody is waiting
            self._loop.call_soon_threadsafe(callback, *args)

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "report":
            self._on_report(message[1])
        elif kind == "ready":
            self._info = message[1]
            self._on_report(message[2])
            if not self._started.done():
                self._started.set_result(self._info)
        elif kind == "failed":
            failure: StartFailure = message[1]
            self.failure = failure.message
            if not self._started.done():
                self._started.set_exception(_start_error(failure))
        elif kind == "fatal":
            log.error("the engine failed:\n%s", message[1])
            self._die(f"the engine failed: {message[1].strip().splitlines()[-1]}")
        elif kind == "closed":
            self._die("the engine was closed")

    def _on_report(self, report: Report) -> None:
        self._stats = report.stats
        for item in report.items:
            route = self._routes.get(item.request_id)
            if route is None:
                continue   # its stream was closed; the output of the abort has no reader
            if isinstance(item, GenerationOutput):
                del self._routes[item.request_id]
                route.sink.put_nowait(item)
            elif route.wants_updates:
                route.sink.put_nowait(item)
        self._num_wanted = report.num_wanted
        self._num_adds_seen = report.num_adds_seen
        self._credit_changed.set()

    def _on_eof(self) -> None:
        if self.failure is None:
            code = self._process.exitcode if self._process is not None else None
            self._die("the engine process exited" + (f" with code {code}" if code is not None else ""))

    def _die(self, reason: str) -> None:
        self.stopped.set()
        if self.failure is None:
            self.failure = reason
            if not self._closing:
                log.error("%s; %d in-flight request(s) fail with 503", reason, len(self._routes))
        if not self._started.done():
            self._started.set_exception(errors.EngineUnavailable(f"the engine did not start: {reason}"))
        self._fail_all(reason)

    def _fail_all(self, reason: str) -> None:
        error = _engine_error(reason)
        routes, self._routes = self._routes, {}
        for route in routes.values():
            route.sink.put_nowait(error_output(route.request, error))
        self._credit_changed.set()

    async def _stop_workers(self, *, terminate: bool = False) -> None:
        self._outbox.put(None)
        await asyncio.to_thread(self._join_all, terminate)
        if self.failure is None:
            self.failure = "the engine was closed"
        self.stopped.set()

    def _join_all(self, terminate: bool) -> None:
        self._writer.join(timeout=10)
        if self._process is not None:
            # SIGKILL, not SIGTERM: the engine process ignores SIGTERM (its stop is ours to order:
            # loop_protocol.serve_in_child), so only a kill cuts a start that hangs.
            if terminate and self._process.is_alive():
                self._process.kill()
            self._process.join(timeout=30)
            if self._process.is_alive():
                log.warning("the engine process did not exit in 30 s; killing it")
                self._process.kill()
                self._process.join(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._reader.join(timeout=10)   # it ends on "closed" or on EOF once the engine's end is closed
        self._conn.close()


def _engine_error(reason: str) -> RequestError:
    return RequestError(503, reason, code="engine_error")


def _duplicate(request: GenerationRequest) -> RequestError:
    return RequestError(400, f"request_id {request.request_id!r} is already running", code="duplicate_request_id",
                        param="request_id")


def _start_error(failure: StartFailure) -> errors.TokabatchError:
    cls = getattr(errors, failure.error_type, None) if failure.error_type else None
    if isinstance(cls, type) and issubclass(cls, errors.TokabatchError):
        return cls(failure.message, param=failure.param, code=failure.code)
    return errors.EngineUnavailable(f"the engine failed to start: {failure.message}")


__all__ = ["DEFAULT_FACTORY", "EngineClient", "LoopSpec", "Priority"]
