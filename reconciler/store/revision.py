"""The schema revision this release's code needs, in a module of its own: the sqlite3
reader (`sqlite_read.py`) compares a database with it without importing SQLAlchemy."""

from __future__ import annotations

#: The newest migration shipped in this package (tests check it against Alembic's head).
HEAD_REVISION = "0011"
