"""Log lines: one event per line, key=value (or JSON), no timestamp under the journal."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if not os.environ.get("JOURNAL_STREAM"):
            doc = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(), **doc}
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(fmt: str = "text", level: str | None = None) -> None:
    """Configure the root logger for the daemon. The journal stamps lines itself."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
        handler.setFormatter(logging.Formatter(f"{stamp}level=%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get("RECONCILER_LOG_LEVEL", "INFO").upper())
    # httpx logs every request URL at INFO: a Slack webhook URL is a secret.
    for noisy in ("apscheduler", "git", "alembic", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
