"""The audit ledger's published head: written to a file or POSTed to a URL, read back.

The daemon publishes ``{"seq", "hash", "at"}`` of the newest ledger entry at each sync and
at stop, somewhere the database's writers cannot reach (another host, a write-once
bucket, a file only root appends to). `reconciler audit verify --head` reads it back: a
ledger that ends before the published entry has lost its tail.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

# httpx is imported where a URL is used: with rich installed, `import httpx` also loads
# its command line (rich, pygments), ~300 ms and several MB in every daemon otherwise.

TIMEOUT_SECONDS = 10.0
MAX_BYTES = 64 * 1024


class HeadError(Exception):
    """The head could not be published or read (one sentence naming where)."""


def is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def write_file(path: Path, head: dict[str, Any]) -> None:
    """Replace the file atomically: a reader never sees half a head."""
    data = json.dumps(head, sort_keys=True) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise HeadError(f"cannot write the chain head to {path}: {exc.strerror or exc}") from None


async def publish(target: str, head: dict[str, Any]) -> None:
    """Write the head to ``target`` (a file path) or POST it there (a URL)."""
    if not is_url(target):
        write_file(Path(target), head)
        return
    import httpx

    try:
        async with httpx.AsyncClient(timeout=TIMEOUT_SECONDS) as client:
            response = await client.post(target, json=head)
    except httpx.HTTPError as exc:
        raise HeadError(f"cannot POST the chain head to {target}: {exc}") from None
    if response.status_code >= 300:
        raise HeadError(f"POST {target} answered {response.status_code}")


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        head = json.loads(text)
    except ValueError as exc:
        raise HeadError(f"{where}: not JSON: {exc}") from None
    if (
        not isinstance(head, dict)
        or not isinstance(head.get("seq"), int)
        or not isinstance(head.get("hash"), str)
    ):
        raise HeadError(f'{where}: expected {{"seq": N, "hash": "...", "at": "..."}}')
    return head


def read(target: str) -> dict[str, Any]:
    """The published head at ``target`` (a file path, or a URL to GET)."""
    if not is_url(target):
        path = Path(target)
        try:
            with path.open("rb") as f:
                data = f.read(MAX_BYTES + 1)
        except OSError as exc:
            raise HeadError(f"cannot read the chain head {path}: {exc.strerror or exc}") from None
        if len(data) > MAX_BYTES:
            raise HeadError(f"{path}: larger than {MAX_BYTES} bytes: not a chain head")
        return _parse(data.decode("utf-8", "replace"), str(path))
    import httpx

    try:
        response = httpx.get(target, timeout=TIMEOUT_SECONDS)
    except httpx.HTTPError as exc:
        raise HeadError(f"cannot GET the chain head at {target}: {exc}") from None
    if response.status_code != 200:
        raise HeadError(f"GET {target} answered {response.status_code}")
    return _parse(response.text[: MAX_BYTES + 1], target)
