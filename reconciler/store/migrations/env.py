"""Alembic environment of the reconciler store.

Configured programmatically by `reconciler.store.db` (no alembic.ini): the caller passes
an open connection in ``config.attributes["connection"]``. Offline (``--sql``) mode renders
for the URL given as ``sqlalchemy.url``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from reconciler.store.models import metadata

target_metadata = metadata


def run_migrations_offline() -> None:
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    _connection = context.config.attributes.get("connection")
    if _connection is None:
        from reconciler.store.db import make_engine

        _url = context.config.get_main_option("sqlalchemy.url")
        if not _url:
            raise RuntimeError("pass a connection in config.attributes['connection']")
        with make_engine(_url).begin() as _conn:
            run_migrations_online(_conn)
    else:
        run_migrations_online(_connection)
