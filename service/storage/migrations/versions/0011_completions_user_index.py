"""completions (user, deployment) index: a user's data is found without a scan when it must be erased

Revision ID: 0011
Revises: 0010
"""
from __future__ import annotations

from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_completions_user', 'completions', ['user', 'deployment'])


def downgrade() -> None:
    op.drop_index('ix_completions_user', table_name='completions')
