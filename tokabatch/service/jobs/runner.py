"""The batch runner: claim a batch (lease + heartbeat), validate, feed the engine, write, finalize.

Owns a batch's life after `POST /v1/batches`: validating -> failed | in_progress -> finalizing ->
completed, and the cancel (cancelling -> cancelled) and expiry (-> expired) paths, each status write
a compare-and-set through repo.transition_batch. Crash safety comes from the result files
(outputs.ResultWriter): a batch whose lease lapses is claimed again, its written custom_ids are
skipped, and every custom_id ends up exactly once in output ∪ error. While a batch runs, one
supervisor loop heartbeats, writes request_counts/usage every `progress_interval_s`, and polls the
row for cancel, the clock for expiry and the runner for stop. Lines are fed in prompt order (the
whole file clustered by prompt start, then sorted by token ids within a read-ahead window:
ordering.py) so that lines sharing a prompt prefix are resident together.

Talks to the engine only through engine/api (`Engine.generate` with back-pressure); must not
import torch or aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

from tokabatch.config import RunnerConfig
from tokabatch.engine.api import Engine, GenerationOutput, GenerationRequest, Priority
from tokabatch.errors import TokabatchError
from tokabatch.service.jobs.ordering import clustered_spans, prompt_ordered
from tokabatch.service.jobs.outputs import ResultWriter
from tokabatch.service.jobs.parse import iter_requests, read_request, validate_input_file
from tokabatch.service.jobs.render import PreparedRequest, error_body, first_failure, prepare_request, render_response
from tokabatch.service.jobs.seal import seal_results
from tokabatch.service.jobs.states import BatchStatus
from tokabatch.service.storage import repo
from tokabatch.service.storage.blobs import BlobStore
from tokabatch.service.storage.db import Database
from tokabatch.service.storage.models import Batch

log = logging.getLogger(__name__)
S = BatchStatus

CANCEL, EXPIRE, STOP, LOST = "cancel", "expire", "stop", "lost"
END_MESSAGES = {
    CANCEL: ("batch_cancelled", "This request was not executed because the batch was cancelled."),
    EXPIRE: ("batch_expired", "This request could not be executed before the completion window expired."),
}
ABORTED = ("engine_error", "The engine stopped this request before it finished.")
MAX_ATTEMPTS = 5                         # claims of one batch before engine failures become error lines


@dataclass(slots=True)
class _Line:
    """A line in flight: its engine requests' outputs are gathered until all have arrived."""

    custom_id: str
    prepared: PreparedRequest
    outputs: list[GenerationOutput] = field(default_factory=list)


@dataclass(slots=True)
class _Job:
    batch: Batch
    writer: ResultWriter
    input_path: Path
    in_flight: dict[str, _Line] = field(default_factory=dict)   # engine request id -> line
    num_retryable: int = 0               # lines the engine failed (5xx) and that were left for a retry


