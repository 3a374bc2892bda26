"""Several daemons (replicas) on one PostgreSQL database: who is alive, who runs what.

`replicas`: one row per running daemon, its heartbeat in the database's clock.
`environment_leases`: one row per environment ever claimed: the replica that may deploy
there, until ``expires_at`` (database clock), and a ``generation`` raised at every claim
(the fencing token each of the holder's writes is checked against).
`unconfirmed_results`: a terminal result that a replica recorded after it had lost its
lease: kept beside the deployment, never over the new holder's record.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29

Hand-written; runs on SQLite and PostgreSQL (SQLite stays single-replica: the tables are
there, and empty).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("state_dir", sa.Text(), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_replicas"),
    )
    op.create_table(
        "environment_leases",
        sa.Column("environment", sa.String(63), nullable=False),
        sa.Column("holder", sa.String(128), nullable=True),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("environment", name="pk_environment_leases"),
    )
    op.create_index("ix_environment_leases_holder", "environment_leases", ["holder"])
    op.create_table(
        "unconfirmed_results",
        sa.Column("id", _BIGID, nullable=False),
        sa.Column("deployment_id", _BIGID, nullable=False),
        sa.Column("replica", sa.String(128), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["deployment_id"],
            ["deployments.id"],
            name="fk_unconfirmed_results_deployment_id_deployments",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_unconfirmed_results"),
    )
    op.create_index(
        "ix_unconfirmed_results_deployment_id", "unconfirmed_results", ["deployment_id"]
    )


def downgrade() -> None:
    op.drop_index("ix_unconfirmed_results_deployment_id", "unconfirmed_results")
    op.drop_table("unconfirmed_results")
    op.drop_index("ix_environment_leases_holder", "environment_leases")
    op.drop_table("environment_leases")
    op.drop_table("replicas")
