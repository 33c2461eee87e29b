"""The repository: every query tokabatch runs, as plain async functions over a `Database`.

Owns owner scoping (every HTTP-facing query takes `owner`; another owner's ids are simply not
found), cursor pagination, the compare-and-set status writes (through storage/states.py) and the
runner's claims (lease + heartbeat). Portable SQL only: the same code runs on SQLite and on
PostgreSQL (`FOR UPDATE SKIP LOCKED` renders on PostgreSQL and is ignored by SQLite, where the
conditional UPDATE alone makes a claim atomic). Must not import torch or aiohttp.

`owner=None` on get_file/get_batch means "any owner" and is for the runner only.

Expiry (contract §2.2-2.5): HTTP-facing file queries pass `now_s`, and a file whose `expires_at`
is at or before it is not found, exactly like a deleted one. The runner passes no `now_s`: an
expired input file of a batch that has not finished stays readable to it, and
`sweep_expired_files` never removes such a file (it is swept once the batch is terminal).

Idempotency keys (contract §1.2 [tb]): `create_file`/`create_batch` take an optional
`IdempotencyClaim` and insert its row in the same transaction as the object, so two concurrent
requests with one key create one object; the loser gets `IdempotencyKeyTaken`.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass
from typing import Any, Generic, Mapping, Sequence, TypeVar

from sqlalchemy import and_, delete, exists, func, not_, or_, select, update
from sqlalchemy.exc import IntegrityError

from tokabatch.errors import Conflict, InvalidRequest
from tokabatch.service.storage.states import (
    CANCELLABLE, NON_TERMINAL, TIMESTAMP_FIELD, BatchStatus, allowed_from, is_terminal,
)
from tokabatch.service.storage import outbox
from tokabatch.service.storage.db import Database
from tokabatch.service.storage.models import Batch, File, IdempotencyKey, Shard

T = TypeVar("T")
_BASE62 = string.digits + string.ascii_letters
IDEMPOTENCY_TTL_S = 86_400          # a key is remembered for 24 h after its first request

# Columns a caller may write together with a status change (transition_batch **fields).
TRANSITION_FIELDS = frozenset({
    "errors", "output_file_id", "error_file_id", "output_parquet_file_id", "request_total",
    "request_completed", "request_failed", "input_tokens", "cached_tokens", "output_tokens",
    "reasoning_tokens", "total_tokens", "model", "worker_id", "lease_expires_at", "num_shards",
})


def new_file_id() -> str:
    return "file-" + "".join(secrets.choice(_BASE62) for _ in range(22))


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class RequestCounts:
    total: int = 0
    completed: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    has_more: bool


@dataclass(frozen=True, slots=True)
class IdempotencyClaim:
    """The `Idempotency-Key` of a create request: stored with the object it creates."""

    key: str
    endpoint: str
    fingerprint: str


class IdempotencyKeyTaken(Exception):
    """A concurrent request stored the same (owner, key) first; nothing was created. Internal:
    the handler answers with that request's object (or a 409), never with this."""


async def _insert(db: Database, row: File | Batch, owner: str, idempotency: IdempotencyClaim | None) -> None:
    """Add `row` and, with a claim, its idempotency record in one transaction."""
    try:
        async with db.sessions() as session, session.begin():
            session.add(row)
            if idempotency is not None:
                session.add(IdempotencyKey(owner=owner, key=idempotency.key, endpoint=idempotency.endpoint,
                                           fingerprint=idempotency.fingerprint, object_id=row.id,
                                           created_at=row.created_at))
    except IntegrityError as e:
        if idempotency is None:
            raise
        raise IdempotencyKeyTaken(idempotency.key) from e


def _live(now_s: int | None) -> list[Any]:
    """The WHERE terms hiding files expired at `now_s` (none when `now_s` is None)."""
    if now_s is None:
        return []
    return [or_(File.expires_at.is_(None), File.expires_at > int(now_s))]


# --- files -----------------------------------------------------------------------------------