class BatchRunner:
    """Runs batches until stopped. One runner per process; several may share a database."""

    def __init__(self, config: RunnerConfig, db: Database, blobs: BlobStore, engine: Engine, tokenizer: Any,
                 served_model_names: set[str], *, clock: Callable[[], float] = time.time,
                 work_root: Path | None = None, max_batch_lines: int = 50_000, worker_id: str | None = None) -> None:
        self.config = config
        self.db = db
        self.blobs = blobs
        self.engine = engine
        self.tokenizer = tokenizer
        self.served_model_names = set(served_model_names)
        self.clock = clock
        self.work_root = Path(work_root) if work_root is not None else blobs.root.parent / "work"
        self.max_batch_lines = max_batch_lines
        self.worker_id = worker_id or f"{socket.gethostname()}:{secrets.token_hex(4)}"
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._running = False

    def _now(self) -> int:
        return int(self.clock())

    # ---- the loop ---------------------------------------------------------------------------------
    async def run_forever(self) -> None:
        """Claim and run batches until stop(); a failing batch is logged, released and retried later."""
        self._stopped.clear()
        self._running = True
        try:
            while not self._stopping.is_set():
                if not await self.run_once():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), self.config.poll_interval_s)
        finally:
            self._running = False
            self._stopped.set()

    async def stop(self) -> None:
        """Stop after releasing the current batch's claim (its written lines are kept for the next run)."""
        self._stopping.set()
        if self._running:
            await self._stopped.wait()

    async def run_once(self) -> bool:
        """Claim one batch and work on it until it is terminal or interrupted. False when there was no work."""
        batch = await repo.claim_batch(self.db, self.worker_id, self.config.lease_s, self.clock())
        if batch is None:
            return False
        log.info("batch %s claimed (%s)", batch.id, batch.status,
                 extra={"batch_id": batch.id, "status": batch.status, "worker_id": self.worker_id})
        try:
            await self._run_batch(batch)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s: unexpected failure; releasing it for a later attempt", batch.id)
            await repo.release_claim(self.db, batch.id, self.worker_id)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.config.poll_interval_s)
        return True

    async def _run_batch(self, batch: Batch) -> None:
        if batch.status == S.VALIDATING.value:
            batch = await self._validate(batch)
            if batch is None or batch.is_terminal:
                return
        if batch.status == S.CANCELLING.value and batch.in_progress_at is None:
            # Cancelled before validation finished: no line was accepted, so nothing to write.
            await self._finish(batch, S.CANCELLED, None)
            return
        job = _Job(batch, ResultWriter(self.work_root / batch.id), self.blobs.path(batch.input_file_id))
        job.writer.open()
        try:
            outcome = None
            if batch.status == S.IN_PROGRESS.value:
                outcome = await self._supervise(job, self._execute(job))
            elif batch.status == S.CANCELLING.value:
                outcome = CANCEL
            await self._conclude(job, outcome)
        except Exception:
            await self._write_progress(job)      # the live counts stay right while the batch waits for a retry
            raise
        finally:
            job.writer.close()

    # ---- validating -------------------------------------------------------------------------------
    async def _validate(self, batch: Batch) -> Batch | None:
        # A file already expired when the batch was created is gone, as for users; one that expires
        # later stays readable until the batch ends (the sweep spares inputs of unfinished batches).
        input_file = await repo.get_file(self.db, batch.input_file_id, owner=batch.owner, now_s=batch.created_at)
        problem = None
        if input_file is None or not self.blobs.exists(batch.input_file_id):
            problem = f"cannot find file {batch.input_file_id}"
        elif input_file.purpose != "batch":
            problem = f"file {batch.input_file_id} has purpose {input_file.purpose!r}, not 'batch'"
        if problem is not None:
            error = {"code": "invalid_request", "param": "file_id", "line": None,
                     "message": f"The batch input file is unusable: {problem}."}
            await self._fail(batch, [error])
            return None
        job = _Job(batch, ResultWriter(self.work_root / batch.id), self.blobs.path(batch.input_file_id))
        report_box: list[Any] = []

        async def validate() -> None:
            report_box.append(await asyncio.to_thread(
                validate_input_file, job.input_path, endpoint=batch.endpoint,
                served_model_names=self.served_model_names, max_lines=self.max_batch_lines))

        outcome = await self._supervise(job, validate())
        if outcome is not None:
            if outcome == EXPIRE:
                await self._finish(batch, S.EXPIRED, None)
            elif outcome == STOP:
                await repo.release_claim(self.db, batch.id, self.worker_id)
            return await repo.get_batch(self.db, batch.id, owner=None) if outcome == CANCEL else None
        report = report_box[0]
        if report.errors:
            await self._fail(batch, [e.to_dict() for e in report.errors])
            return None
        if not await repo.transition_batch(self.db, batch.id, S.IN_PROGRESS, self._now(),
                                           request_total=report.num_requests, model=self._model_id()):
            return await repo.get_batch(self.db, batch.id, owner=None)   # cancelled meanwhile
        log.info("batch %s validated: %d requests", batch.id, report.num_requests,
                 extra={"batch_id": batch.id, "status": S.IN_PROGRESS.value, "num_requests": report.num_requests})
        return await repo.get_batch(self.db, batch.id, owner=None)

    def _model_id(self) -> str:
        return self.engine.info.model_id

    async def _fail(self, batch: Batch, errors: list[dict]) -> None:
        log.info("batch %s failed validation: %d error(s)", batch.id, len(errors),
                 extra={"batch_id": batch.id, "status": S.FAILED.value, "num_errors": len(errors)})
        await repo.transition_batch(self.db, batch.id, S.FAILED, self._now(), errors=errors,
                                    worker_id=None, lease_expires_at=None)

    # ---- executing --------------------------------------------------------------------------------
    async def _execute(self, job: _Job) -> None:
        outputs = self.engine.generate(self._requests(job))
        try:
            async for output in outputs:
                line = job.in_flight.pop(output.request_id, None)
                if line is None:
                    continue
                line.outputs.append(output)
                if len(line.outputs) == len(line.prepared.requests):
                    self._write_line(job, line)
        finally:
            aclose = getattr(outputs, "aclose", None)   # closing the stream aborts what is still running
            if aclose is not None:
                await aclose()

    async def _requests(self, job: _Job) -> AsyncIterator[GenerationRequest]:
        """The engine's request stream: unwritten lines, in windows of `order_window` lines sorted by
        prompt (ordering.py: lines sharing a prefix run together). A line enters `in_flight` only
        when its requests are fed, so a line read ahead but not fed is simply not written."""
        spans = None
        if self.config.order_window > 1:     # the file-level order first (ordering.py), off the event loop
            spans = await asyncio.to_thread(clustered_spans, job.input_path)
        prepared = self._prepared_lines(job, spans)
        ordered = prompt_ordered(prepared, self.config.order_window,
                                 lambda line: line.prepared.requests[0].prompt_token_ids)
        # Closed explicitly (the engine may stop pulling mid-batch): the input file is shut at once.
        async with contextlib.aclosing(prepared), contextlib.aclosing(ordered):
            async for line in ordered:
                for request in line.prepared.requests:
                    job.in_flight[request.request_id] = line
                    yield request

    async def _prepared_lines(self, job: _Job, spans: list[tuple[int, int, int]] | None) -> AsyncIterator[_Line]:
        """Unwritten lines, prepared (tokenized), in file order or in the order of `spans` (line
        number, byte offset, length: ordering.clustered_spans); a body the endpoint rejects is
        written at once as its 4xx line and never reaches the engine."""
        batch, writer = job.batch, job.writer
        for line_no, custom_id, body in self._lines(job.input_path, spans):
            if custom_id in writer.done_custom_ids:
                continue
            if line_no % 64 == 0:
                await asyncio.sleep(0)      # preparing a window is CPU work: let the supervisor run
            request_id = f"req_{line_no}x{secrets.token_hex(8)}"
            try:
                prepared = prepare_request(batch.endpoint, body, tokenizer=self.tokenizer,
                                           model_info=self.engine.info, served_model_names=self.served_model_names,
                                           request_id=request_id, priority=Priority.BATCH)
            except TokabatchError as err:
                writer.write_response(custom_id, status_code=err.status, request_id=request_id, body=error_body(err))
                continue
            yield _Line(custom_id, prepared)

    @staticmethod
    def _lines(path: Path, spans: list[tuple[int, int, int]] | None) -> Iterator[tuple[int, str, dict]]:
        if spans is None:
            yield from iter_requests(path)
            return
        with path.open("rb") as f:
            for line_no, offset, length in spans:
                yield (line_no, *read_request(f, offset, length))

    def _write_line(self, job: _Job, line: _Line) -> None:
        prepared = line.prepared
        prompt = "\n".join(prepared.prompt_texts)
        request_id = prepared.requests[0].request_id.split("-")[0]
        failed = first_failure(line.outputs)
        if failed is None:
            body = render_response(prepared, line.outputs, created=self._now())
            job.writer.write_response(line.custom_id, status_code=200, request_id=request_id, body=body,
                                      prompt_text=prompt)
        elif failed.error is not None and failed.error.status >= 500 and job.batch.num_claims < MAX_ATTEMPTS:
            # The engine failed (died, shut down): leave the line unwritten so the next claim, with a
            # working engine, runs it again. After MAX_ATTEMPTS claims it is written as a 5xx line.
            job.num_retryable += 1
        elif failed.error is not None:
            job.writer.write_response(line.custom_id, status_code=failed.error.status, request_id=request_id,
                                      body=error_body(failed.error), prompt_text=prompt)
        # An aborted line is left unwritten: cancel/expiry writes it, a restart re-runs it.

    # ---- supervising ------------------------------------------------------------------------------
    async def _supervise(self, job: _Job, work: Awaitable[None]) -> str | None:
        """Run `work` while heartbeating, writing progress and watching for cancel/expiry/stop.
        Returns None when `work` finished, else why it was interrupted (CANCEL, EXPIRE, STOP, LOST)."""
        task = asyncio.ensure_future(work)
        tick_s = min(self.config.poll_interval_s, self.config.heartbeat_s, self.config.progress_interval_s)
        last_progress = last_beat = time.monotonic()
        try:
            while True:
                await asyncio.wait({task}, timeout=tick_s)
                if task.done():
                    task.result()
                    return None
                now = time.monotonic()
                if now - last_beat >= self.config.heartbeat_s:
                    last_beat = now
                    if not await repo.heartbeat(self.db, job.batch.id, self.worker_id, self.config.lease_s, self.clock()):
                        return LOST
                if now - last_progress >= self.config.progress_interval_s:
                    last_progress = now
                    await self._write_progress(job)
                reason = await self._interruption(job)
                if reason is not None:
                    return reason
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _interruption(self, job: _Job) -> str | None:
        if self._stopping.is_set():
            return STOP
        row = await repo.get_batch(self.db, job.batch.id, owner=None)
        if row is None or row.worker_id != self.worker_id:
            return LOST
        if row.status == S.CANCELLING.value:       # cancel wins over expiry (cancelling cannot expire)
            return CANCEL
        if job.batch.expires_at is not None and self.clock() >= job.batch.expires_at:
            return EXPIRE
        return None

    async def _write_progress(self, job: _Job) -> None:
        t = job.writer.totals
        await repo.update_progress(
            self.db, job.batch.id,
            repo.RequestCounts(job.batch.request_total, t.num_completed, t.num_failed),
            repo.Usage(t.input_tokens, t.cached_tokens, t.output_tokens, t.reasoning_tokens, t.total_tokens),
            worker_id=self.worker_id)

    # ---- concluding -------------------------------------------------------------------------------
    async def _conclude(self, job: _Job, outcome: str | None) -> None:
        batch = job.batch
        if outcome in (STOP, LOST):
            await self._write_progress(job)
            if outcome == STOP:
                await repo.release_claim(self.db, batch.id, self.worker_id)
            return
        if outcome is None:
            if job.num_retryable:
                log.warning("batch %s: the engine failed %d line(s); releasing the batch to retry them",
                            batch.id, job.num_retryable)
                await self._write_progress(job)
                await repo.release_claim(self.db, batch.id, self.worker_id)
                return
            # Every line has its result, except lines the engine aborted on its own: those end as errors.
            await asyncio.to_thread(self._write_unwritten, job, *ABORTED)
            if await repo.transition_batch(self.db, batch.id, S.FINALIZING, self._now()):
                return await self._finish(batch, S.COMPLETED, job)
            row = await repo.get_batch(self.db, batch.id, owner=None)
            if row.status == S.FINALIZING.value:
                return await self._finish(batch, S.COMPLETED, job)
            outcome = CANCEL if row.status == S.CANCELLING.value else None
            if outcome is None:
                return
        await asyncio.to_thread(self._write_unwritten, job, *END_MESSAGES[outcome])
        await self._finish(batch, S.CANCELLED if outcome == CANCEL else S.EXPIRED, job)

    @staticmethod
    def _write_unwritten(job: _Job, code: str, message: str) -> None:
        for _line_no, custom_id, _body in iter_requests(job.input_path):
            if custom_id not in job.writer.done_custom_ids:
                job.writer.write_error(custom_id, code=code, message=message)

    async def _finish(self, batch: Batch, to: BatchStatus, job: _Job | None) -> None:
        """Seal the files (if any lines) and make the terminal transition with counts and usage."""
        fields: dict[str, Any] = {"worker_id": None, "lease_expires_at": None}
        if job is not None:
            sealed = await seal_results(self.db, self.blobs, batch, job.writer, now_s=self._now())
            t = job.writer.totals
            fields.update(
                output_file_id=sealed.output_file_id, error_file_id=sealed.error_file_id,
                output_parquet_file_id=sealed.output_parquet_file_id, request_completed=t.num_completed,
                request_failed=t.num_failed, input_tokens=t.input_tokens, cached_tokens=t.cached_tokens,
                output_tokens=t.output_tokens, reasoning_tokens=t.reasoning_tokens, total_tokens=t.total_tokens)
        if await repo.transition_batch(self.db, batch.id, to, self._now(), **fields):
            log.info("batch %s %s", batch.id, to.value, extra={
                "batch_id": batch.id, "status": to.value, "completed": fields.get("request_completed"),
                "failed": fields.get("request_failed"), "output_tokens": fields.get("output_tokens")})
            if job is not None:
                shutil.rmtree(job.writer.work_dir, ignore_errors=True)
        else:
            log.warning("batch %s: could not move to %s (status changed meanwhile)", batch.id, to.value)


__all__ = ["BatchRunner"]
