"""One batch file through the engine: prepare -> order -> generate -> gather -> write.

Owns the fast path both doors share: the batch runner (runner.py keeps the lease, heartbeat,
progress, cancel and expiry around it) and `tokabatch run` (cli/run_job.py keeps its progress bar
and resume marker). `Feed.run` takes the file's lines in the file-level order (spans from
validation: ordering.py) and:

  - prepares them in a worker thread, a read-ahead window at a time (read back by byte offset,
    parsed, turned into engine requests by render.prepare_request), the next window while the
    engine takes this one, so neither the event loop nor the engine waits for tokenizing;
  - orders each window by prompt token ids; windows grow from ordering.FIRST_WINDOW lines to
    `order_window`, so the engine's first requests leave after a few dozen lines, not thousands;
  - merges alike lines: lines of one window that ask the same of the same prompt (equal token
    ids and sampling parameters, no seed, no prompt logprobs) become one engine request whose `n`
    is the sum of theirs, as if the file had said `n` itself; their choices are split back per
    line (each line's usage counts its own prompt, served from the cache after the first line's,
    as separate requests would have been). A file of k shuffled single-sample lines per problem
    then reaches the engine as the n=k form does;
  - generates through Engine.generate, whose back-pressure pulls requests as the engine can
    admit them;
  - gathers a line's outputs (one engine request per prompt) by request id;
  - writes each finished line to the ResultWriter (the checkpoint) at once.

A line the endpoint rejects is written as its 4xx line and never reaches the engine; lines
already in the writer (a resumed batch) are skipped. A line the engine failed (a 5xx, the engine
died or shut down) or aborted is handled by `OnEngineFailure`. Must not import torch or aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import itertools
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Callable, Iterator

from tokabatch.engine.api import Engine, GenerationOutput, GenerationRequest, Priority, SamplingParams
from tokabatch.errors import TokabatchError
from tokabatch.service.jobs.ordering import FIRST_WINDOW, sort_window, window_sizes
from tokabatch.service.jobs.outputs import ResultWriter
from tokabatch.service.jobs.parse import iter_requests, read_request
from tokabatch.service.jobs.render import (
    PreparedRequest, error_body, first_failure, prepare_request, render_response, with_request_id,
)

if TYPE_CHECKING:
    from tokabatch.text import Tokenizer

Span = tuple[int, int, int]              # (line number, byte offset, byte length): ordering.SpanCollector
MAX_MERGED_N = 128                       # choices in one merged engine request (the API's own limit on n)


class OnEngineFailure(enum.Enum):
    """What a line gets when the engine failed it (a 5xx) or aborted it."""

    LEAVE = "leave"    # left unwritten (counted in FeedResult.num_left): the runner's next claim runs it again
    WRITE = "write"    # its 5xx error line is written (the runner's last attempt); aborted lines stay unwritten
    STOP = "stop"      # EngineFailed is raised: `tokabatch run` stops, and its next run retries the line


class EngineFailed(Exception):
    """The engine could not finish a line (OnEngineFailure.STOP); what was written stays."""


@dataclass(slots=True)
class Line:
    """A line in flight: its engine requests' outputs are gathered until all have arrived."""

    custom_id: str
    line_no: int                         # the input's physical line number (1-based)
    request_id: str                      # the line's id (its engine requests: this, or this-<i> per prompt)
    prepared: PreparedRequest
    outputs: list[GenerationOutput] = field(default_factory=list)

    def choice_tokens(self) -> list[int]:
        """Each choice's completion tokens, in the response body's order (prompt, then choice index)."""
        by_id = {o.request_id: o for o in self.outputs}
        return [len(c.token_ids) for r in self.prepared.requests
                for c in sorted(by_id[r.request_id].choices, key=lambda c: c.index)]


@dataclass(slots=True)
class _Merged:
    """Alike lines run as one engine request: line i takes the next `ns[i]` choices."""

    lines: list[Line]
    ns: list[int]


