"""Writes reconciler/store/read_sql.py: the store's reading statements compiled for SQLite,
which the sqlite3 reader of `status`, `history` and `show` runs without SQLAlchemy.

    .venv/bin/python scripts/gen_read_sql.py           # rewrite the file
    .venv/bin/python scripts/gen_read_sql.py --check   # exit 1 if it is stale
"""

from __future__ import annotations

import sys

from _generated import write_or_check

from reconciler.store.read_statements import OUTPUT, render


def main() -> int:
    return write_or_check(OUTPUT, render(), "scripts/gen_read_sql.py")


if __name__ == "__main__":
    sys.exit(main())
