"""Sharded batches, the runner's side: one shard's claim from start to outcome, and the claim that
ends a sharded batch (the shards nobody holds written as cancelled or expired, then the batch's
files made from its shards' and sealed).

A mixin of BatchRunner (runner.py), which it shares the claim machinery with: `_supervise`
(heartbeat, progress, cancel/expiry/stop), `_execute` (the feed), `_write_progress`. A shard is a
small batch: its lines are the positions [first, end) of the batch's feed order, its checkpoint a
work folder of its own, its writes fenced by its own lease. The batch is ended by whoever claims
it once every shard has its outcome (repo.claim_batch offers it then, or when it is cancelling or
expired): the same steps from any state, so a crash at any point is repaired by the next claim.
Must not import torch or aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from tokabatch.service.jobs.job import ABORTED, CANCEL, END_MESSAGES, EXPIRE, LOST, STOP, Job, finish, write_unwritten
from tokabatch.service.jobs.outputs import ResultWriter, hold_work_folder
from tokabatch.service.jobs.shards import FeedOrders, forget, merge, publish, shard_counts
from tokabatch.service.storage import repo
from tokabatch.service.storage import shards as shard_store
from tokabatch.service.storage.models import Batch, Shard
from tokabatch.service.storage.states import BatchStatus

if TYPE_CHECKING:
    from tokabatch.service.jobs.job import Interruption

S = BatchStatus
log = logging.getLogger("tokabatch.service.jobs.runner")     # the runner's story, one logger
FAILED_MESSAGE = "The shard holding this request stopped after repeated unexpected failures."
OUTCOMES = {None: "completed", CANCEL: "cancelled", EXPIRE: "expired"}


class ShardedRuns:
    """BatchRunner's shard claims and the end of sharded batches (see the module docstring)."""

    def __init__(self) -> None:
        self.orders = FeedOrders()

    async def _run_shard(self, shard: Shard) -> None:
        batch = await repo.get_batch(self.db, shard.batch_id, owner=None)
        if batch is None or batch.status != S.IN_PROGRESS.value:    # it ended or is ending meanwhile
            await repo.release_claim(self.db, shard.id, self.worker_id, table=Shard)
            return
        job = await self._shard_job(batch, shard)
        with hold_work_folder(job.writer.work_dir):
            job.writer.open()
            try:
                if shard.num_failures >= self.config.max_failures:
                    await self._end_shard(job, "failed", ("batch_failed", FAILED_MESSAGE))
                    return
                outcome = await self._supervise(job, self._execute(job))
                await self._conclude_shard(job, outcome)
            except Exception:
                await self._write_progress(job)
                raise
            finally:
                job.writer.close()

    async def _shard_job(self, batch: Batch, shard: Shard) -> Job:
        input_path = await self._input(batch)
        order = await self.orders.of(batch, input_path, clustered=self.config.order_window > 1)
        return Job(batch, ResultWriter(self._shard_folder(batch.id, shard.id)), input_path,
                   order[shard.first:shard.end], shard=shard)

    def _shard_folder(self, batch_id: str, shard_id: str) -> Path:
        return self.work_root / batch_id / "shards" / shard_id

    async def _conclude_shard(self, job: Job, outcome: Interruption | None) -> None:
        shard = job.shard
        assert shard is not None
        if outcome in (STOP, LOST):
            await self._write_progress(job)
            if outcome == STOP:
                await repo.release_claim(self.db, shard.id, self.worker_id, table=Shard)
            return
        if outcome is None and job.num_retryable:
            log.warning("shard %s: the engine failed %d line(s); releasing it to retry them", shard.id,
                        job.num_retryable)
            await self._write_progress(job)
            await repo.release_after_failure(
                self.db, shard.id, self.worker_id, engine=True, table=Shard,
                error=f"the engine failed {job.num_retryable} line(s)",
                not_before=self.clock() + self._retry_after_s(shard.num_engine_retries + 1))
            return
        await self._end_shard(job, OUTCOMES[outcome], ABORTED if outcome is None else END_MESSAGES[outcome])

    async def _end_shard(self, job: Job, outcome: str, unwritten: tuple[str, str]) -> None:
        """Write the shard's lines without a result as `unwritten` errors, publish its files and
        record `outcome`, while the claim is held; the batch's runner is looked for at once after
        the last shard."""
        shard = job.shard
        assert shard is not None
        await asyncio.to_thread(write_unwritten, job, *unwritten)
        if not await repo.heartbeat(self.db, shard.id, self.worker_id, self.config.lease_s, self.clock(), table=Shard):
            log.warning("shard %s: its claim was lost before it ended; leaving it to the new holder", shard.id)
            return
        await asyncio.to_thread(publish, self.blobs, job)
        last = await shard_store.finish_shard(self.db, shard, self.worker_id, outcome, shard_counts(job.writer.totals))
        t = job.writer.totals
        log.info("shard %s %s: %d completed, %d failed%s", shard.id, outcome, t.num_completed, t.num_failed,
                 "; the batch's last" if last else "", extra={"batch_id": shard.batch_id})
        if last:
            self.wake()

    async def _end_sharded(self, batch: Batch) -> None:
        """With the batch's claim: end it if every shard has its outcome, else (cancelling or
        expired) end the shards nobody holds, else let it go until its shards are done."""
        now = self.clock()
        shards = await shard_store.get_shards(self.db, batch.id)
        open_shards = [s for s in shards if s.outcome is None]
        expired = batch.expires_at is not None and now >= batch.expires_at
        ending = batch.status == S.CANCELLING.value or (expired and batch.status == S.IN_PROGRESS.value)
        if open_shards and not ending:
            await repo.release_claim(self.db, batch.id, self.worker_id)
            return
        if any(s.lease_expires_at is not None and s.lease_expires_at >= now for s in open_shards):
            # Their holders see the cancel or the expiry within a poll and end them: look again shortly.
            await repo.release_claim(self.db, batch.id, self.worker_id, not_before=now + 1.0)
            return
        for shard in open_shards:
            claimed = await shard_store.claim_shard(self.db, self.worker_id, self.config.lease_s, now, shard=shard.id)
            if claimed is None:
                await repo.release_claim(self.db, batch.id, self.worker_id, not_before=now + 1.0)
                return
            job = await self._shard_job(batch, claimed)
            outcome = CANCEL if batch.status == S.CANCELLING.value else EXPIRE
            with hold_work_folder(job.writer.work_dir):
                job.writer.open()
                try:
                    await self._end_shard(job, OUTCOMES[outcome], END_MESSAGES[outcome])
                finally:
                    job.writer.close()
        await self._seal_sharded(batch, await shard_store.get_shards(self.db, batch.id))

    async def _seal_sharded(self, batch: Batch, shards: list[Shard]) -> None:
        """The batch's files from its shards' (in shard order), sealed with the terminal transition."""
        errors = None
        if batch.status == S.CANCELLING.value:
            to = S.CANCELLED
        elif any(s.outcome == "failed" for s in shards):
            to = S.FAILED
            last = next(s.last_error for s in shards if s.outcome == "failed")
            errors = [{"code": "batch_failed", "param": None, "line": None,
                       "message": f"A shard of the batch stopped after repeated unexpected failures; the last: "
                                  f"{last or 'unknown'}"}]
        elif any(s.outcome == "expired" for s in shards):
            to = S.EXPIRED
        else:
            to = S.COMPLETED
            if batch.status == S.IN_PROGRESS.value and not await repo.transition_batch(
                    self.db, batch.id, S.FINALIZING, self.claim.now(), held_by=self.worker_id):
                return                            # cancelled meanwhile: the next claim ends it so
        job = Job(batch, ResultWriter(self.work_root / batch.id), await self._input(batch))
        with hold_work_folder(job.writer.work_dir):
            await asyncio.to_thread(merge, self.blobs, shards, job.writer)
            await finish(self.claim, batch, to, job, errors=errors)
        ended = await repo.get_batch(self.db, batch.id, owner=None)
        if ended is not None and ended.is_terminal:
            await asyncio.to_thread(forget, self.blobs, shards)
            await shard_store.delete_shards(self.db, batch.id)


__all__ = ["ShardedRuns"]
