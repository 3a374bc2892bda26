"""Deployments record their run's process group, so a restart can end what a crash left.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

Hand-written; runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("run_pgid", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("run_process", sa.String(80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("run_process")
        batch.drop_column("run_pgid")