async def create_file(
    db: Database, *, owner: str, filename: str, purpose: str, num_bytes: int, now_s: int,
    expires_at: int | None = None, file_id: str | None = None, idempotency: IdempotencyClaim | None = None,
) -> File:
    """Register a blob already written under blobs.path(file_id) (uploads and runner outputs)."""
    row = File(id=file_id or new_file_id(), owner=owner, filename=filename, purpose=purpose,
               bytes=num_bytes, created_at=int(now_s), expires_at=expires_at)
    await _insert(db, row, owner, idempotency)
    return row


async def _get_owned(db: Database, model: Any, object_id: str, owner: str | None, *where: Any) -> Any:
    """The row with this id, if `owner` owns it (owner=None: any owner, for the runner only)."""
    query = select(model).where(model.id == object_id, *where)
    if owner is not None:
        query = query.where(model.owner == owner)
    async with db.sessions() as session:
        return (await session.execute(query)).scalar_one_or_none()


async def get_file(db: Database, file_id: str, *, owner: str | None, now_s: int | None = None) -> File | None:
    """With `now_s`, a file expired by then is None (the HTTP view); without, it is returned."""
    return await _get_owned(db, File, file_id, owner, *_live(now_s))


async def list_files(
    db: Database, *, owner: str, after: str | None = None, limit: int = 10_000,
    order: str = "desc", purpose: str | None = None, now_s: int | None = None,
) -> Page[File]:
    """With `now_s`, files expired by then are left out (`after` may still name one)."""
    query = select(File).where(File.owner == owner, *_live(now_s))
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    async with db.sessions() as session:
        return await _page(session, File, query, owner=owner, after=after, limit=limit, order=order)


def _in_use() -> Any:
    """The WHERE term: a non-terminal batch reads this File row as its input (the runner needs it)."""
    return (select(Batch.id)
            .where(Batch.input_file_id == File.id, Batch.status.in_([s.value for s in NON_TERMINAL]))
            .exists())


async def delete_file(db: Database, file_id: str, *, owner: str, now_s: int | None = None) -> File | None:
    """Delete the row (the caller removes the blob). None if unknown (or, with `now_s`, expired:
    the sweep removes it); Conflict if in use. The in-use test is part of the DELETE itself, so a
    batch created at the same moment either stops the delete or finds its file gone at validation
    (a clear failure), never a file removed under a running batch."""
    if await get_file(db, file_id, owner=owner, now_s=now_s) is None:
        return None
    async with db.sessions() as session, session.begin():
        statement = delete(File).where(File.id == file_id, File.owner == owner, ~_in_use()).returning(File)
        row = (await session.execute(statement)).scalar_one_or_none()
    if row is None and await get_file(db, file_id, owner=owner) is not None:
        raise Conflict(f"File {file_id} is the input file of a batch that has not finished; "
                       "cancel the batch or wait for it to finish first.", param="id")
    return row


async def sweep_expired_files(db: Database, now_s: int, *, limit: int = 1000) -> list[str]:
    """Delete up to `limit` rows of files expired at `now_s` and return their ids (the caller
    removes the blobs). Never the input file of a non-terminal batch: the runner still reads it."""
    expired = [File.expires_at.is_not(None), File.expires_at <= int(now_s), ~_in_use()]
    async with db.sessions() as session, session.begin():
        ids = list((await session.execute(select(File.id).where(*expired).limit(limit))).scalars())
        if not ids:
            return []
        # The conditions are repeated: a batch may have started reading one of them meanwhile.
        result = await session.execute(delete(File).where(File.id.in_(ids), *expired).returning(File.id))
        return list(result.scalars())


# --- idempotency keys ------------------------------------------------------------------------

async def find_idempotency_key(db: Database, *, owner: str, key: str, now_s: int) -> IdempotencyKey | None:
    """The record of (owner, key) if it is younger than IDEMPOTENCY_TTL_S. An older one is
    deleted here (the key is free again), so a reuse does not wait for the sweep."""
    stale = IdempotencyKey.created_at <= int(now_s) - IDEMPOTENCY_TTL_S
    mine = [IdempotencyKey.owner == owner, IdempotencyKey.key == key]
    async with db.sessions() as session, session.begin():
        await session.execute(delete(IdempotencyKey).where(*mine, stale))
        return (await session.execute(select(IdempotencyKey).where(*mine))).scalar_one_or_none()


