"""Who holds the database: the process that may deploy from it (one at a time).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29

Hand-written; runs on SQLite and PostgreSQL. The lock itself is not a row (a PostgreSQL
advisory lock, a flock beside a SQLite file: both die with their holder); this one row
only names the holder for the refusal message.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "daemon_holder",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("state_dir", sa.Text(), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_daemon_holder"),
    )


def downgrade() -> None:
    op.drop_table("daemon_holder")
