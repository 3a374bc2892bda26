"""Durations as users write them: seconds (``90``) or ``90s`` / ``30m`` / ``2h`` / ``1d``."""

from __future__ import annotations

import re

__all__ = ["format_duration", "parse_duration"]

_UNIT_RE = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_UNIT_SECONDS = (86400, 3600, 60, 1)
# Longer text is no duration anyone means; it would also make int() do needless work.
_MAX_TEXT = 40


def _bad(value: object) -> ValueError:
    return ValueError(f"bad duration '{value}': use seconds or 90s / 30m / 2h")


def parse_duration(value: str | int) -> int:
    """Seconds from an int, a digit string ("90"), or "90s" / "30m" / "2h" / "1d".

    Compound forms such as ``"1h30m"`` are accepted (units in the order d, h, m, s, each
    at most once). ``0`` is allowed. Anything else (negative, empty, fractional, unknown
    unit, a bool) raises ``ValueError``.
    """
    if isinstance(value, bool):
        raise _bad(str(value).lower())
    if isinstance(value, int):
        if value < 0:
            raise _bad(value)
        return value
    if not isinstance(value, str):
        raise _bad(value)
    text = value.strip()
    if len(text) > _MAX_TEXT:
        raise _bad(text[:_MAX_TEXT] + "...")
    if text.isascii() and text.isdigit():
        return int(text)
    match = _UNIT_RE.fullmatch(text) if text else None
    if match is None or not any(match.groups()):
        raise _bad(value)
    return sum(int(g) * mult for g, mult in zip(match.groups(), _UNIT_SECONDS, strict=True) if g)


def format_duration(seconds: float) -> str:
    """A short human form: ``"1h30m"``, ``"40s"``, ``"2m5s"``, ``"1d2h"``, ``"0.4s"``."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 10 and seconds != int(seconds):
        return f"{seconds:.1f}s"
    remaining = round(seconds)
    if remaining == 0:
        return "0s"
    parts: list[str] = []
    for mult, unit in zip(_UNIT_SECONDS, "dhms", strict=True):
        count, remaining = divmod(remaining, mult)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
