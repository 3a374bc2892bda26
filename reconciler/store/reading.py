"""The store a reading command uses: the plain sqlite3 reader when it can answer, else
the `Store` (PostgreSQL; a SQLite file missing, or not at this release's revision)."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import unquote

from reconciler.store.sqlite_read import SQLiteReader

if TYPE_CHECKING:
    from reconciler.store.store import Store


def sqlite_path(url: str) -> str | None:
    """The file of a plain ``sqlite:///path`` URL; None for anything else (PostgreSQL,
    in-memory, URI filenames or query options: the `Store` reads those)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or "?" in url:
        return None
    path = unquote(url[len(prefix) :])
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return path


def open_reader(url: str) -> SQLiteReader | Store:
    """What `status`, `history` and `show` read from: on a SQLite database at this
    release's head, the sqlite3 reader (no SQLAlchemy import); otherwise
    `Store.for_reading`, which creates a new database or explains an old one as before."""
    path = sqlite_path(url)
    if path is not None:
        reader = SQLiteReader.open(path)
        if reader is not None:
            return reader
    from reconciler.store.store import Store

    return Store.for_reading(url)
