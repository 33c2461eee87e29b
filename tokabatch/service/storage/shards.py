"""The queries of sharded batches: shards written at validation, claimed one at a time by workers,
their progress and outcomes summed into their batch.

A shard is claimed exactly as a batch is (repo.claim_batch): a free or lapsed lease, a passed
back-off, fewest failures first, one row locked with `FOR UPDATE SKIP LOCKED` on PostgreSQL and a
conditional UPDATE everywhere; heartbeats and releases are repo's, with `table=Shard`. Only shards
of an in_progress batch inside its window are claimed: ending a cancelled or expired batch is its
own claim's work (repo.claim_batch takes a sharded batch only then, or once every shard has its
outcome). A shard's writes are fenced by its holder as a batch's are. Must not import torch or aiohttp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from sqlalchemy import delete, func, or_, select, update

from tokabatch.service.storage.db import Database
from tokabatch.service.storage.models import Batch, Shard
from tokabatch.service.storage.states import BatchStatus

COUNTED = ("request_completed", "request_failed", "input_tokens", "cached_tokens", "output_tokens",
           "reasoning_tokens", "total_tokens")


@dataclass(frozen=True, slots=True)
class ShardCounts:
    """A shard's lines written so far (a ResultWriter's totals), as the shard row keeps them."""

    request_completed: int = 0
    request_failed: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0


def shard_id(batch_id: str, index: int) -> str:
    return f"{batch_id}.s{index:04d}"


async def replace_shards(db: Database, batch_id: str, ranges: Sequence[tuple[int, int]]) -> None:
    """The batch's shards, [first, end) positions of its feed order each, replacing any a validation
    that did not finish wrote before (no shard is claimed before the batch is in_progress)."""
    async with db.sessions() as session, session.begin():
        await session.execute(delete(Shard).where(Shard.batch_id == batch_id))
        session.add_all([Shard(id=shard_id(batch_id, i), batch_id=batch_id, index=i, first=first, end=end,
                               num_claims=0, num_failures=0, num_engine_retries=0, **dict.fromkeys(COUNTED, 0))
                         for i, (first, end) in enumerate(ranges)])


async def delete_shards(db: Database, batch_id: str) -> None:
    async with db.sessions() as session, session.begin():
        await session.execute(delete(Shard).where(Shard.batch_id == batch_id))


async def get_shard(db: Database, shard_id_: str) -> Shard | None:
    async with db.sessions() as session:
        return (await session.execute(select(Shard).where(Shard.id == shard_id_))).scalar_one_or_none()


async def get_shards(db: Database, batch_id: str) -> list[Shard]:
    async with db.sessions() as session:
        return list((await session.execute(
            select(Shard).where(Shard.batch_id == batch_id).order_by(Shard.index))).scalars())


async def claim_shard(db: Database, worker_id: str, lease_s: float, now_s: float, *,
                      shard: str | None = None) -> Shard | None:
    """Claim a shard without an outcome whose lease is free or lapsed and whose back-off has passed,
    of an in_progress batch inside its window (the oldest batch first, then the shard's order);
    `shard` claims that one only (whatever its batch's status: ending a batch, its claim's holder
    writes the unclaimed shards' lines). None when there is none."""
    free = or_(Shard.lease_expires_at.is_(None), Shard.lease_expires_at < now_s)
    if shard is not None:
        where = [Shard.id == shard, Shard.outcome.is_(None), free]
        candidates = select(Shard.id).where(*where)
    else:
        due = or_(Shard.not_before.is_(None), Shard.not_before <= now_s)
        where = [Shard.outcome.is_(None), free]
        candidates = (select(Shard.id).join(Batch, Batch.id == Shard.batch_id)
                      .where(*where, due, Batch.status == BatchStatus.IN_PROGRESS.value,
                             or_(Batch.expires_at.is_(None), Batch.expires_at > now_s))
                      .order_by(Shard.num_failures, Batch.seq, Shard.index))
    candidates = candidates.limit(8 if db.is_sqlite else 1).with_for_update(skip_locked=True, of=Shard)
    async with db.sessions() as session, session.begin():
        for candidate in list((await session.execute(candidates)).scalars()):
            result = await session.execute(
                update(Shard).where(Shard.id == candidate, *where)
                .values(worker_id=worker_id, lease_expires_at=now_s + lease_s, num_claims=Shard.num_claims + 1))
            if result.rowcount == 1:
                return (await session.execute(select(Shard).where(Shard.id == candidate)
                                              .execution_options(populate_existing=True))).scalar_one()
    return None


def _sum_into_batch(batch_id: str):
    """UPDATE of the batch's counts and usage to the sums over its shards, and its throughput to
    the sum of its running shards' (the ETA: the slowest running shard's, stretched by the shards
    still waiting for a worker)."""
    of_batch = Shard.batch_id == batch_id
    sums = {name: select(func.coalesce(func.sum(getattr(Shard, name)), 0)).where(of_batch).scalar_subquery()
            for name in COUNTED}
    running = of_batch, Shard.outcome.is_(None), Shard.throughput.is_not(None)
    waiting = select(func.count()).where(of_batch, Shard.outcome.is_(None), Shard.throughput.is_(None))
    num_running = select(func.count()).where(*running).scalar_subquery()
    eta = (select(func.max(Shard.eta_seconds)).where(*running).scalar_subquery()
           * (num_running + waiting.scalar_subquery()) / func.nullif(num_running, 0))
    return (update(Batch).where(Batch.id == batch_id)
            .values(**sums, throughput=select(func.sum(Shard.throughput)).where(*running).scalar_subquery(),
                    eta_seconds=eta))


async def update_shard_progress(db: Database, shard: Shard, worker_id: str, counts: ShardCounts, *,
                                throughput: float | None, eta_seconds: float | None) -> bool:
    """Write the shard's counts (while `worker_id` holds it) and its batch's sums; False when it does not."""
    statement = (update(Shard).where(Shard.id == shard.id, Shard.worker_id == worker_id)
                 .values(**vars_of(counts), throughput=throughput, eta_seconds=eta_seconds))
    async with db.sessions() as session, session.begin():
        if (await session.execute(statement)).rowcount != 1:
            return False
        await session.execute(_sum_into_batch(shard.batch_id))
    return True


async def finish_shard(db: Database, shard: Shard, worker_id: str, outcome: str, counts: ShardCounts) -> bool | None:
    """Record the shard's outcome and final counts, fenced by its holder, and sum them into the
    batch. True when that was the batch's last shard, False when others are left, None when
    `worker_id` no longer holds the shard (nothing written)."""
    statement = (update(Shard).where(Shard.id == shard.id, Shard.worker_id == worker_id, Shard.outcome.is_(None))
                 .values(**vars_of(counts), outcome=outcome, worker_id=None, lease_expires_at=None,
                         throughput=None, eta_seconds=None))
    async with db.sessions() as session, session.begin():
        if (await session.execute(statement)).rowcount != 1:
            return None
        await session.execute(_sum_into_batch(shard.batch_id))
        left = (await session.execute(select(func.count()).where(
            Shard.batch_id == shard.batch_id, Shard.outcome.is_(None)))).scalar_one()
    return left == 0


def vars_of(counts: ShardCounts) -> dict[str, int]:
    return {name: getattr(counts, name) for name in COUNTED}


__all__ = ["COUNTED", "ShardCounts", "claim_shard", "delete_shards", "finish_shard", "get_shard", "get_shards",
           "replace_shards", "shard_id", "update_shard_progress"]
