"""Times as operators type them: `--since` and `?since=`."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from desired_state import parse_duration

SINCE_HELP = "a time (2026-11-26T10:00:00Z, 2026-11-26) or an age (2h, 7d)"


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """An aware UTC time from a time or an age before `now`; ValueError otherwise."""
    try:
        if re.fullmatch(r"[0-9]+[smhd]?([0-9]+[smhd])*", value):
            return (now or datetime.now(UTC)) - timedelta(seconds=parse_duration(value))
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return t.astimezone(UTC) if t.tzinfo is not None else t.replace(tzinfo=UTC)
    except OverflowError:  # an age reaching before year 1, or a time zone that does
        raise ValueError(f"expected {SINCE_HELP}, not before the year 1") from None
    except ValueError:
        raise ValueError(f"expected {SINCE_HELP}") from None
