"""shards: a batch split at validation into parts that workers claim on their own

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 08:30:00.000000
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0005'
down_revision: Union[str, None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.add_column(sa.Column('num_shards', sa.Integer(), server_default='0', nullable=False))
    op.create_table(
        'shards',
        sa.Column('seq', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('id', sa.String(length=80), nullable=False),
        sa.Column('batch_id', sa.String(length=64), nullable=False),
        sa.Column('index', sa.Integer(), nullable=False),
        sa.Column('first', sa.Integer(), nullable=False),
        sa.Column('end', sa.Integer(), nullable=False),
        sa.Column('outcome', sa.String(length=16), nullable=True),
        sa.Column('worker_id', sa.String(length=128), nullable=True),
        sa.Column('lease_expires_at', sa.Float(), nullable=True),
        sa.Column('num_claims', sa.Integer(), nullable=False),
        sa.Column('num_failures', sa.Integer(), server_default='0', nullable=False),
        sa.Column('num_engine_retries', sa.Integer(), server_default='0', nullable=False),
        sa.Column('not_before', sa.Float(), nullable=True),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.Column('throughput', sa.Float(), nullable=True),
        sa.Column('eta_seconds', sa.Float(), nullable=True),
        sa.Column('request_completed', sa.Integer(), nullable=False),
        sa.Column('request_failed', sa.Integer(), nullable=False),
        sa.Column('input_tokens', sa.BigInteger(), nullable=False),
        sa.Column('cached_tokens', sa.BigInteger(), nullable=False),
        sa.Column('output_tokens', sa.BigInteger(), nullable=False),
        sa.Column('reasoning_tokens', sa.BigInteger(), nullable=False),
        sa.Column('total_tokens', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('seq', name=op.f('pk_shards')),
        sa.UniqueConstraint('id', name=op.f('uq_shards_id')),
        sa.UniqueConstraint('batch_id', 'index', name=op.f('uq_shards_batch_id_index')),
    )
    op.create_index('ix_shards_outcome', 'shards', ['outcome'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_shards_outcome', table_name='shards')
    op.drop_table('shards')
    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.drop_column('num_shards')
