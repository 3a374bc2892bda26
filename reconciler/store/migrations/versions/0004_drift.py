"""Drift: the live version each target last reported, per service, and the drift events
the notifier turns into `drifted` notices.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29

Hand-written; runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id() -> sa.types.TypeEngine[int]:
    # 64-bit on PostgreSQL; on SQLite an INTEGER PRIMARY KEY is the 64-bit rowid.
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _time() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "live_versions",
        sa.Column("environment", sa.String(63), nullable=False),
        sa.Column("service", sa.String(255), nullable=False),
        sa.Column("version", sa.String(128), nullable=True),
        sa.Column("deployment_id", _id(), nullable=True),
        sa.Column("deployed_version", sa.String(128), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("observed_at", _time(), nullable=False),
        sa.Column("drifted_since", _time(), nullable=True),
        sa.PrimaryKeyConstraint("environment", "service", name="pk_live_versions"),
    )
    op.create_table(
        "drift_events",
        sa.Column("id", _id(), nullable=False),
        sa.Column("environment", sa.String(63), nullable=False),
        sa.Column("service", sa.String(255), nullable=False),
        sa.Column("live_version", sa.String(128), nullable=False),
        sa.Column("deployed_version", sa.String(128), nullable=True),
        sa.Column("at", _time(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_drift_events"),
    )


def downgrade() -> None:
    op.drop_table("drift_events")
    op.drop_table("live_versions")
