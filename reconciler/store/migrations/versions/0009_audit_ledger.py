"""The tamper-evident audit ledger, and where each operator action was asked from.

`audit_ledger` is a hash chain (reconciler/store/chain.py): every finished sync, terminal
deployment and operator action is appended in the transaction that records it. An
upgraded database's existing rows are chained here, after a genesis entry that says how
many were backfilled (online upgrades only: an offline ``--sql`` script leaves the table
empty, and the first append backfills it then).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29

Hand-written; runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("operator_actions") as batch:
        batch.add_column(sa.Column("origin", sa.String(255), nullable=True))
    op.create_table(
        "audit_ledger",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("ref", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_ledger"),
    )
    op.create_index("ix_audit_ledger_kind_ref_seq", "audit_ledger", ["kind", "ref", "seq"])
    if not context.is_offline_mode():
        from reconciler.store.chain import backfill

        backfill(op.get_bind())


def downgrade() -> None:
    op.drop_index("ix_audit_ledger_kind_ref_seq", table_name="audit_ledger")
    op.drop_table("audit_ledger")
    with op.batch_alter_table("operator_actions") as batch:
        batch.drop_column("origin")