async def forget_idempotency_key(db: Database, *, owner: str, key: str) -> None:
    """Drop (owner, key), e.g. when the object it names was deleted or has expired."""
    async with db.sessions() as session, session.begin():
        await session.execute(delete(IdempotencyKey).where(IdempotencyKey.owner == owner,
                                                           IdempotencyKey.key == key))


async def sweep_idempotency_keys(db: Database, now_s: int) -> int:
    """Delete every key older than IDEMPOTENCY_TTL_S; returns how many."""
    statement = delete(IdempotencyKey).where(IdempotencyKey.created_at <= int(now_s) - IDEMPOTENCY_TTL_S)
    async with db.sessions() as session, session.begin():
        return (await session.execute(statement)).rowcount


# --- batches ---------------------------------------------------------------------------------

async def create_batch(
    db: Database, *, owner: str, input_file_id: str, endpoint: str, completion_window: str,
    now_s: int, window_s: int, model: str | None = None, metadata: Mapping[str, str] | None = None,
    output_expires_after_s: int | None = None, batch_id: str | None = None,
    idempotency: IdempotencyClaim | None = None, parent_batch_id: str | None = None,
) -> Batch:
    """Insert a batch in `validating`, expiring `window_s` after `now_s` (`parent_batch_id`: the
    batch whose failed lines this retry holds)."""
    row = Batch(
        id=batch_id or new_batch_id(), owner=owner, endpoint=endpoint, model=model,
        input_file_id=input_file_id, completion_window=completion_window,
        status=BatchStatus.VALIDATING.value, metadata_=dict(metadata) if metadata is not None else None,
        output_expires_after_s=output_expires_after_s, created_at=int(now_s),
        expires_at=int(now_s) + int(window_s), request_total=0, request_completed=0, request_failed=0,
        input_tokens=0, cached_tokens=0, output_tokens=0, reasoning_tokens=0, total_tokens=0,
        num_claims=0, parent_batch_id=parent_batch_id,
    )
    await _insert(db, row, owner, idempotency)
    return row


async def get_batch(db: Database, batch_id: str, *, owner: str | None) -> Batch | None:
    return await _get_owned(db, Batch, batch_id, owner)


async def list_batches(db: Database, *, owner: str, after: str | None = None, limit: int = 20,
                       parent_batch_id: str | None = None) -> Page[Batch]:
    """Newest first (insertion order, so batches created in the same second keep their order);
    with `parent_batch_id`, only the retries of that batch."""
    query = select(Batch).where(Batch.owner == owner)
    if parent_batch_id is not None:
        query = query.where(Batch.parent_batch_id == parent_batch_id)
    async with db.sessions() as session:
        return await _page(session, Batch, query, owner=owner, after=after, limit=limit, order="desc")


async def transition_batch(db: Database, batch_id: str, to: BatchStatus | str, now_s: int,
                           *, held_by: str | None = None, **fields: Any) -> bool:
    """Compare-and-set: move `batch_id` to `to` if states.TRANSITIONS allows it from the current
    status, setting `<to>_at = now_s` and `fields` in the same UPDATE. False when the current
    status does not allow it (another writer got there first: re-read and decide), or when
    `held_by` is given and that worker no longer holds the batch's claim (the fence: a runner whose
    lease lapsed cannot move a batch another worker has claimed since). A terminal status writes
    its webhook event in the same transaction (storage/outbox.py)."""
    to = BatchStatus(to)
    unknown = set(fields) - TRANSITION_FIELDS
    if unknown:
        raise ValueError(f"transition_batch cannot set {sorted(unknown)}")
    values = dict(fields)
    values["status"] = to.value
    if to in TIMESTAMP_FIELD:
        values[TIMESTAMP_FIELD[to]] = int(now_s)
    if is_terminal(to):
        values.update(throughput=None, eta_seconds=None)    # live while it runs only
    statement = (update(Batch)
                 .where(Batch.id == batch_id, Batch.status.in_([s.value for s in allowed_from(to)]),
                        *([Batch.worker_id == held_by] if held_by is not None else []))
                 .values(**values))
    async with db.sessions() as session, session.begin():
        result = await session.execute(statement)
        if result.rowcount != 1:
            return False
        await outbox.add_event(session, batch_id, to, now_s)    # batch.completed, ...: the webhook outbox
    return True


