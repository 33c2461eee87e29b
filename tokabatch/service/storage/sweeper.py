"""The periodic sweep: expired files (rows, then blobs), idempotency keys older than 24 h, and
webhook events delivered or abandoned over a week ago (storage/outbox.py).

Owns *when* things are removed; repo.py owns which rows qualify (an expired file that is the
input of a non-terminal batch is kept until the batch ends: the runner still reads it). Rows go
first, blobs second: a crash in between leaves an orphan blob (wasted disk), never a listed file
without bytes. Users never see an expired file even before it is swept (repo hides it by
`expires_at`), so the interval only bounds how long the disk space stays in use.
Must not import torch or aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable

from tokabatch.service.storage import outbox, repo
from tokabatch.service.storage.blobs import BlobStore
from tokabatch.service.storage.db import Database

log = logging.getLogger(__name__)
SWEEP_INTERVAL_S = 300.0
SWEEP_CHUNK = 1000          # rows per delete statement (bounded transactions on a big backlog)


@dataclass(frozen=True, slots=True)
class SweepResult:
    files: int
    idempotency_keys: int


def _delete_all(blobs: BlobStore, file_ids: list[str]) -> None:
    for file_id in file_ids:
        blobs.delete(file_id)


async def sweep_once(db: Database, blobs: BlobStore, now_s: int) -> SweepResult:
    """Remove every file expired at `now_s` (except inputs of unfinished batches) and stale keys."""
    num_files = 0
    while True:
        ids = await repo.sweep_expired_files(db, now_s, limit=SWEEP_CHUNK)
        await asyncio.to_thread(_delete_all, blobs, ids)
        num_files += len(ids)
        if len(ids) < SWEEP_CHUNK:
            break
    num_keys = await repo.sweep_idempotency_keys(db, now_s)
    num_events = await outbox.sweep_events(db, now_s)
    if num_files or num_keys or num_events:
        log.info("swept %d expired files, %d idempotency keys and %d old webhook events", num_files, num_keys,
                 num_events)
    return SweepResult(num_files, num_keys)


async def sweep_forever(db: Database, blobs: BlobStore, clock: Callable[[], float],
                        interval_s: float = SWEEP_INTERVAL_S) -> None:
    """Sweep every `interval_s` seconds until cancelled. A failed round is logged and retried at
    the next one: a database hiccup must not take the server down."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await sweep_once(db, blobs, int(clock()))
        except Exception:
            log.exception("the expiry sweep failed; retrying in %.0f s", interval_s)


__all__ = ["SWEEP_INTERVAL_S", "SweepResult", "sweep_once", "sweep_forever"]
