"""artifact_chunks: the files of adapters, snapshots and reports, kept in the database for other machines

Revision ID: 0006
Revises: 0005
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'artifact_chunks',
        sa.Column('artifact_id', sa.String(length=80), nullable=False),
        sa.Column('name', sa.String(length=255), nullable=False),
        sa.Column('seq', sa.Integer(), nullable=False),
        sa.Column('data', sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint('artifact_id', 'name', 'seq'),
    )


def downgrade() -> None:
    op.drop_table('artifact_chunks')
