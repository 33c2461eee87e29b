"""What a runner does when a claim ends badly: a full disk pauses the batch (no failure counted), an
unexpected error releases it with a doubling back-off and counts it, and after RunnerConfig.max_failures
the batch ends failed with its written lines sealed; and, at start, the work folders of batches that
ended elsewhere are removed.

A mixin of BatchRunner (runner.py), which owns the state these use (db, blobs, claim, config, clock,
the disk-full counters) and `_input`/`_retry_after_s`. Works on a Batch or a Shard claim alike (the
claim functions take the row's table). Must not import torch or aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil

from tokabatch.service.jobs.job import Job, finish, write_unwritten
from tokabatch.service.jobs.outputs import ResultWriter, hold_work_folder
from tokabatch.service.storage import repo
from tokabatch.service.storage.db import is_storage_full
from tokabatch.service.storage.models import Batch, Shard
from tokabatch.service.storage.states import BatchStatus

log = logging.getLogger("tokabatch.service.jobs.runner")     # the runner's story, one logger
S = BatchStatus


class Setbacks:
    """BatchRunner's ways out of a claim that cannot go on (see the module docstring)."""

    async def _pause_for_space(self, batch: Batch | Shard, exc: Exception) -> None:
        """The disk is full: not the batch's failure. Its written lines stay (a torn last one is cut
        at the next claim); it is released and claimed again after a doubling wait, once space is freed."""
        self._num_full += 1
        wait_s = self._retry_after_s(self._num_full)
        self._disk_full = f"the disk is full; batch {batch.id} is paused ({exc})"
        log.warning("batch %s: the disk is full (%s); paused, tried again in %.0f s", batch.id, exc, wait_s,
                    extra={"batch_id": batch.id})
        try:
            await repo.release_claim(self.db, batch.id, self.worker_id, not_before=self.clock() + wait_s,
                                     table=type(batch))
        except Exception as again:          # the database is on the full disk too: the lease lapses instead
            if not is_storage_full(again):
                raise

    async def _after_failure(self, batch: Batch | Shard, exc: Exception) -> None:
        """An unexpected failure: the batch waits (doubling back-off) before its next claim, and
        after `max_failures` of them it ends failed with the error (_give_up), so it never blocks others."""
        num = batch.num_failures + 1
        last = num == self.config.max_failures         # ended at its next claim, which may come at once
        log.exception("batch %s: unexpected failure %d of %d%s", batch.id, num, self.config.max_failures,
                      "; it fails" if last else "; releasing it for a later attempt",
                      extra={"batch_id": batch.id, "num_failures": num})
        retry_at = self.clock() + (0.0 if last else self._retry_after_s(num))
        await repo.release_after_failure(self.db, batch.id, self.worker_id, error=f"{type(exc).__name__}: {exc}",
                                         not_before=retry_at, table=type(batch))

    async def _give_up(self, batch: Batch) -> None:
        """End a batch that failed `max_failures` times: lines never written go to the error file,
        the files are sealed (when that works), and the batch is failed with the last error."""
        message = (f"The batch stopped after {batch.num_failures} unexpected failures; the last: "
                   f"{batch.last_error or 'unknown'}")
        errors = [{"code": "batch_failed", "message": message, "param": None, "line": None}]
        job = None
        with contextlib.ExitStack() as stack:
            if batch.in_progress_at is not None and not batch.num_shards:   # else the lines are in its shards
                job = Job(batch, ResultWriter(self.work_root / batch.id), self.blobs.path(batch.input_file_id))
                stack.enter_context(hold_work_folder(job.writer.work_dir))
                try:
                    job.input_path = await self._input(batch)
                    job.writer.open()
                    await asyncio.to_thread(write_unwritten, job, "batch_failed", message)
                except Exception:             # the input cannot be read again: keep what is written
                    log.exception("batch %s: the unwritten lines could not be written as failed", batch.id)
                    job.writer.close()
            to = S.CANCELLED if batch.status == S.CANCELLING.value else S.FAILED
            try:
                await finish(self.claim, batch, to, job, errors=errors if to is S.FAILED else None)
            except Exception:                 # sealing failed too: end it without files (the work folder stays)
                log.exception("batch %s: its results could not be sealed; ending it without them", batch.id)
                await finish(self.claim, batch, to, None, errors=errors if to is S.FAILED else None)

    async def _remove_ended_work_folders(self) -> None:
        """Work folders of batches that ended (or are gone) since this host last ran them: a batch or
        shard taken over by a worker on another host is sealed there, so its folder here is never
        read again."""
        if not self.work_root.is_dir():
            return
        for folder in sorted(self.work_root.iterdir()):
            try:
                batch = await repo.get_batch(self.db, folder.name, owner=None)
                if batch is None or batch.is_terminal:
                    await asyncio.to_thread(shutil.rmtree, folder, True)
            except Exception:                 # never a reason not to start: the next start tries again
                log.exception("could not check the work folder %s", folder)



__all__ = ["Setbacks"]
