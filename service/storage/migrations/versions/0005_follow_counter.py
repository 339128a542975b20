"""SQLite: count changes to deployments and experiments, so other API processes follow within 0.1 s

SQLite has no NOTIFY. Triggers bump the one row of `follow_version` on every change to deployments or
experiments, in the same transaction (so a rolled-back change bumps nothing), and `service.core.replicas`
reads that counter every 0.1 s: a one-row read, where a follow pass reads every deployment and experiment.
(PostgreSQL has migration 0004's NOTIFY instead; this table is not in the models, as it is SQLite's only.)

Revision ID: 0005
Revises: 0004
"""
from __future__ import annotations

from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

TABLES = ('deployments', 'experiments')
CHANGES = ('INSERT', 'UPDATE', 'DELETE')


def upgrade() -> None:
    if op.get_bind().dialect.name != 'sqlite':
        return
    op.execute("CREATE TABLE follow_version (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)")
    op.execute("INSERT INTO follow_version (id, version) VALUES (1, 0)")
    for table in TABLES:
        for change in CHANGES:
            op.execute(f"CREATE TRIGGER {table}_{change.lower()}_counts AFTER {change} ON {table} "
                       "BEGIN UPDATE follow_version SET version = version + 1 WHERE id = 1; END")


def downgrade() -> None:
    if op.get_bind().dialect.name != 'sqlite':
        return
    for table in TABLES:
        for change in CHANGES:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_{change.lower()}_counts")
    op.execute("DROP TABLE IF EXISTS follow_version")
