"""Stored decisions: what `status` serves without planning 20,000 services again.

`environment_decisions`: each environment's decisions as last planned, with the basis they
were planned from and the instant they stop holding (reconciler/stored_status.py).
`environment_changes`: a counter per environment that triggers raise whenever a row the
planner reads about it changes (`service_state`, `live_versions`, `operator_suspended`,
`environment_state`); a stored decision whose counts differ is stale. Only the columns
planning reads raise it: a drift reading that only moves `observed_at`, or a sync that
saves an unchanged spec, leaves the decisions valid.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-29

Hand-written; runs on SQLite and PostgreSQL. A later migration that rebuilds one of the
four tables on SQLite (``batch_alter_table`` copies it) must create its triggers again.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: (table, its environment column, the columns whose change matters to planning).
WATCHED: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "service_state",
        "environment",
        (
            "deployed_version",
            "last_deployment_id",
            "last_status",
            "last_version",
            "running_deployment_id",
            "streak_version",
            "streak_count",
            "streak_last_at",
        ),
    ),
    ("live_versions", "environment", ("version", "deployment_id")),
    ("operator_suspended", "environment", ("environment",)),
    ("environment_state", "name", ("spec",)),
)

_BUMP_SQLITE = (
    "INSERT INTO environment_changes (environment, seq) VALUES ({row}.{column}, 1) "
    "ON CONFLICT (environment) DO UPDATE SET seq = environment_changes.seq + 1;"
)

_PG_FUNCTION = """
CREATE FUNCTION reconciler_environment_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    env text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        env := to_jsonb(OLD) ->> TG_ARGV[0];
    ELSE
        env := to_jsonb(NEW) ->> TG_ARGV[0];
    END IF;
    INSERT INTO environment_changes (environment, seq) VALUES (env, 1)
    ON CONFLICT (environment) DO UPDATE SET seq = environment_changes.seq + 1;
    RETURN NULL;
END;
$$
"""


def _changed(columns: tuple[str, ...], postgresql: bool) -> str:
    if postgresql:  # json has no equality operator: compare the text
        return " OR ".join(
            f"OLD.{c}::text IS DISTINCT FROM NEW.{c}::text"
            if c == "spec"
            else f"OLD.{c} IS DISTINCT FROM NEW.{c}"
            for c in columns
        )
    return " OR ".join(f"OLD.{c} IS NOT NEW.{c}" for c in columns)


def upgrade() -> None:
    op.create_table(
        "environment_changes",
        sa.Column("environment", sa.String(63), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("environment", name="pk_environment_changes"),
    )
    op.create_table(
        "environment_decisions",
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("basis", sa.Text(), nullable=False),
        sa.Column("valid_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decisions", sa.Text(), nullable=False),
        sa.Column("planned_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_environment_decisions"),
    )
    postgresql = op.get_context().dialect.name == "postgresql"
    if postgresql:
        op.execute(_PG_FUNCTION)
    for table, column, columns in WATCHED:
        name = f"{table}_changes"
        if postgresql:
            call = f"EXECUTE FUNCTION reconciler_environment_changed('{column}')"
            op.execute(
                f"CREATE TRIGGER {name}_write AFTER INSERT OR DELETE ON {table} FOR EACH ROW {call}"
            )
            op.execute(
                f"CREATE TRIGGER {name}_update AFTER UPDATE ON {table} FOR EACH ROW "
                f"WHEN ({_changed(columns, True)}) {call}"
            )
            continue
        new, old = (
            _BUMP_SQLITE.format(row="NEW", column=column),
            _BUMP_SQLITE.format(row="OLD", column=column),
        )
        op.execute(f"CREATE TRIGGER {name}_insert AFTER INSERT ON {table} BEGIN {new} END")
        op.execute(f"CREATE TRIGGER {name}_delete AFTER DELETE ON {table} BEGIN {old} END")
        op.execute(
            f"CREATE TRIGGER {name}_update AFTER UPDATE ON {table} "
            f"WHEN {_changed(columns, False)} BEGIN {new} END"
        )


def downgrade() -> None:
    postgresql = op.get_context().dialect.name == "postgresql"
    for table, _column, _columns in WATCHED:
        name = f"{table}_changes"
        suffixes = ("write", "update") if postgresql else ("insert", "delete", "update")
        for suffix in suffixes:
            on = f" ON {table}" if postgresql else ""
            op.execute(f"DROP TRIGGER IF EXISTS {name}_{suffix}{on}")
    if postgresql:
        op.execute("DROP FUNCTION IF EXISTS reconciler_environment_changed()")
    op.drop_table("environment_decisions")
    op.drop_table("environment_changes")
