"""One claim of a batch: its state while it runs (Job), why it stopped early (Interruption), and how it
ends (finish: seal the files and make the terminal transition, fenced by the claim).

runner.py claims batches, validates, feeds and supervises them; what a claim holds and how a
batch's files and row end live here, so the runner's loop stays readable. Must not import torch or
aiohttp.
"""

from __future__ import annotations

import enum
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tokabatch.service.jobs.feed import Feed, Span
from tokabatch.service.jobs.outputs import ResultWriter
from tokabatch.service.jobs.pace import Pace
from tokabatch.service.jobs.parse import iter_requests, read_request
from tokabatch.service.jobs.seal import seal_results
from tokabatch.service.storage import repo
from tokabatch.service.storage.blobs import BlobStore
from tokabatch.service.storage.db import Database
from tokabatch.service.storage.models import Batch, Shard
from tokabatch.service.storage.states import BatchStatus

log = logging.getLogger("tokabatch.service.jobs.runner")     # the runner's story, one logger


class Interruption(enum.Enum):
    """Why supervised work stopped before it finished."""

    CANCEL = "cancel"                    # the batch is cancelling
    EXPIRE = "expire"                    # its completion window ended
    STOP = "stop"                        # this runner is stopping
    LOST = "lost"                        # another worker holds the batch now


CANCEL, EXPIRE, STOP, LOST = Interruption
END_MESSAGES = {
    CANCEL: ("batch_cancelled", "This request was not executed because the batch was cancelled."),
    EXPIRE: ("batch_expired", "This request could not be executed before the completion window expired."),
}
ABORTED = ("engine_error", "The engine stopped this request before it finished.")
MAX_ATTEMPTS = 5                         # claims of one batch in which the engine failed lines, before those
                                         # lines are written as error lines


@dataclass(slots=True)
class Job:
    """What one claim works on: a whole batch, or one shard of it (then `spans` are the shard's lines)."""

    batch: Batch
    writer: ResultWriter
    input_path: Path
    spans: list[Span] | None = None      # the file-level feed order, when validation just built it; a shard's lines
    shard: Shard | None = None           # the claim is this shard's, not the batch's
    num_retryable: int = 0               # lines the engine failed (5xx) and that were left for a retry
    feed: Feed | None = None             # while the lines run: drained on a graceful stop
    pace: Pace = field(default_factory=Pace)                  # live throughput and ETA, sampled per progress write
    seconds: dict[str, float] = field(default_factory=dict)   # this claim's phases, logged at the end


@dataclass(frozen=True, slots=True)
class Claim:
    """Who holds the batches a runner works on, and where they go: every write of a claim is
    fenced by `worker_id` (repo.transition_batch held_by, repo.heartbeat)."""

    db: Database
    blobs: BlobStore
    worker_id: str
    lease_s: float
    clock: Callable[[], float]

    def now(self) -> int:
        return int(self.clock())


def num_lines(job: Job) -> int:
    return job.shard.num_lines if job.shard is not None else job.batch.request_total


def write_unwritten(job: Job, code: str, message: str) -> None:
    """Every line of the job (the input, or the shard's lines) without a result gets an error line
    (`code`, `message`)."""
    if len(job.writer.done_custom_ids) >= num_lines(job):
        return                            # every line has its result: no need to read the file again
    for line_no, custom_id, _body in _lines(job):
        if custom_id not in job.writer.done_custom_ids:
            job.writer.write_error(custom_id, code=code, message=message, line_no=line_no)


def _lines(job: Job):
    if job.shard is None:
        yield from iter_requests(job.input_path)
        return
    assert job.spans is not None, "a shard's job carries its lines"
    with job.input_path.open("rb") as f:
        for line_no, offset, length in job.spans:
            yield (line_no, *read_request(f, offset, length))


async def finish(claim: Claim, batch: Batch, to: BatchStatus, job: Job | None, *,
                 errors: list[dict] | None = None) -> None:
    """Seal the files (if any lines) and make the terminal transition with counts and usage, while
    the claim is still held."""
    fields: dict[str, Any] = {"worker_id": None, "lease_expires_at": None}
    if errors is not None:
        fields["errors"] = errors
    seconds: dict[str, float] = {}
    if job is not None:
        if not await repo.heartbeat(claim.db, batch.id, claim.worker_id, claim.lease_s, claim.clock()):
            log.warning("batch %s: its claim was lost before sealing; leaving it to the new holder", batch.id)
            return
        began = time.monotonic()
        sealed = await seal_results(claim.db, claim.blobs, batch, job.writer, now_s=claim.now())
        seconds = {**job.seconds, "seal_s": time.monotonic() - began}
        t = job.writer.totals
        fields.update(
            output_file_id=sealed.output_file_id, error_file_id=sealed.error_file_id,
            output_parquet_file_id=sealed.output_parquet_file_id, request_completed=t.num_completed,
            request_failed=t.num_failed, input_tokens=t.input_tokens, cached_tokens=t.cached_tokens,
            output_tokens=t.output_tokens, reasoning_tokens=t.reasoning_tokens, total_tokens=t.total_tokens)
    if await repo.transition_batch(claim.db, batch.id, to, claim.now(), held_by=claim.worker_id, **fields):
        log.info("batch %s %s", batch.id, to.value, extra={
            "batch_id": batch.id, "status": to.value, "completed": fields.get("request_completed"),
            "failed": fields.get("request_failed"), "output_tokens": fields.get("output_tokens"),
            **{name: round(value, 3) for name, value in seconds.items()}})
        if job is not None:
            shutil.rmtree(job.writer.work_dir, ignore_errors=True)
    else:
        log.warning("batch %s: could not move to %s (its status changed or its claim was lost meanwhile)",
                    batch.id, to.value)


__all__ = ["ABORTED", "CANCEL", "EXPIRE", "END_MESSAGES", "LOST", "MAX_ATTEMPTS", "STOP", "Claim", "Interruption",
           "Job", "finish", "num_lines", "write_unwritten"]
