"""The synchronous step loop that runs inside the engine process, and the serve function that drives it.

Owns the `StepLoop` protocol (what EngineLoop and the test FakeLoop implement), `LoopSpec` (the
picklable recipe the engine process builds its loop from), the pipe messages between the engine
process and `EngineClient`, and `serve()`, the engine process's main loop. Also the one mapping
from a rejected request to its error output, so the real loop and the fakes agree on it.

Imports the stdlib, engine/api and errors only: the parent process imports this module and must not
load torch. The loop's own module (engine/runtime/loop.py) is imported by name inside the child.
"""

from __future__ import annotations

import importlib
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable, Protocol, runtime_checkable

from tokabatch.engine.api import (
    EngineStats,
    RequestRejected,
    GenerationOutput,
    GenerationRequest,
    GenerationUpdate,
    ModelInfo,
    RequestError,
)
from tokabatch.errors import TokabatchError

# Messages, parent -> engine: ("add", add_no, GenerationRequest) | ("abort", request_id) | ("close",)
#                   | ("many", [message, ...]) (those, in order: what the client queued during a send)
# Engine -> parent: ("ready", ModelInfo, Report) | ("failed", StartFailure) | ("report", Report)
#                   | ("fatal", message) | ("closed",)


@runtime_checkable
class StepLoop(Protocol):
    """One engine: requests in, finished outputs (and streaming deltas) out, one step at a time.

    Contract: for a bad request `add` queues that request's error output or raises
    `RequestRejected` (or `ValueError(param, message)`), which serve() turns into one, and nothing
    else; `abort` queues an aborted output for
    an unfinished request; `has_work()` stays True while any output is waiting to be returned, so
    `step()` also delivers outputs when no forward pass is needed.
    """

    info: ModelInfo

    def add(self, request: GenerationRequest) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def step(self) -> list[GenerationUpdate | GenerationOutput]: ...

    def has_work(self) -> bool: ...

    def num_wanted(self) -> int:
        """How many more requests the engine could admit soon (back-pressure credits)."""
        ...

    def stats(self) -> EngineStats: ...


def error_output(request: GenerationRequest, error: RequestError) -> GenerationOutput:
    """The output of a request that never ran (or whose engine died)."""
    return GenerationOutput(
        request_id=request.request_id, choices=(), num_prompt_tokens=len(request.prompt_token_ids),
        num_cached_tokens=0, num_completion_tokens=0, error=error,
    )


def rejection_error(exc: BaseException) -> RequestError:
    """Map an exception raised while admitting one request to that request's error.

    `RequestRejected` carries its typed error (a prompt too long for the context or the KV cache,
    a duplicate id); `ValueError(param, message)` is the engine's convention for a bad value
    (SamplingParams.validate, Scheduler.add_request): `invalid_value`.
    """
    if isinstance(exc, RequestRejected):
        return exc.error
    if isinstance(exc, TokabatchError):
        return RequestError(exc.status, exc.message, code=exc.code, param=exc.param)
    if isinstance(exc, ValueError):
        if len(exc.args) == 2 and all(isinstance(a, str) for a in exc.args):
            param, message = exc.args
        else:
            param, message = None, str(exc)
        return RequestError(400, message, code="invalid_value", param=param)
    return RequestError(500, f"the engine failed this request: {type(exc).__name__}: {exc}", code="engine_error")


@dataclass(frozen=True, slots=True)
class LoopSpec:
    """How to build a StepLoop: `factory` is "package.module:function" (picklable, for the engine
    process) or, in-process only, any callable; it is called with `kwargs`."""

    factory: str | Callable[..., StepLoop]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> StepLoop:
        factory = self.factory
        if isinstance(factory, str):
            module_name, _, attr = factory.partition(":")
            if not attr:
                raise ValueError(f"LoopSpec.factory must look like 'package.module:function', not {factory!r}")
            factory = getattr(importlib.import_module(module_name), attr)
        return factory(**self.kwargs)


@dataclass(frozen=True, slots=True)
class Report:
    """Engine -> client after each step (or batch of messages): outputs plus back-pressure state."""

    items: tuple[GenerationUpdate | GenerationOutput, ...]
    num_wanted: int
    num_adds_seen: int                   # add messages processed so far: the client's in-flight count
    stats: EngineStats


