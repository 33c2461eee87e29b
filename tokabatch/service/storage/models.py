"""The tables: files, batches, their shards, idempotency keys and the webhook outbox (SQLAlchemy 2 declarative models).

Owns the schema; migrations/versions must match it (`alembic check` runs in the tests). Every row
has `owner` (the API key's hash, "" when no keys are configured). Rows are ordered by `seq`, an
autoincrement integer, because `created_at` is whole seconds and ties would reorder lists.
Must not import torch or aiohttp. Queries live in repo.py, not here.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Float, Index, Integer, MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tokabatch.service.storage.states import is_terminal

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class File(Base):
    """One stored blob: an upload or a file the runner produced. The bytes live in blobs.py."""

    __tablename__ = "files"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    owner: Mapped[str] = mapped_column(String(64), nullable=False)
    filename: Mapped[str] = mapped_column(Text, nullable=False)
    purpose: Mapped[str] = mapped_column(String(32), nullable=False)
    bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at: Mapped[int] = mapped_column(BigInteger, nullable=False)
    expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    __table_args__ = (
        Index("ix_files_owner_seq", "owner", "seq"),
        Index("ix_files_expires_at", "expires_at"),   # the expiry sweep (repo.sweep_expired_files)
    )


class Counted:
    """The lines written so far and their usage: a batch's (contract §3.5 request_counts and usage), or
    a shard's part of it (summed into its batch)."""

    request_completed: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    request_failed: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    input_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    cached_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    total_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


class Claimed:
    """A row runners claim: a batch, or a shard of one (repo.claim_batch, shards.claim_shard)."""

    # The runner's claim: who works on it and until when (a float Unix time; heartbeats extend it).
    worker_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    num_claims: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    # Claims that ended badly: an unexpected error (capped: the batch then fails with it), or lines
    # the engine failed (retried; the last attempt writes them as error lines). Either puts the
    # batch out of reach of claims until `not_before` (a back-off), so it cannot stall the queue.
    num_failures: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    num_engine_retries: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    not_before: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)

    # While it runs (the runner writes them with the progress): output tokens per second over the
    # last minute, and the seconds left at that pace. Null before the first finished line and once terminal.
    throughput: Mapped[float | None] = mapped_column(Float, nullable=True)
    eta_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)


class Batch(Counted, Claimed, Base):
    """One batch job; `status` changes only through repo.transition_batch (states.TRANSITIONS)."""

    __tablename__ = "batches"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    owner: Mapped[str] = mapped_column(String(64), nullable=False)
    endpoint: Mapped[str] = mapped_column(String(64), nullable=False)
    model: Mapped[str | None] = mapped_column(Text, nullable=True)
    input_file_id: Mapped[str] = mapped_column(String(64), nullable=False)
    completion_window: Mapped[str] = mapped_column(String(16), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, nullable=True)
    output_expires_after_s: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    output_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    output_parquet_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)

    created_at: Mapped[int] = mapped_column(BigInteger, nullable=False)
    expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    in_progress_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    finalizing_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    completed_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    failed_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    expired_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    cancelling_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    cancelled_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    request_total: Mapped[int] = mapped_column(Integer, nullable=False, default=0)

    # A retry's child batch names the batch whose failed lines it holds (POST /v1/batches/{id}/retry).
    parent_batch_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # A batch split at validation into shards (RunnerConfig.shard_lines) runs as its Shard rows, each
    # claimed on its own; 0 is a batch that runs whole under the batch's own claim.
    num_shards: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")

    __table_args__ = (
        Index("ix_batches_owner_seq", "owner", "seq"),
        Index("ix_batches_status", "status"),
        Index("ix_batches_input_file_id", "input_file_id"),
        Index("ix_batches_parent_batch_id", "parent_batch_id"),
    )

    @property
    def is_terminal(self) -> bool:
        return is_terminal(self.status)


class Shard(Counted, Claimed, Base):
    """A part of a sharded batch: the lines at positions [first, end) of the batch's feed order
    (ordering.py's file-level order, rebuilt the same from the file by any worker), claimed like a
    batch (lease, heartbeat, back-off, failure counts) and checkpointed in a work folder of its own.
    `outcome` is set once all its lines are written (completed, cancelled, expired, failed); its
    result files are then published as blobs (jobs/shards.py) and its counts and usage kept here."""

    __tablename__ = "shards"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(80), unique=True, nullable=False)    # <batch id>.s<index>
    batch_id: Mapped[str] = mapped_column(String(64), nullable=False)
    index: Mapped[int] = mapped_column(Integer, nullable=False)
    first: Mapped[int] = mapped_column(Integer, nullable=False)
    end: Mapped[int] = mapped_column(Integer, nullable=False)
    outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)

    __table_args__ = (
        UniqueConstraint("batch_id", "index"),
        Index("ix_shards_outcome", "outcome"),
    )

    @property
    def num_lines(self) -> int:
        return self.end - self.first


class IdempotencyKey(Base):
    """One `Idempotency-Key` a client sent on a create (contract §1.2 [tb]): which object the
    first request made, and a fingerprint of that request to tell a retry from a different
    request reusing the key. Unique per (owner, key); swept 24 h after `created_at`."""

    __tablename__ = "idempotency_keys"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(64), nullable=False)
    key: Mapped[str] = mapped_column(String(255), nullable=False)
    endpoint: Mapped[str] = mapped_column(String(64), nullable=False)
    fingerprint: Mapped[str] = mapped_column(String(64), nullable=False)
    object_id: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[int] = mapped_column(BigInteger, nullable=False)

    __table_args__ = (
        UniqueConstraint("owner", "key"),
        Index("ix_idempotency_keys_created_at", "created_at"),
    )


class WebhookEvent(Base):
    """One event to deliver (the outbox): written in the same transaction as the batch's terminal
    status, so a crash cannot lose it; delivered with retries by service/jobs/webhooks.py. `payload`
    is the event's JSON exactly as signed and sent. The receiver's URL is the batch's
    `metadata.webhook_url`, else the server's `--webhook-url`, decided at delivery."""

    __tablename__ = "webhook_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)      # evt_..., the webhook-id
    owner: Mapped[str] = mapped_column(String(64), nullable=False)
    batch_id: Mapped[str] = mapped_column(String(64), nullable=False)
    type: Mapped[str] = mapped_column(String(32), nullable=False)                  # batch.completed, ...
    payload: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[int] = mapped_column(BigInteger, nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    next_attempt_at: Mapped[float] = mapped_column(Float, nullable=False)         # also a sender's lease
    delivered_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)   # a 2xx came back
    abandoned_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)   # out of attempts, or no URL
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        Index("ix_webhook_events_next_attempt_at", "next_attempt_at"),
        Index("ix_webhook_events_created_at", "created_at"),
    )


__all__ = ["Base", "File", "Batch", "IdempotencyKey", "Shard", "WebhookEvent"]
