"""The webhook outbox: events written with a batch's terminal status, taken by one sender at a time.

Owns the `webhook_events` queries. `add_event` runs inside repo.transition_batch's transaction, so
an event exists exactly when its batch reached the status (a crash cannot lose it, and a status
change that lost its compare-and-set writes none). Senders (service/jobs/webhooks.py) take due
events with `claim_due`, a compare-and-set on `next_attempt_at` that doubles as a lease: two servers
on one database never send the same attempt twice, and a sender that dies mid-attempt leaves the
event due again when its lease lapses. A failed attempt's outcome is written only while the event is
still at that attempt (a late sender cannot move a newer lease); a 2xx always ends it. Portable SQL,
like repo.py. Must not import torch or aiohttp.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from sqlalchemy import delete, or_, select, update

from tokabatch.service.storage.db import Database
from tokabatch.service.storage.models import Batch, WebhookEvent
from tokabatch.service.storage.states import TERMINAL, BatchStatus

EVENT_RETENTION_S = 7 * 86_400      # delivered or abandoned events are swept this long after creation


def new_event_id() -> str:
    return "evt_" + secrets.token_hex(16)


def event_type(status: BatchStatus) -> str | None:
    """`batch.completed`, `batch.failed`, `batch.expired`, `batch.cancelled`; None for other statuses."""
    return f"batch.{status.value}" if status in TERMINAL else None


def event_payload(event_id: str, kind: str, batch_id: str, now_s: int) -> str:
    """The event as OpenAI's webhooks shape it (openai.types.webhooks.Batch*WebhookEvent)."""
    return json.dumps({"id": event_id, "object": "event", "created_at": int(now_s), "type": kind,
                       "data": {"id": batch_id}}, separators=(",", ":"))


async def add_event(session: Any, batch_id: str, status: BatchStatus, now_s: int) -> None:
    """(Inside the transaction that moved `batch_id` to `status`.) The event of a terminal status."""
    kind = event_type(status)
    if kind is None:
        return
    owner = (await session.execute(select(Batch.owner).where(Batch.id == batch_id))).scalar_one()
    event_id = new_event_id()
    session.add(WebhookEvent(id=event_id, owner=owner, batch_id=batch_id, type=kind,
                             payload=event_payload(event_id, kind, batch_id, now_s), created_at=int(now_s),
                             attempts=0, next_attempt_at=float(now_s)))


def _pending() -> Any:
    return (WebhookEvent.delivered_at.is_(None)) & (WebhookEvent.abandoned_at.is_(None))


async def claim_due(db: Database, now_s: float, lease_s: float, *, limit: int = 16) -> list[WebhookEvent]:
    """Take up to `limit` pending events whose next attempt is due, each for `lease_s` seconds
    (its `next_attempt_at` moves to now + lease_s); `attempts` counts this attempt. An event never
    attempted is due at once: its time was written by whoever ended the batch, whose clock may run
    ahead of this sender's (another host, or a test's faster runner clock)."""
    due = or_(WebhookEvent.attempts == 0, WebhookEvent.next_attempt_at <= now_s)
    candidates = (select(WebhookEvent.id, WebhookEvent.next_attempt_at, WebhookEvent.attempts)
                  .where(_pending(), due)
                  .order_by(WebhookEvent.next_attempt_at, WebhookEvent.seq).limit(limit))
    taken: list[WebhookEvent] = []
    async with db.sessions() as session, session.begin():
        for event_id, due_at, attempts in (await session.execute(candidates)).all():
            result = await session.execute(
                update(WebhookEvent)
                .where(WebhookEvent.id == event_id, WebhookEvent.next_attempt_at == due_at,
                       WebhookEvent.attempts == attempts, _pending())
                .values(next_attempt_at=now_s + lease_s, attempts=attempts + 1))
            if result.rowcount == 1:
                taken.append((await session.execute(
                    select(WebhookEvent).where(WebhookEvent.id == event_id)
                    .execution_options(populate_existing=True))).scalar_one())
    return taken


async def mark_delivered(db: Database, event_id: str, now_s: int) -> bool:
    """A 2xx came back: the event is done, even if its lease lapsed and another sender holds it now
    (that one's outcome then changes nothing). False when it was already delivered or abandoned."""
    return await _set(db, event_id, None, delivered_at=int(now_s), last_error=None)


async def retry_later(db: Database, event_id: str, at_s: float, error: str, *, attempt: int) -> bool:
    """Attempt number `attempt` failed: due again at `at_s`. A no-op (False) when that attempt's lease
    lapsed and another sender claimed the event since, so a late outcome cannot move its lease."""
    return await _set(db, event_id, attempt, next_attempt_at=float(at_s), last_error=error[:2000])


async def abandon(db: Database, event_id: str, now_s: int, error: str, *, attempt: int) -> bool:
    """Give up on the event after attempt number `attempt` (same guard as retry_later)."""
    return await _set(db, event_id, attempt, abandoned_at=int(now_s), last_error=error[:2000])


async def get_event(db: Database, event_id: str) -> WebhookEvent | None:
    async with db.sessions() as session:
        return (await session.execute(select(WebhookEvent).where(WebhookEvent.id == event_id))).scalar_one_or_none()


async def list_events(db: Database, *, batch_id: str | None = None) -> list[WebhookEvent]:
    """Events in creation order (all, or one batch's): for the sender's tests and operators."""
    query = select(WebhookEvent).order_by(WebhookEvent.seq)
    if batch_id is not None:
        query = query.where(WebhookEvent.batch_id == batch_id)
    async with db.sessions() as session:
        return list((await session.execute(query)).scalars())


async def sweep_events(db: Database, now_s: int) -> int:
    """Remove delivered and abandoned events older than EVENT_RETENTION_S; returns how many."""
    done = or_(WebhookEvent.delivered_at.is_not(None), WebhookEvent.abandoned_at.is_not(None))
    statement = delete(WebhookEvent).where(done, WebhookEvent.created_at < now_s - EVENT_RETENTION_S)
    async with db.sessions() as session, session.begin():
        return (await session.execute(statement)).rowcount


async def _set(db: Database, event_id: str, attempt: int | None, **values: Any) -> bool:
    """Write an outcome while the event is pending (and, given `attempt`, still at that attempt)."""
    statement = update(WebhookEvent).where(WebhookEvent.id == event_id, _pending())
    if attempt is not None:
        statement = statement.where(WebhookEvent.attempts == attempt)
    async with db.sessions() as session, session.begin():
        return (await session.execute(statement.values(**values))).rowcount == 1


__all__ = ["EVENT_RETENTION_S", "abandon", "add_event", "claim_due", "event_payload", "event_type", "get_event",
           "list_events", "mark_delivered", "new_event_id", "retry_later", "sweep_events"]
