"""Shared pytest fixtures. Each block below belongs to one part of the project."""

from __future__ import annotations

# ======================================================================================
# Database fixtures (owner: reconciler/store). Keep this block together.
#
#   sqlite_url  a SQLite file URL in tmp_path (the parent folder does not exist yet)
#   pg_url      a PostgreSQL URL whose search_path is a fresh, empty schema, dropped after
#               the test; skipped unless RECONCILER_TEST_POSTGRES_URL is set, e.g.
#               postgresql+psycopg://postgres@127.0.0.1:5432/test
#   db_url      parametrized: sqlite, postgres
#   store       a migrated Store on db_url (so tests using it run on both databases)
# ======================================================================================
import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from reconciler.store import Store

POSTGRES_URL_ENV = "RECONCILER_TEST_POSTGRES_URL"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state' / 'reconciler.db'}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    with pg_schema() as url:
        yield url


@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    """`pg_url`'s fresh schema, for a test that needs two (tests skip without a server)."""
    base = os.environ.get(POSTGRES_URL_ENV)
    if not base:
        pytest.skip(f"{POSTGRES_URL_ENV} not set")
    schema = f"test_{uuid.uuid4().hex[:16]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    if request.param == "sqlite":
        return sqlite_url
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    instance = Store.from_url(db_url)
    try:
        yield instance
    finally:
        instance.engine.dispose()


# ======================================================================================
# End of the database fixtures.
# ======================================================================================


# ======================================================================================
# AWS fixtures (owner: the ecs and lambda providers): `moto` is a moto server on 127.0.0.1
# with fake credentials in the environment; see tests/aws_support.py.
# ======================================================================================
pytest.register_assert_rewrite("tests.aws_support")
from tests.aws_support import _moto_server, moto  # noqa: E402, F401

# ======================================================================================
# Docker engine fixtures (owner: providers/docker): `dockerd`, `registry`, session-wide.
# ======================================================================================
pytest_plugins = ["tests.dockerd"]
