"""The running-deployment look-up: a partial index over unfinished deployments.

Every status write recomputes its service's row of `service_state`, including the newest
unfinished deployment of that service. With only (environment, service, id) to go on, that
look-up read the service's whole history (186 ms at 200,000 rows, under SQLite's write
lock). A partial index holding only unfinished deployments makes it an index search whose
size is the number of deployments running, not the number ever made.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29

Hand-written; runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written exactly as the query writes it: SQLite uses a partial index only when the
# query's WHERE clause contains the index's condition term for term.
UNFINISHED = "status IN ('in_progress', 'pending', 'validating')"


def upgrade() -> None:
    op.create_index(
        "ix_deployments_running",
        "deployments",
        ["environment", "service", "id"],
        sqlite_where=sa.text(UNFINISHED),
        postgresql_where=sa.text(UNFINISHED),
    )


def downgrade() -> None:
    op.drop_index("ix_deployments_running", table_name="deployments")
