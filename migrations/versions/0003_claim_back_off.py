"""claim back-off: failures, engine retries, not_before, last_error

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 18:10:00.000000
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0003'
down_revision: Union[str, None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.add_column(sa.Column('num_failures', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('num_engine_retries', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('not_before', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('last_error', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.drop_column('last_error')
        batch_op.drop_column('not_before')
        batch_op.drop_column('num_engine_retries')
        batch_op.drop_column('num_failures')
