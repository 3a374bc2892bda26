"""Who signed the commit a sync read: `syncs.signer`.

With `repository.allowed_signers` set, every sync verifies the signature of the head it
read; the signer (the key's fingerprint, and its principal or user id when the key is
trusted) is recorded beside the commit, for an applied head as for a refused one, so that
the ledger says who vouched for each applied commit and who tried to push an untrusted one.
Null when signatures are not checked (or the head is not signed).

Revision ID: 0008
Revises: 0006
Create Date: 2026-11-29

Hand-written; runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("syncs") as batch:
        batch.add_column(sa.Column("signer", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("syncs") as batch:
        batch.drop_column("signer")
