"""for the nightly pipeline: retry lineage, live throughput and ETA, the webhook outbox

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 22:00:00.000000
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0004'
down_revision: Union[str, None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.add_column(sa.Column('parent_batch_id', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('throughput', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('eta_seconds', sa.Float(), nullable=True))
        batch_op.create_index('ix_batches_parent_batch_id', ['parent_batch_id'], unique=False)
    op.create_table(
        'webhook_events',
        sa.Column('seq', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('owner', sa.String(length=64), nullable=False),
        sa.Column('batch_id', sa.String(length=64), nullable=False),
        sa.Column('type', sa.String(length=32), nullable=False),
        sa.Column('payload', sa.Text(), nullable=False),
        sa.Column('created_at', sa.BigInteger(), nullable=False),
        sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
        sa.Column('next_attempt_at', sa.Float(), nullable=False),
        sa.Column('delivered_at', sa.BigInteger(), nullable=True),
        sa.Column('abandoned_at', sa.BigInteger(), nullable=True),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('seq', name=op.f('pk_webhook_events')),
        sa.UniqueConstraint('id', name=op.f('uq_webhook_events_id')),
    )
    op.create_index('ix_webhook_events_next_attempt_at', 'webhook_events', ['next_attempt_at'], unique=False)
    op.create_index('ix_webhook_events_created_at', 'webhook_events', ['created_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_webhook_events_created_at', table_name='webhook_events')
    op.drop_index('ix_webhook_events_next_attempt_at', table_name='webhook_events')
    op.drop_table('webhook_events')
    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.drop_index('ix_batches_parent_batch_id')
        batch_op.drop_column('eta_seconds')
        batch_op.drop_column('throughput')
        batch_op.drop_column('parent_batch_id')