async def cancel_batch(db: Database, batch_id: str, *, owner: str, now_s: int) -> Batch | None:
    """The cancel endpoint: validating/in_progress -> cancelling; cancelling/cancelled unchanged;
    other statuses raise Conflict. None for an unknown id. Retries the CAS if a worker moved the
    batch in between (e.g. validating -> in_progress)."""
    for _ in range(8):
        row = await get_batch(db, batch_id, owner=owner)
        if row is None:
            return None
        status = BatchStatus(row.status)
        if status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
            return row
        if status not in CANCELLABLE:
            raise Conflict(f"Cannot cancel a batch with status '{status.value}'.")
        if await transition_batch(db, batch_id, BatchStatus.CANCELLING, now_s):
            return await get_batch(db, batch_id, owner=owner)
    raise Conflict(f"Batch {batch_id} changed status too often while being cancelled; try again.")


async def count_batches_by_status(db: Database, *, owner: str) -> dict[str, int]:
    """How many of `owner`'s batches are in each status (every status listed, 0 included)."""
    statement = select(Batch.status, func.count()).where(Batch.owner == owner).group_by(Batch.status)
    async with db.sessions() as session:
        rows = (await session.execute(statement)).all()
    counts = {s.value: 0 for s in BatchStatus}
    counts.update({status: int(n) for status, n in rows})
    return counts


async def batch_timings(db: Database, *, owner: str, wait_bounds_s: Sequence[float]
                        ) -> tuple[list[int], float, list[tuple[str, float | None, float | None]]]:
    """For /metrics, over `owner`'s batches: the queue waits (created_at to in_progress_at) of those
    that started, as how many waited at most each of `wait_bounds_s` then how many in all, and the
    waits' sum in seconds; and (id, throughput, eta_seconds) of each in_progress batch that has
    either. The buckets are counted in SQL (FILTER: PostgreSQL, and SQLite since 3.30)."""
    wait = Batch.in_progress_at - Batch.created_at
    waits = (select(*(func.count().filter(wait <= bound) for bound in wait_bounds_s), func.count(), func.sum(wait))
             .where(Batch.owner == owner, Batch.in_progress_at.is_not(None)))
    paces = (select(Batch.id, Batch.throughput, Batch.eta_seconds)
             .where(Batch.owner == owner, Batch.status == BatchStatus.IN_PROGRESS.value,
                    or_(Batch.throughput.is_not(None), Batch.eta_seconds.is_not(None)))
             .order_by(Batch.seq))
    async with db.sessions() as session:
        *counts, total_s = (await session.execute(waits)).one()
        running = (await session.execute(paces)).all()
    return [int(n) for n in counts], float(total_s or 0), [(i, t, e) for i, t, e in running]


