"""What every generator of a checked-in file does with the text it renders: write it, or
(``--check``) exit 1 when the file differs from it."""

from __future__ import annotations

import sys
from pathlib import Path


def write_or_check(output: Path, text: str, script: str) -> int:
    if "--check" in sys.argv[1:]:
        if not output.exists() or output.read_text(encoding="utf-8") != text:
            print(f"{output} is stale: run {script}", file=sys.stderr)
            return 1
        return 0
    output.write_text(text, encoding="utf-8")
    print(f"wrote {output}")
    return 0
