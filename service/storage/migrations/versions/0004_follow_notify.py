"""PostgreSQL: NOTIFY tuneloop_follow when deployments or experiments change, so other API processes follow at once

`service.core.replicas` LISTENs on this channel and runs its follow pass when a notification arrives (its
timed poll stays the fallback, and is all SQLite has). A statement-level trigger catches every change, from
any code path; PostgreSQL delivers the notification when the transaction commits, never for a rollback.

Revision ID: 0004
Revises: 0003
"""
from __future__ import annotations

from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

TABLES = ('deployments', 'experiments')


def upgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute("""
        CREATE OR REPLACE FUNCTION tuneloop_notify_follow() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('tuneloop_follow', TG_TABLE_NAME);
            RETURN NULL;
        END $$
    """)
    for table in TABLES:
        op.execute(f"CREATE TRIGGER {table}_notify_follow AFTER INSERT OR UPDATE OR DELETE ON {table} "
                   "FOR EACH STATEMENT EXECUTE FUNCTION tuneloop_notify_follow()")


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    for table in TABLES:
        op.execute(f"DROP TRIGGER IF EXISTS {table}_notify_follow ON {table}")
    op.execute("DROP FUNCTION IF EXISTS tuneloop_notify_follow()")