@dataclass(slots=True)
class FeedResult:
    num_left: int = 0                    # lines the engine failed, left unwritten (OnEngineFailure.LEAVE)
    first_fed_s: float | None = None     # seconds from run() to the first request handed to the engine


@dataclass(slots=True)
class _Rejected:
    custom_id: str
    line_no: int
    request_id: str
    error: TokabatchError


class _Reader:
    """Reads and prepares lines in a worker thread, one window per `read` (never two at once)."""

    def __init__(self, path: Path, spans: list[Span] | None, done: frozenset[str],
                 prepare: Callable[[dict, str], PreparedRequest | TokabatchError], tag: str) -> None:
        self._lines = self._read_spans(path, spans) if spans is not None else iter_requests(path)
        self._done, self._prepare, self._tag = done, prepare, tag
        self._last: tuple[dict, PreparedRequest | TokabatchError] | None = None
        self._lock = threading.Lock()
        self._reading = self._closed = False

    @staticmethod
    def _read_spans(path: Path, spans: list[Span]) -> Iterator[tuple[int, str, dict]]:
        with path.open("rb") as f:
            for line_no, offset, length in spans:
                yield (line_no, *read_request(f, offset, length))

    def read(self, count: int) -> tuple[list[Line], list[_Rejected], bool]:
        """The next `count` unwritten lines, prepared: (lines, rejected lines, whether the file is done)."""
        with self._lock:
            if self._closed:
                return [], [], True
            self._reading = True
        lines: list[Line] = []
        rejected: list[_Rejected] = []
        exhausted = True
        try:
            for line_no, custom_id, body in self._lines:
                if custom_id in self._done:
                    continue
                request_id = f"req_{line_no}x{self._tag}"
                prepared = self._prepare_like_last(body, request_id)
                if isinstance(prepared, TokabatchError):
                    rejected.append(_Rejected(custom_id, line_no, request_id, prepared))
                else:
                    lines.append(Line(custom_id, line_no, request_id, prepared))
                if len(lines) + len(rejected) >= count:
                    exhausted = False
                    break
        finally:
            with self._lock:
                self._reading = False
                if self._closed:
                    self._lines.close()
        return lines, rejected, exhausted

    def _prepare_like_last(self, body: dict, request_id: str) -> PreparedRequest | TokabatchError:
        """Prepare `body`; a body equal to the previous line's (the file-level order puts the lines
        of one prompt side by side) reuses its preparation under the new id."""
        if self._last is not None and self._last[0] == body:
            last = self._last[1]
            return last if isinstance(last, TokabatchError) else with_request_id(last, request_id)
        prepared = self._prepare(body, request_id)
        self._last = (body, prepared)
        return prepared

    def close(self) -> None:
        """Close the file now, or when the read in progress ends."""
        with self._lock:
            self._closed = True
            if not self._reading:
                self._lines.close()


