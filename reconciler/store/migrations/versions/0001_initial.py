"""Initial schema: syncs, deployments with events and logs, derived service state,
environment state, operator actions.

Revision ID: 0001
Revises:
Create Date: 2026-11-26

Hand-written; runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id() -> sa.types.TypeEngine[int]:
    # 64-bit on PostgreSQL; on SQLite an INTEGER PRIMARY KEY is the 64-bit rowid.
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _time() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "syncs",
        sa.Column("id", _id(), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("commit_sha", sa.String(64), nullable=True),
        sa.Column("commit_author", sa.String(512), nullable=True),
        sa.Column("commit_time", _time(), nullable=True),
        sa.Column("commit_subject", sa.Text(), nullable=True),
        sa.Column("seen_at", _time(), nullable=False),
        sa.Column("ended_at", _time(), nullable=True),
        sa.Column("result", sa.String(16), nullable=True),
        sa.Column("full_load", sa.Boolean(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("environments_changed", sa.JSON(), nullable=False),
        sa.Column("errors", sa.JSON(), nullable=False),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_syncs"),
    )
    op.create_index("ix_syncs_result_id", "syncs", ["result", "id"])

    op.create_table(
        "deployments",
        sa.Column("id", _id(), nullable=False),
        sa.Column("environment", sa.String(63), nullable=False),
        sa.Column("service", sa.String(255), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("previous_version", sa.String(128), nullable=True),
        sa.Column("provider", sa.String(255), nullable=False),
        sa.Column("provider_type", sa.String(64), nullable=False),
        sa.Column("strategy", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("commit", sa.String(64), nullable=True),
        sa.Column("commit_author", sa.String(512), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("timeout_seconds", sa.Integer(), nullable=False),
        sa.Column("validation", sa.JSON(), nullable=True),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        sa.Column("started_at", _time(), nullable=True),
        sa.Column("completed_at", _time(), nullable=True),
        sa.Column("sync_id", _id(), nullable=True),
        sa.Column("rollback_of", _id(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_deployments"),
        sa.ForeignKeyConstraint(["sync_id"], ["syncs.id"], name="fk_deployments_sync_id_syncs"),
        sa.ForeignKeyConstraint(
            ["rollback_of"], ["deployments.id"], name="fk_deployments_rollback_of_deployments"
        ),
    )
    op.create_index("ix_deployments_environment_id", "deployments", ["environment", "id"])
    op.create_index(
        "ix_deployments_environment_service_id", "deployments", ["environment", "service", "id"]
    )
    op.create_index("ix_deployments_status_id", "deployments", ["status", "id"])
    op.create_index(
        "ix_deployments_environment_service_version_status",
        "deployments",
        ["environment", "service", "version", "status"],
    )
    op.create_index("ix_deployments_created_at", "deployments", ["created_at"])
    op.create_index("ix_deployments_sync_id", "deployments", ["sync_id"])
    op.create_index("ix_deployments_rollback_of", "deployments", ["rollback_of"])

    op.create_table(
        "deployment_events",
        sa.Column("id", _id(), nullable=False),
        sa.Column("deployment_id", _id(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("percent", sa.Integer(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("at", _time(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_deployment_events"),
        sa.ForeignKeyConstraint(
            ["deployment_id"],
            ["deployments.id"],
            name="fk_deployment_events_deployment_id_deployments",
        ),
    )
    op.create_index(
        "ix_deployment_events_deployment_id_id", "deployment_events", ["deployment_id", "id"]
    )

    op.create_table(
        "deployment_logs",
        sa.Column("id", _id(), nullable=False),
        sa.Column("deployment_id", _id(), nullable=False),
        sa.Column("stream", sa.String(8), nullable=False),
        sa.Column("line", sa.Text(), nullable=False),
        sa.Column("at", _time(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_deployment_logs"),
        sa.ForeignKeyConstraint(
            ["deployment_id"],
            ["deployments.id"],
            name="fk_deployment_logs_deployment_id_deployments",
        ),
    )
    op.create_index(
        "ix_deployment_logs_deployment_id_id", "deployment_logs", ["deployment_id", "id"]
    )

    op.create_table(
        "service_state",
        sa.Column("environment", sa.String(63), nullable=False),
        sa.Column("service", sa.String(255), nullable=False),
        sa.Column("deployed_version", sa.String(128), nullable=True),
        sa.Column("deployed_deployment_id", _id(), nullable=True),
        sa.Column("last_deployment_id", _id(), nullable=True),
        sa.Column("last_status", sa.String(16), nullable=True),
        sa.Column("last_version", sa.String(128), nullable=True),
        sa.Column("last_ended_at", _time(), nullable=True),
        sa.Column("running_deployment_id", _id(), nullable=True),
        sa.Column("streak_version", sa.String(128), nullable=True),
        sa.Column("streak_count", sa.Integer(), nullable=False),
        sa.Column("streak_last_at", _time(), nullable=True),
        sa.Column("streak_reset_id", _id(), nullable=True),
        sa.PrimaryKeyConstraint("environment", "service", name="pk_service_state"),
    )

    op.create_table(
        "environment_state",
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("source_path", sa.Text(), nullable=False),
        sa.Column("commit", sa.String(64), nullable=False),
        sa.Column("updated_at", _time(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_environment_state"),
    )

    op.create_table(
        "operator_actions",
        sa.Column("id", _id(), nullable=False),
        sa.Column("at", _time(), nullable=False),
        sa.Column("environment", sa.String(63), nullable=False),
        sa.Column("service", sa.String(255), nullable=True),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_operator_actions"),
    )
    op.create_index("ix_operator_actions_environment_id", "operator_actions", ["environment", "id"])

    op.create_table(
        "operator_suspended",
        sa.Column("environment", sa.String(63), nullable=False),
        sa.Column("since", _time(), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.PrimaryKeyConstraint("environment", name="pk_operator_suspended"),
    )


def downgrade() -> None:
    op.drop_table("operator_suspended")
    op.drop_index("ix_operator_actions_environment_id", table_name="operator_actions")
    op.drop_table("operator_actions")
    op.drop_table("environment_state")
    op.drop_table("service_state")
    op.drop_index("ix_deployment_logs_deployment_id_id", table_name="deployment_logs")
    op.drop_table("deployment_logs")
    op.drop_index("ix_deployment_events_deployment_id_id", table_name="deployment_events")
    op.drop_table("deployment_events")
    for name in (
        "ix_deployments_rollback_of",
        "ix_deployments_sync_id",
        "ix_deployments_created_at",
        "ix_deployments_environment_service_version_status",
        "ix_deployments_status_id",
        "ix_deployments_environment_service_id",
        "ix_deployments_environment_id",
    ):
        op.drop_index(name, table_name="deployments")
    op.drop_table("deployments")
    op.drop_index("ix_syncs_result_id", table_name="syncs")
    op.drop_table("syncs")
