"""Writes desired_state/format_schema.py: the desired-state models' core schema as Python
literals, which `reconciler validate DIR` runs with pydantic-core alone (no Pydantic).

    .venv/bin/python scripts/gen_format_schema.py           # rewrite the file
    .venv/bin/python scripts/gen_format_schema.py --check   # exit 1 if it is stale
"""

from __future__ import annotations

import sys

from _generated import write_or_check

from desired_state.format_gen import OUTPUT, render


def main() -> int:
    return write_or_check(OUTPUT, render(), "scripts/gen_format_schema.py")


if __name__ == "__main__":
    sys.exit(main())
