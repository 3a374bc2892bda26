"""Writes reconciler/store/read_sql.py: the store's reading statements compiled for SQLite,
which the sqlite3 reader of `status`, `history` and `show` runs without SQLAlchemy.

    .venv/bin/python scripts/gen_read_sql.py           # rewrite the file
    .venv/bin/python scripts/gen_read_sql.py --check   # exit 1 if it is stale
"""

from __future__ import annotations

import sys

from reconciler.store.read_statements import OUTPUT, render


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT} is stale: run scripts/gen_read_sql.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
