"""Indexes for the sparse history filters (`reconciler history`, GET /api/v1/deployments).

A history query is equality filters on environment, service and status, optionally
``created_at >= since``, newest first (``ORDER BY id DESC LIMIT n``). Each combination of
equality filters needs an index with exactly those columns followed by ``id``: the query
then reads the newest matches first and stops after ``n``. (environment, id),
(environment, service, id) and (status, id) existed; without the three below, ``--service``
alone, and environment or service with a status, read the table or a long index range and
fetched every row to test the column the index lacked (163–215 ms at 1,000,000 rows for
an unknown service). ``--env E --service S --status X`` reads one service's history through
(environment, service, id). Status comes first in the two new ones: with
(environment, status, id) SQLite's planner (no statistics) took it instead of the partial
ix_deployments_running for the running look-up of every status write (0006). The
``since`` filter uses ix_deployments_created_at when few
rows are that recent (see `DeploymentQueries.history`).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29

Hand-written; runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = {
    "ix_deployments_service_id": ["service", "id"],
    "ix_deployments_status_environment_id": ["status", "environment", "id"],
    "ix_deployments_status_service_id": ["status", "service", "id"],
}


def upgrade() -> None:
    for name, columns in INDEXES.items():
        op.create_index(name, "deployments", columns)


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name="deployments")
