"""The batch runner: claim a batch (lease + heartbeat), validate, feed the engine, write, finalize.

Owns a batch's life after `POST /v1/batches`: validating -> failed | in_progress -> finalizing ->
completed, and the cancel (cancelling -> cancelled) and expiry (-> expired) paths, each status write
a compare-and-set through repo.transition_batch. Crash safety comes from the result files
(outputs.ResultWriter): a batch whose lease lapses is claimed again, its written custom_ids are
skipped, and every custom_id ends up exactly once in output ∪ error. Every write of a claim is
fenced: transitions, progress and sealing require this runner to still hold the claim (worker_id),
and the work folder is written by one process at a time (outputs.hold_work_folder), so a runner
paused past its lease never writes beside the one that claimed the batch since. While a batch runs, one
supervisor loop heartbeats, writes request_counts/usage every `progress_interval_s`, and polls the
row for cancel, the clock for expiry and the runner for stop. The lines themselves go through
feed.py (prepare, order, generate, gather, write), in the file-level prompt order that validation's
pass over the file also builds (ordering.py), so that lines sharing a prompt prefix are resident
together. What one claim holds and how a batch ends (sealing, the terminal transition) is job.py;
a batch cut into shards is run shard by shard by sharded.py (the same claim machinery, per shard);
a claim that ends badly (a full disk, an error, too many errors) is setbacks.py's. Two lanes claim
work (run_forever), so the next shard is fed while the last one's final sequences run.
`wake()` (called when a batch is created) makes an idle runner look for work at once.

Talks to the engine only through engine/api (`Engine.generate` with back-pressure); must not
import torch or aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import secrets
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from tokabatch.config import RunnerConfig
from tokabatch.engine.api import Engine
from tokabatch.errors import EngineUnavailable
from tokabatch.service.jobs.feed import Feed, OnEngineFailure, Span
from tokabatch.service.jobs.job import (
    ABORTED, CANCEL, END_MESSAGES, EXPIRE, LOST, MAX_ATTEMPTS, STOP, Claim, Interruption, Job, finish, num_lines,
    write_unwritten,
)
from tokabatch.service.jobs.ordering import SpanCollector, clustered_spans, cut_ranges
from tokabatch.service.jobs.setbacks import Setbacks
from tokabatch.service.jobs.sharded import ShardedRuns
from tokabatch.service.jobs.shards import shard_counts
from tokabatch.service.jobs.outputs import ResultWriter, WorkFolderBusy, hold_work_folder
from tokabatch.service.jobs.outputs import preload as preload_outputs
from tokabatch.service.jobs.parse import validate_input_file
from tokabatch.service.storage.states import BatchStatus
from tokabatch.service.storage import repo
from tokabatch.service.storage import shards as shard_store
from tokabatch.service.storage.blobs import BlobStore
from tokabatch.service.storage.db import Database, is_storage_full
from tokabatch.service.storage.models import Batch, Shard

if TYPE_CHECKING:
    from tokabatch.text import Tokenizer

log = logging.getLogger(__name__)
S = BatchStatus
# What the claim running in this task calls once its feed has no line left (run_forever's lanes).
_CLAIM_FED: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("claim_fed", default=None)

class BatchRunner(ShardedRuns, Setbacks):
    """Runs batches (and shards of batches) until stopped. One runner per process; several may share a database."""

    def __init__(self, config: RunnerConfig, db: Database, blobs: BlobStore, engine: Engine, tokenizer: Tokenizer,
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
        self.claim = Claim(db, blobs, self.worker_id, config.lease_s, clock)
        super().__init__()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._woken = asyncio.Event()
        self._feeding: set[object] = set()   # claims (of either lane) with lines still to feed
        self._num_claims = 0                 # claims in progress (of either lane)
        self._running = False
        self._problem: str | None = None     # why the last turn of the loop failed (health), None when fine
        self._disk_full: str | None = None   # why the last batch paused for space, until one runs without
        self._num_full = 0                   # batches paused for space in a row (the back-off doubles)

    # ---- the loop ---------------------------------------------------------------------------------
    async def run_forever(self) -> None:
        """Claim and run batches until stop(); a failing batch is logged, released and retried later.

        Two lanes claim work. The first claims whatever is due; the second only shards, and only while
        the first's claim has fed every line and waits on the engine's last sequences: so the engine
        gets the next shard's lines during that tail instead of running out of work at every shard's
        end. Neither claims while a claim still has lines to feed (at most one claim feeding at a time)."""
        self._stopped.clear()
        self._running = True
        try:
            await asyncio.to_thread(preload_outputs)
            await self._remove_ended_work_folders()
            await asyncio.gather(self._lane(second=False), self._lane(second=True))
        finally:
            self._running = False
            self._stopped.set()

    async def _lane(self, *, second: bool) -> None:
        num_failed_turns = 0
        while not self._stopping.is_set():
            self._woken.clear()
            if self._feeding or (second and not self._num_claims):
                await self._idle(self.config.poll_interval_s)
                continue
            token = object()                   # this claim feeds until its feed says all lines are in
            self._feeding.add(token)
            self._num_claims += 1
            try:
                _CLAIM_FED.set(functools.partial(self._fed, token))     # this lane's task's own context
                worked = await self.run_once(shards_only=second)
            except Exception as exc:    # the database failed, ...: stay alive, say why, try again later
                num_failed_turns += 1
                self._problem = f"the batch runner failed: {type(exc).__name__}: {exc}"
                if is_storage_full(exc):
                    log.warning("the batch runner cannot write: the disk is full (%s); trying again", exc)
                else:
                    log.exception("the batch runner failed; trying again")
                await self._idle(self._retry_after_s(num_failed_turns))
                continue
            finally:
                self._feeding.discard(token)   # (no wake-up: the other lane polls; waking itself here would spin)
                self._num_claims -= 1
            num_failed_turns, self._problem = 0, self._disk_full
            if not worked:
                await self._idle(self.config.poll_interval_s)

    def _fed(self, token: object) -> None:
        """A claim's feed has no line left to feed: the other lane may claim now (it is woken)."""
        if token in self._feeding:
            self._feeding.discard(token)
            self._woken.set()

    def health(self) -> str | None:
        """None while the runner works; else why it does not (its loop keeps trying)."""
        return self._problem

    def _retry_after_s(self, num_failures: int) -> float:
        return min(self.config.max_retry_after_s, self.config.retry_after_s * 2 ** max(0, num_failures - 1))

    def wake(self) -> None:
        """Look for work now (a batch was created), not at the next poll."""
        self._woken.set()

    async def _idle(self, seconds: float) -> None:
        """Wait up to `seconds`, less when woken or stopped."""
        waits = [asyncio.ensure_future(self._stopping.wait()), asyncio.ensure_future(self._woken.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()

    def begin_stop(self) -> None:
        """Claim nothing more; a running batch's lines in flight drain (RunnerConfig.shutdown_grace_s)."""
        self._stopping.set()

    async def stop(self) -> None:
        """Stop after releasing the current batch's claim (its written lines are kept for the next run)."""
        self.begin_stop()
        if self._running:
            await self._stopped.wait()

    async def run_once(self, *, shards_only: bool = False) -> bool:
        """Claim one shard of a running batch, else (unless `shards_only`) one batch, and work on it
        until it is done or interrupted. False when there was no work, or no engine to do it with
        (nothing is claimed while the engine is down)."""
        if self.engine.health() is not None:
            return False
        unit: Batch | Shard | None = await shard_store.claim_shard(self.db, self.worker_id, self.config.lease_s,
                                                                   self.clock())
        if unit is None and shards_only:
            return False
        if unit is None:
            unit = await repo.claim_batch(self.db, self.worker_id, self.config.lease_s, self.clock())
            if unit is None:
                return False
        table = type(unit)
        batch_id = unit.batch_id if isinstance(unit, Shard) else unit.id
        log.info("%s %s claimed (%s)", "shard" if isinstance(unit, Shard) else "batch", unit.id,
                 f"of batch {batch_id}" if isinstance(unit, Shard) else unit.status,
                 extra={"batch_id": batch_id, "worker_id": self.worker_id})
        try:
            if isinstance(unit, Shard):
                await self._run_shard(unit)
            elif unit.num_failures >= self.config.max_failures:
                await self._give_up(unit)
            else:
                await self._run_batch(unit)
            self._disk_full, self._num_full = None, 0
        except asyncio.CancelledError:
            raise
        except WorkFolderBusy as exc:         # a runner whose lease lapsed still writes it: not a failure
            log.warning("%s: %s; leaving it until that runner stops", unit.id, exc)
            await repo.release_claim(self.db, unit.id, self.worker_id, not_before=self.clock() + self.config.lease_s,
                                     table=table)
        except EngineUnavailable as exc:      # the engine died under it: not the batch's failure
            log.warning("%s: %s; releasing it until the engine runs again", unit.id, exc)
            await repo.release_after_failure(self.db, unit.id, self.worker_id, engine=True, error=str(exc),
                                             not_before=self.clock() + self.config.retry_after_s, table=table)
        except Exception as exc:
            if is_storage_full(exc):
                await self._pause_for_space(unit, exc)
            else:
                await self._after_failure(unit, exc)
        return True

    async def _run_batch(self, batch: Batch) -> None:
        spans = None
        if batch.status == S.VALIDATING.value:
            batch, spans = await self._validate(batch)
            if batch is None or batch.is_terminal:
                return
        if batch.status == S.CANCELLING.value and batch.in_progress_at is None:
            # Cancelled before validation finished: no line was accepted, so nothing to write.
            await finish(self.claim, batch, S.CANCELLED, None)
            return
        if batch.num_shards:
            await self._end_sharded(batch)
            return
        job = Job(batch, ResultWriter(self.work_root / batch.id), await self._input(batch), spans)
        with hold_work_folder(job.writer.work_dir):
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
    async def _validate(self, batch: Batch) -> tuple[Batch | None, list[Span] | None]:
        """Validate the input file; returns the batch as it is now (None when this claim is done
        with it) and, when lines are to be fed in prompt order, the order built in the same pass."""
        # A file already expired when the batch was created is gone, as for users; one that expires
        # later stays readable until the batch ends (the sweep spares inputs of unfinished batches).
        input_file = await repo.get_file(self.db, batch.input_file_id, owner=batch.owner, now_s=batch.created_at)
        problem = input_path = None
        if input_file is not None:
            with contextlib.suppress(FileNotFoundError):
                input_path = await self._input(batch)
        if input_path is None:
            problem = f"cannot find file {batch.input_file_id}"
        elif input_file.purpose != "batch":
            problem = f"file {batch.input_file_id} has purpose {input_file.purpose!r}, not 'batch'"
        if problem is not None:
            error = {"code": "invalid_request", "param": "file_id", "line": None,
                     "message": f"The batch input file is unusable: {problem}."}
            await self._fail(batch, [error])
            return None, None
        job = Job(batch, ResultWriter(self.work_root / batch.id), input_path)
        collector = SpanCollector() if self.config.order_window > 1 else None
        report_box: list[Any] = []
        began = time.monotonic()

        async def validate() -> None:
            report_box.append(await asyncio.to_thread(
                validate_input_file, job.input_path, endpoint=batch.endpoint,
                served_model_names=self.served_model_names, max_lines=self.max_batch_lines,
                on_request=collector.add if collector is not None else None))

        outcome = await self._supervise(job, validate())
        if outcome is not None:
            if outcome == EXPIRE:
                await finish(self.claim, batch, S.EXPIRED, None)
            elif outcome == STOP:
                await repo.release_claim(self.db, batch.id, self.worker_id)
            return (await repo.get_batch(self.db, batch.id, owner=None) if outcome == CANCEL else None), None
        report = report_box[0]
        if report.errors:
            await self._fail(batch, [e.to_dict() for e in report.errors])
            return None, None
        spans = await asyncio.to_thread(collector.spans) if collector is not None else None
        ranges = self._shard_ranges(report.num_requests, collector)
        if ranges:
            await shard_store.replace_shards(self.db, batch.id, ranges)
        if not await repo.transition_batch(self.db, batch.id, S.IN_PROGRESS, self.claim.now(), held_by=self.worker_id,
                                           request_total=report.num_requests, model=self._model_id(),
                                           num_shards=len(ranges)):
            return await repo.get_batch(self.db, batch.id, owner=None), None   # cancelled meanwhile
        log.info("batch %s validated: %d requests", batch.id, report.num_requests,
                 extra={"batch_id": batch.id, "status": S.IN_PROGRESS.value, "num_requests": report.num_requests,
                        "validation_s": round(time.monotonic() - began, 3)})
        return await repo.get_batch(self.db, batch.id, owner=None), spans

    async def _input(self, batch: Batch) -> Path:
        """The batch's input file on this host (fetched from the blob store's bucket if need be)."""
        return await asyncio.to_thread(self.blobs.local, batch.input_file_id)

    def _shard_ranges(self, num_requests: int, collector: SpanCollector | None) -> list[tuple[int, int]]:
        """Where a batch of `num_requests` lines is cut into shards (none when it fits in one)."""
        size = self.config.shard_lines
        if not size or num_requests <= size:
            return []
        if collector is not None:
            return collector.shard_ranges(size)
        return cut_ranges(num_requests, size, lambda i: True, lambda i: True)

    def _model_id(self) -> str:
        return self.engine.info.model_id

    async def _fail(self, batch: Batch, errors: list[dict]) -> None:
        log.info("batch %s failed validation: %d error(s)", batch.id, len(errors),
                 extra={"batch_id": batch.id, "status": S.FAILED.value, "num_errors": len(errors)})
        await repo.transition_batch(self.db, batch.id, S.FAILED, self.claim.now(), held_by=self.worker_id,
                                    errors=errors, worker_id=None, lease_expires_at=None)

    # ---- executing --------------------------------------------------------------------------------
    async def _execute(self, job: Job) -> None:
        spans = job.spans
        if spans is None and self.config.order_window > 1:   # resumed: the order is built again
            spans = await asyncio.to_thread(clustered_spans, job.input_path)
        # The engine failed a line (it died, shut down): leave the line unwritten so the next claim,
        # with a working engine, runs it again; after MAX_ATTEMPTS claims it is written as a 5xx line.
        job.pace.sample(job.writer.totals.output_tokens)       # the pace counts from here
        last_try = (job.shard or job.batch).num_engine_retries + 1 >= MAX_ATTEMPTS
        policy = OnEngineFailure.WRITE if last_try else OnEngineFailure.LEAVE
        feed = job.feed = Feed(self.engine, self.tokenizer, endpoint=job.batch.endpoint,
                               served_model_names=self.served_model_names, writer=job.writer,
                               order_window=self.config.order_window, on_engine_failure=policy,
                               on_fed_all=_CLAIM_FED.get(), clock=self.clock)
        began = time.monotonic()
        try:
            await feed.run(job.input_path, spans)
        finally:
            job.num_retryable = feed.result.num_left
            job.seconds.update(first_fed_s=feed.result.first_fed_s or 0.0, feed_s=time.monotonic() - began)

    # ---- supervising ------------------------------------------------------------------------------
    async def _supervise(self, job: Job, work: Awaitable[None]) -> Interruption | None:
        """Run `work` while heartbeating, writing progress and watching for cancel/expiry/stop.
        Returns None when `work` finished, else why it was interrupted (CANCEL, EXPIRE, STOP, LOST).
        On stop, running lines (job.feed) first drain for up to `shutdown_grace_s`: no new line is
        fed, those in flight finish and are written."""
        task = asyncio.ensure_future(work)
        tick_s = min(self.config.poll_interval_s, self.config.heartbeat_s, self.config.progress_interval_s)
        last_progress = last_beat = time.monotonic()
        drain_until: float | None = None
        try:
            while True:
                await asyncio.wait({task}, timeout=tick_s)
                if task.done():
                    task.result()
                    return None if drain_until is None else STOP
                now = time.monotonic()
                if now - last_beat >= self.config.heartbeat_s:
                    last_beat = now
                    unit = job.shard or job.batch
                    alive = await repo.heartbeat(self.db, unit.id, self.worker_id, self.config.lease_s,
                                                 self.clock(), table=type(unit))
                    if not alive:
                        return LOST
                if now - last_progress >= self.config.progress_interval_s:
                    last_progress = now
                    await self._write_progress(job)
                reason = await self._interruption(job)
                if reason == STOP and job.feed is not None and self.config.shutdown_grace_s > 0:
                    if drain_until is None:
                        drain_until = now + self.config.shutdown_grace_s
                        job.feed.drain()
                        log.info("batch %s: stopping; lines in flight may finish for %.0f s", job.batch.id,
                                 self.config.shutdown_grace_s, extra={"batch_id": job.batch.id})
                    if now < drain_until:
                        continue
                if reason is not None:
                    return reason
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _interruption(self, job: Job) -> Interruption | None:
        """Why the claim's work should stop now, if it should. A cancel wins over a stop (a
        cancelled batch is ended, not drained and released) and over expiry (cancelling cannot expire)."""
        try:
            row = await repo.get_batch(self.db, job.batch.id, owner=None)
            holder = row.worker_id if row is not None and job.shard is None else None
            if job.shard is not None:
                shard = await shard_store.get_shard(self.db, job.shard.id)
                holder = shard.worker_id if shard is not None else None
        except Exception:
            if self._stopping.is_set():            # the database is away: stopping needs no row
                return STOP
            raise
        if row is None or holder != self.worker_id:
            return LOST
        if row.status == S.CANCELLING.value:
            return CANCEL
        if self._stopping.is_set():
            return STOP
        if job.batch.expires_at is not None and self.clock() >= job.batch.expires_at:
            return EXPIRE
        return None

    async def _write_progress(self, job: Job) -> None:
        t = job.writer.totals
        job.pace.sample(t.output_tokens)
        lines_left = num_lines(job) - t.num_completed - t.num_failed
        if job.shard is not None:
            await shard_store.update_shard_progress(
                self.db, job.shard, self.worker_id, shard_counts(t), throughput=job.pace.throughput(),
                eta_seconds=job.pace.eta_seconds(lines_left=lines_left, lines_completed=t.num_completed,
                                                 output_tokens=t.output_tokens))
            return
        await repo.update_progress(
            self.db, job.batch.id,
            repo.RequestCounts(job.batch.request_total, t.num_completed, t.num_failed),
            repo.Usage(t.input_tokens, t.cached_tokens, t.output_tokens, t.reasoning_tokens, t.total_tokens),
            worker_id=self.worker_id, throughput=job.pace.throughput(),
            eta_seconds=job.pace.eta_seconds(lines_left=lines_left, lines_completed=t.num_completed,
                                             output_tokens=t.output_tokens))

    # ---- concluding -------------------------------------------------------------------------------
    async def _conclude(self, job: Job, outcome: Interruption | None) -> None:
        batch = job.batch
        if outcome in (STOP, LOST):
            await self._write_progress(job)
            if outcome == STOP and await repo.release_claim(self.db, batch.id, self.worker_id):
                t = job.writer.totals
                log.info("batch %s released at stop: %d of %d lines written", batch.id,
                         t.num_completed + t.num_failed, batch.request_total, extra={"batch_id": batch.id})
            return
        if outcome is None:
            if job.num_retryable:
                log.warning("batch %s: the engine failed %d line(s); releasing the batch to retry them",
                            batch.id, job.num_retryable)
                await self._write_progress(job)
                await repo.release_after_failure(
                    self.db, batch.id, self.worker_id, engine=True, error=f"the engine failed {job.num_retryable} "
                    "line(s)", not_before=self.clock() + self._retry_after_s(batch.num_engine_retries + 1))
                return
            # Every line has its result, except lines the engine aborted on its own: those end as errors.
            await asyncio.to_thread(write_unwritten, job, *ABORTED)
            if await repo.transition_batch(self.db, batch.id, S.FINALIZING, self.claim.now(), held_by=self.worker_id):
                return await finish(self.claim, batch, S.COMPLETED, job)
            row = await repo.get_batch(self.db, batch.id, owner=None)
            if row.status == S.FINALIZING.value:
                return await finish(self.claim, batch, S.COMPLETED, job)
            outcome = CANCEL if row.status == S.CANCELLING.value else None
            if outcome is None:
                return
        await asyncio.to_thread(write_unwritten, job, *END_MESSAGES[outcome])
        await finish(self.claim, batch, S.CANCELLED if outcome == CANCEL else S.EXPIRED, job)


__all__ = ["BatchRunner"]
