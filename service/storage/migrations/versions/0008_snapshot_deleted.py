"""snapshots.deleted_at, deleted_reason: a snapshot deleted through the API or by a deployment's keep_snapshots

Revision ID: 0008
Revises: 0007
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('snapshots', schema=None) as batch_op:
        batch_op.add_column(sa.Column('deleted_at', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('deleted_reason', sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('snapshots', schema=None) as batch_op:
        batch_op.drop_column('deleted_reason')
        batch_op.drop_column('deleted_at')
