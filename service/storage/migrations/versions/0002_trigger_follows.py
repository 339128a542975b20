"""monitor_runs.follows: one trigger per previous trigger, across API processes

Revision ID: 0002
Revises: 0001
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('monitor_runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('follows', sa.BigInteger(), nullable=True))
        batch_op.create_index('uq_monitor_runs_follows', ['deployment', 'kind', 'follows'], unique=True)


def downgrade() -> None:
    with op.batch_alter_table('monitor_runs', schema=None) as batch_op:
        batch_op.drop_index('uq_monitor_runs_follows')
        batch_op.drop_column('follows')
