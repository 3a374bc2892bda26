"""`python -m reconciler.store.migrate < URL`: apply the migrations in a child process.

The database URL (it may hold a password) comes on stdin, never on the command line,
where `ps` would show it to every user of the host.

The daemon migrates through this so that Alembic (about 12 MB once imported) never stays
resident in a process that runs for months. Prints the applied revisions, one per line;
an error is one line on stderr and exit status 1.
"""

from __future__ import annotations

import sys

from reconciler.store.db import SchemaTooNew, make_engine, upgrade


def main(argv: list[str]) -> int:
    url = sys.stdin.readline().strip()
    if argv or not url:
        print("usage: python -m reconciler.store.migrate < DATABASE_URL", file=sys.stderr)
        return 2
    engine = make_engine(url)
    try:
        for revision in upgrade(engine):
            print(revision)
    except SchemaTooNew as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"migration failed: {type(exc).__name__}: {first}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