async def claim_batch(db: Database, worker_id: str, lease_s: float, now_s: float) -> Batch | None:
    """Claim a non-terminal batch whose lease is free or expired and whose back-off (not_before)
    has passed, for `lease_s` seconds: the one with the fewest failures, then the oldest, so a batch
    that keeps failing never stands in front of the others. Returns the claimed row (with the new
    lease) or None when there is no work."""
    free = or_(Batch.lease_expires_at.is_(None), Batch.lease_expires_at < now_s)
    due = or_(Batch.not_before.is_(None), Batch.not_before <= now_s)
    # A sharded batch runs as its shards (claim_shard); its own claim is for ending it: once every
    # shard has its outcome, or when it is cancelling or its window has ended.
    sharded_running = and_(
        Batch.num_shards > 0, Batch.status == BatchStatus.IN_PROGRESS.value,
        or_(Batch.expires_at.is_(None), Batch.expires_at > now_s),
        exists().where(Shard.batch_id == Batch.id, Shard.outcome.is_(None)))
    # With row locks (PostgreSQL) lock ONE candidate: locking several would hide them all from
    # concurrent workers until we commit. Without (SQLite) try a few, as a rival may win the first.
    num_candidates = 8 if db.is_sqlite else 1
    candidates = (select(Batch.id)
                  .where(Batch.status.in_([s.value for s in NON_TERMINAL]), free, due, not_(sharded_running))
                  .order_by(Batch.num_failures, Batch.seq).limit(num_candidates)
                  .with_for_update(skip_locked=True))
    async with db.sessions() as session, session.begin():
        ids = list((await session.execute(candidates)).scalars())
        for batch_id in ids:
            # The WHERE repeats the lease test: on SQLite (no row locks) two workers may pick the
            # same candidate, and only the UPDATE that still sees a free lease wins.
            result = await session.execute(
                update(Batch).where(Batch.id == batch_id, free)
                .values(worker_id=worker_id, lease_expires_at=now_s + lease_s,
                        num_claims=Batch.num_claims + 1))
            if result.rowcount == 1:
                return (await session.execute(
                    select(Batch).where(Batch.id == batch_id)
                    .execution_options(populate_existing=True))).scalar_one()
    return None


Claimed = type[Batch] | type[Shard]        # the claim functions below work on either table


async def heartbeat(db: Database, batch_id: str, worker_id: str, lease_s: float, now_s: float,
                    table: Claimed = Batch) -> bool:
    """Extend the lease; False if `worker_id` no longer holds it (stop working on the batch)."""
    statement = (update(table).where(table.id == batch_id, table.worker_id == worker_id)
                 .values(lease_expires_at=now_s + lease_s))
    async with db.sessions() as session, session.begin():
        return (await session.execute(statement)).rowcount == 1


async def release_after_failure(db: Database, batch_id: str, worker_id: str, *, error: str, not_before: float,
                                engine: bool = False, table: Claimed = Batch) -> Batch | Shard | None:
    """Release the claim after a claim that ended badly: count it (`num_failures`, or
    `num_engine_retries` when the engine failed lines), keep the error, and keep the batch out of
    reach of claims until `not_before`. Returns the updated row, or None if `worker_id` had lost it."""
    counter = table.num_engine_retries if engine else table.num_failures
    statement = (update(table).where(table.id == batch_id, table.worker_id == worker_id)
                 .values({counter: counter + 1, table.last_error: error[:4000], table.not_before: not_before,
                          table.worker_id: None, table.lease_expires_at: None, table.throughput: None,
                          table.eta_seconds: None}))
    async with db.sessions() as session, session.begin():
        if (await session.execute(statement)).rowcount != 1:
            return None
        return (await session.execute(select(table).where(table.id == batch_id)
                                      .execution_options(populate_existing=True))).scalar_one()


async def release_claim(db: Database, batch_id: str, worker_id: str, *, not_before: float | None = None,
                        table: Claimed = Batch) -> bool:
    """Give the claim up (no failure counted); with `not_before`, out of reach of claims until then."""
    values: dict[str, Any] = dict(worker_id=None, lease_expires_at=None, throughput=None, eta_seconds=None)
    if not_before is not None:
        values["not_before"] = not_before
    statement = update(table).where(table.id == batch_id, table.worker_id == worker_id).values(**values)
    async with db.sessions() as session, session.begin():
        return (await session.execute(statement)).rowcount == 1