class Feed:
    """Runs the unwritten lines of one validated file through the engine into `writer`."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, *, endpoint: str, served_model_names: set[str],
                 writer: ResultWriter, order_window: int, on_engine_failure: OnEngineFailure,
                 on_written: Callable[[bool, int], None] | None = None,
                 on_fed_all: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """`on_written(ok, output tokens)` is called after each line is written (2xx: ok);
        `on_fed_all()` once no line is left to feed (the rest of the run is the engine's tail)."""
        self.engine, self.tokenizer, self.endpoint = engine, tokenizer, endpoint
        self.served_model_names = set(served_model_names)
        self.writer, self.order_window, self.on_engine_failure = writer, order_window, on_engine_failure
        self.on_written = on_written or (lambda ok, tokens: None)
        self.on_fed_all = on_fed_all or (lambda: None)
        self.clock = clock
        self.result = FeedResult()
        self._in_flight: dict[str, Line | _Merged] = {}   # engine request id -> its line(s), fed to written
        self._began = 0.0
        self._draining = False

    def drain(self) -> None:
        """Feed no more lines: `run` returns once the lines already fed have their results (a
        graceful stop; the unfed lines stay unwritten for the next claim)."""
        self._draining = True

    async def run(self, input_path: Path, spans: list[Span] | None = None) -> FeedResult:
        """Feed every unwritten line (in `spans` order, else file order) and write its result."""
        self._began = time.monotonic()
        reader = _Reader(Path(input_path), spans, frozenset(self.writer.done_custom_ids), self._prepare,
                         secrets.token_hex(4))
        requests = self._requests(reader)
        outputs = self.engine.generate(requests)
        try:
            async for output in outputs:
                unit = self._in_flight.pop(output.request_id, None)
                if unit is None:
                    continue
                for line, own in (self._split(unit, output) if isinstance(unit, _Merged) else ((unit, output),)):
                    line.outputs.append(own)
                    if len(line.outputs) == len(line.prepared.requests):
                        self._finish(line)
        finally:
            aclose = getattr(outputs, "aclose", None)   # closing the stream aborts what is still running
            if aclose is not None:
                await aclose()
            await requests.aclose()     # the engine may have stopped pulling mid-file: shut the input now
            reader.close()
        return self.result

    # ---- prepare and order ----------------------------------------------------------------

    def _prepare(self, body: dict, request_id: str) -> PreparedRequest | TokabatchError:
        """(Worker thread.) The line's engine requests, or why the endpoint rejects it."""
        try:
            return prepare_request(self.endpoint, body, tokenizer=self.tokenizer, model_info=self.engine.info,
                                   served_model_names=self.served_model_names, request_id=request_id,
                                   priority=Priority.BATCH)
        except TokabatchError as err:
            return err

    async def _requests(self, reader: _Reader) -> AsyncIterator[GenerationRequest]:
        """The engine's request stream. A line enters `_in_flight` only when its requests are fed,
        so a line read ahead but not fed is simply not written."""
        try:
            async with contextlib.aclosing(self._windows(reader)) as windows:
                async for window in windows:
                    for unit in _merge_alike(window):
                        if self._draining:
                            return
                        requests = _merged_request(unit) if isinstance(unit, _Merged) else unit.prepared.requests
                        for request in requests:
                            if self.result.first_fed_s is None:
                                self.result.first_fed_s = time.monotonic() - self._began
                            self._in_flight[request.request_id] = unit
                            yield request
        finally:
            self.on_fed_all()

    async def _windows(self, reader: _Reader) -> AsyncIterator[list[Line]]:
        """Prepared lines, window by window: the next window is prepared while this one is taken."""
        ordered = self.order_window > 1
        sizes = window_sizes(self.order_window) if ordered else itertools.repeat(FIRST_WINDOW)
        pending: asyncio.Future | None = asyncio.ensure_future(asyncio.to_thread(reader.read, next(sizes)))
        try:
            while pending is not None:
                lines, rejected, exhausted = await pending
                pending = None if exhausted else asyncio.ensure_future(asyncio.to_thread(reader.read, next(sizes)))
                for item in rejected:
                    self.writer.write_response(item.custom_id, status_code=item.error.status,
                                               request_id=item.request_id, body=error_body(item.error),
                                               line_no=item.line_no)
                    self.on_written(False, 0)
                if ordered:
                    lines = sort_window(lines, lambda line: line.prepared.requests[0].prompt_token_ids)
                yield lines
        finally:
            if pending is not None:
                pending.cancel()
            reader.close()

    # ---- gather and write -----------------------------------------------------------------

    def _split(self, merged: _Merged, output: GenerationOutput) -> Iterator[tuple[Line, GenerationOutput]]:
        """A merged request's output as each line's own: its choices (indexed from 0) and usage."""
        choices = sorted(output.choices, key=lambda c: c.index)
        page_size = self.engine.info.page_size
        served = (output.num_prompt_tokens - 1) // page_size * page_size   # what the prefix cache would serve
        start = 0
        for i, (line, n) in enumerate(zip(merged.lines, merged.ns)):
            mine = tuple(dataclasses.replace(c, index=c.index - start) for c in choices[start:start + n])
            start += n
            yield line, dataclasses.replace(
                output, request_id=line.prepared.requests[0].request_id, choices=mine,
                num_cached_tokens=output.num_cached_tokens if i == 0 else max(output.num_cached_tokens, served),
                num_completion_tokens=sum(len(c.token_ids) for c in mine))

    def _finish(self, line: Line) -> None:
        failed = first_failure(line.outputs)
        if failed is None:
            body = render_response(line.prepared, line.outputs, created=int(self.clock()))
            self._write(line, 200, body, line.choice_tokens())
            return
        error = failed.error
        engine_failed = failed.aborted or error is None or error.status >= 500
        if engine_failed and self.on_engine_failure is OnEngineFailure.STOP:
            reason = error.message if error is not None else "the request was aborted"
            raise EngineFailed(f"the engine stopped: {reason}")
        if failed.aborted or error is None:
            return            # aborted: cancel or expiry writes the line, a restart runs it again
        if error.status >= 500 and self.on_engine_failure is OnEngineFailure.LEAVE:
            self.result.num_left += 1
            return
        self._write(line, error.status, error_body(error))

    def _write(self, line: Line, status_code: int, body: dict, choice_tokens: list[int] | None = None) -> None:
        self.writer.write_response(line.custom_id, status_code=status_code, request_id=line.request_id, body=body,
                                   prompt_text="\n".join(line.prepared.prompt_texts), line_no=line.line_no,
                                   choice_tokens=choice_tokens)
        self.on_written(200 <= status_code < 300, sum(choice_tokens or ()))


def _merge_key(line: Line) -> tuple[tuple[int, ...], SamplingParams, Priority] | None:
    """What alike lines share, or None for a line that runs alone (several prompts, a seed: the same
    seed must give the same output as alone, prompt logprobs)."""
    if len(line.prepared.requests) != 1:
        return None
    request = line.prepared.requests[0]
    sampling = request.sampling
    if sampling.seed is not None or sampling.prompt_logprobs is not None or request.stream:
        return None
    return request.prompt_token_ids, sampling, request.priority


def _merge_alike(window: list[Line]) -> Iterator[Line | _Merged]:
    """The window's lines with alike ones merged (up to MAX_MERGED_N choices a merge), in the order
    of each merge's first line. Alike lines have equal prompts, which a sorted window puts side by
    side; a line between them that runs alone (a seed) does not split them."""
    groups: dict[tuple, list[_Merged]] = {}           # merge key -> its merges in the current prompt run
    order: list[Line | _Merged] = []
    run_prompt: tuple[int, ...] | None = None
    for line in window:
        key = _merge_key(line)
        if key is None:
            order.append(line)
            continue
        if key[0] != run_prompt:
            groups, run_prompt = {}, key[0]            # a new prompt: nothing before can merge with it
        merges = groups.setdefault(key, [])
        n = line.prepared.n
        if merges and sum(merges[-1].ns) + n <= MAX_MERGED_N:
            merges[-1].lines.append(line)
            merges[-1].ns.append(n)
        else:
            merges.append(_Merged([line], [n]))
            order.append(merges[-1])
    for unit in order:
        yield unit.lines[0] if isinstance(unit, _Merged) and len(unit.lines) == 1 else unit


def _merged_request(merged: _Merged) -> tuple[GenerationRequest, ...]:
    first = merged.lines[0].prepared.requests[0]
    return (dataclasses.replace(first, request_id=f"{first.request_id}-x{len(merged.lines)}", n=sum(merged.ns)),)


__all__ = ["EngineFailed", "Feed", "FeedResult", "Line", "MAX_MERGED_N", "OnEngineFailure"]