@dataclass(frozen=True, slots=True)
class StartFailure:
    """Why the loop could not be built; the client re-raises it as `error_type` from tokabatch.errors."""

    error_type: str                      # a class name in tokabatch.errors, or "" for another exception
    message: str
    param: str | None = None
    code: str | None = None


def _start_failure(exc: BaseException) -> StartFailure:
    if isinstance(exc, TokabatchError):
        return StartFailure(type(exc).__name__, exc.message, exc.param, exc.code)
    return StartFailure("", f"{type(exc).__name__}: {exc}")


def serve(conn: Connection, spec: LoopSpec) -> None:
    """The engine's main loop: build the loop, then alternate between messages and steps until closed.

    Blocks on the pipe while idle; while there is work, drains messages without waiting between
    steps. A step that raises is fatal (the loop's state is unknown): the client is told and every
    in-flight request fails with 503. Request-level errors never leave `add`. Each report's stats
    carry the wall seconds spent blocked on an empty pipe (idle) and the rest since ready (busy):
    an engine the service starves shows it there.
    """
    try:
        loop = spec.build()
    except BaseException as exc:  # noqa: BLE001 - every start-up failure goes back to the client
        _send_quietly(conn, ("failed", _start_failure(exc)))
        conn.close()
        return
    inbox = _Inbox(loop)
    clock = _BusyClock()
    try:
        conn.send(("ready", loop.info, Report((), loop.num_wanted(), 0, clock.stamp(loop.stats()))))
        while True:
            timeout = 0.0 if (loop.has_work() or inbox.pending) else None
            if timeout is None:
                clock.wait(conn)
            while conn.poll(timeout):
                if not inbox.take(conn.recv()):
                    conn.send(("closed",))
                    return
                timeout = 0.0
            if loop.has_work():
                inbox.pending.extend(loop.step())
            report = Report(tuple(inbox.pending), loop.num_wanted(), inbox.num_adds_seen, clock.stamp(loop.stats()))
            conn.send(("report", report))
            inbox.pending = []
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the client is gone: nothing to report to
    except BaseException:  # noqa: BLE001 - a broken step is fatal; the client turns it into 503s
        _send_quietly(conn, ("fatal", traceback.format_exc(limit=20)))
    finally:
        conn.close()


class _Inbox:
    """The client's messages, applied to the loop; what they produce waits in `pending` for the report."""

    def __init__(self, loop: StepLoop) -> None:
        self.loop = loop
        self.num_adds_seen = 0
        self.pending: list[GenerationUpdate | GenerationOutput] = []

    def take(self, message: tuple) -> bool:
        """Apply one message (or a "many" of them); False when it says close."""
        for one in (message[1] if message[0] == "many" else (message,)):
            kind = one[0]
            if kind == "close":
                return False
            if kind == "add":
                self.num_adds_seen = one[1]
                request: GenerationRequest = one[2]
                try:
                    self.loop.add(request)
                except Exception as exc:  # noqa: BLE001 - one bad request must not stop the engine
                    self.pending.append(error_output(request, rejection_error(exc)))
            elif kind == "abort":
                self.loop.abort(one[1])
        return True


class _BusyClock:
    """Wall seconds of the engine process since ready: blocked on an empty pipe (idle), and the rest."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.idle_s = 0.0

    def wait(self, conn: Connection) -> None:
        """Block until a message arrives, counting the time as idle."""
        began = time.monotonic()
        conn.poll(None)
        self.idle_s += time.monotonic() - began

    def stamp(self, stats: EngineStats) -> EngineStats:
        stats.idle_seconds = self.idle_s
        stats.busy_seconds = time.monotonic() - self.started - self.idle_s
        return stats


def _send_quietly(conn: Connection, message: tuple) -> None:
    try:
        conn.send(message)
    except (OSError, EOFError, ValueError):
        pass  # the client is already gone; it learns of the failure from the closed pipe


def serve_in_child(conn: Connection, spec: LoopSpec) -> None:
    """Entry point of the engine process. Ctrl-C and SIGTERM (a terminal's, or a service manager's
    to the whole process group) go to the parent, which drains its work and then closes us; if the
    parent dies instead, the closed pipe ends us."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(conn, spec)


__all__ = [
    "LoopSpec", "Report", "StartFailure", "StepLoop", "error_output", "rejection_error",
    "serve", "serve_in_child",
]