async def update_progress(db: Database, batch_id: str, request_counts: RequestCounts, usage: Usage,
                          *, worker_id: str | None = None, throughput: float | None = None,
                          eta_seconds: float | None = None) -> bool:
    """Write live counts, usage (absolute values), throughput and ETA. With `worker_id`, only while
    it holds the lease."""
    statement = update(Batch).where(Batch.id == batch_id).values(
        request_total=request_counts.total, request_completed=request_counts.completed,
        request_failed=request_counts.failed, input_tokens=usage.input_tokens,
        cached_tokens=usage.cached_tokens, output_tokens=usage.output_tokens,
        reasoning_tokens=usage.reasoning_tokens, total_tokens=usage.total_tokens,
        throughput=throughput, eta_seconds=eta_seconds)
    if worker_id is not None:
        statement = statement.where(Batch.worker_id == worker_id)
    async with db.sessions() as session, session.begin():
        return (await session.execute(statement)).rowcount == 1


async def recent_output_rate(db: Database, *, model: str | None, limit: int = 5) -> tuple[int, float, int] | None:
    """(output tokens, running seconds, batches) over the newest `limit` completed batches of
    `model` that ran at least a second (in_progress to finalizing), or None when there are none."""
    running_s = Batch.finalizing_at - Batch.in_progress_at
    statement = (select(Batch.output_tokens, running_s)
                 .where(Batch.status == BatchStatus.COMPLETED.value, Batch.model == model, Batch.output_tokens > 0,
                        Batch.in_progress_at.is_not(None), Batch.finalizing_at.is_not(None), running_s >= 1)
                 .order_by(Batch.seq.desc()).limit(limit))
    async with db.sessions() as session:
        rows = (await session.execute(statement)).all()
    if not rows:
        return None
    return sum(int(t) for t, _ in rows), float(sum(s for _, s in rows)), len(rows)


async def set_validation_errors(db: Database, batch_id: str, errors: Sequence[Mapping[str, Any]]) -> None:
    """Store `errors.data` entries ({code, message, param, line}); the runner then transitions to failed
    (or passes errors= to transition_batch to do both at once)."""
    await _set(db, batch_id, errors=[dict(e) for e in errors])


async def set_result_files(db: Database, batch_id: str, output_file_id: str | None,
                           error_file_id: str | None, output_parquet_file_id: str | None) -> None:
    await _set(db, batch_id, output_file_id=output_file_id, error_file_id=error_file_id,
               output_parquet_file_id=output_parquet_file_id)


async def _set(db: Database, batch_id: str, **values: Any) -> None:
    async with db.sessions() as session, session.begin():
        await session.execute(update(Batch).where(Batch.id == batch_id).values(**values))


async def _page(session: Any, model: type, query: Any, *, owner: str, after: str | None,
                limit: int, order: str) -> Page:
    """One page of `query` in `seq` order, strictly after the row whose id is `after`."""
    descending = order != "asc"
    if after is not None:
        after_seq = (await session.execute(
            select(model.seq).where(model.id == after, model.owner == owner))).scalar_one_or_none()
        if after_seq is None:
            raise InvalidRequest(f"Invalid 'after': no object with id {after!r}.", param="after",
                                 code="invalid_value")
        query = query.where(model.seq < after_seq if descending else model.seq > after_seq)
    query = query.order_by(model.seq.desc() if descending else model.seq.asc()).limit(limit + 1)
    rows = list((await session.execute(query)).scalars())
    return Page(items=rows[:limit], has_more=len(rows) > limit)


__all__ = [
    "Page", "RequestCounts", "Usage", "IdempotencyClaim", "IdempotencyKeyTaken", "IDEMPOTENCY_TTL_S",
    "new_file_id", "new_batch_id", "create_file", "get_file", "list_files", "delete_file",
    "sweep_expired_files", "find_idempotency_key", "forget_idempotency_key", "sweep_idempotency_keys",
    "create_batch", "get_batch", "list_batches", "count_batches_by_status", "transition_batch", "cancel_batch",
    "claim_batch", "heartbeat", "release_after_failure", "release_claim", "update_progress", "recent_output_rate",
    "set_validation_errors",
    "set_result_files",
    "batch_timings",
]
