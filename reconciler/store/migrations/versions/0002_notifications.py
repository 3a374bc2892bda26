"""Notifications: the durable outbox and the notifier's cursor over the ledger.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27

Hand-written; runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id() -> sa.types.TypeEngine[int]:
    # 64-bit on PostgreSQL; on SQLite an INTEGER PRIMARY KEY is the 64-bit rowid.
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _time() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "notification_cursor",
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("last_event_id", _id(), nullable=False),
        sa.Column("last_sync_id", _id(), nullable=False),
        sa.Column("updated_at", _time(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_notification_cursor"),
    )

    op.create_table(
        "notification_outbox",
        sa.Column("id", _id(), nullable=False),
        sa.Column("target", sa.String(255), nullable=False),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("environment", sa.String(63), nullable=True),
        sa.Column("service", sa.String(255), nullable=True),
        sa.Column("deployment_id", _id(), nullable=True),
        sa.Column("sync_id", _id(), nullable=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("occurred_at", _time(), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", _time(), nullable=False),
        sa.Column("delivered_at", _time(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_notification_outbox"),
    )
    op.create_index(
        "ix_notification_outbox_state_target_next_attempt_at",
        "notification_outbox",
        ["state", "target", "next_attempt_at"],
    )
    op.create_index(
        "ix_notification_outbox_target_fingerprint_occurred_at",
        "notification_outbox",
        ["target", "fingerprint", "occurred_at"],
    )


def downgrade() -> None:
    op.drop_index(
        "ix_notification_outbox_target_fingerprint_occurred_at", table_name="notification_outbox"
    )
    op.drop_index(
        "ix_notification_outbox_state_target_next_attempt_at", table_name="notification_outbox"
    )
    op.drop_table("notification_outbox")
    op.drop_table("notification_cursor")
