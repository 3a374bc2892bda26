"""Writes desired_state/format_schema.py: the desired-state models' core schema as Python
literals, which `reconciler validate DIR` runs with pydantic-core alone (no Pydantic).

    .venv/bin/python scripts/gen_format_schema.py           # rewrite the file
    .venv/bin/python scripts/gen_format_schema.py --check   # exit 1 if it is stale
"""

from __future__ import annotations

import sys

from desired_state.format_gen import OUTPUT, render


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if not OUTPUT.exists() or OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT} is stale: run scripts/gen_format_schema.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
