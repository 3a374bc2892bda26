"""Whole numbers as operators type them: ids and counts in the CLI and the HTTP API.

One parser, so that a number too large for the database (``9223372036854775808``) is a
plain "no such deployment" or a 400, never an overflow deep in a query.
"""

from __future__ import annotations

import re

__all__ = ["MAX_ID", "OutOfRange", "parse_int"]

MAX_ID = 2**63 - 1  # the largest value of a 64-bit integer column (SQLite INTEGER, BIGINT)
# ASCII digits only (str.isdigit() also takes '²', which int() refuses); a string of more
# digits than any bound here needs is not handed to int() (which costs time, or raises).
_SIGNED = re.compile(r"[+-]?[0-9]+")
_UNSIGNED = re.compile(r"[0-9]+")
_MAX_DIGITS = 30


class OutOfRange(ValueError):
    """A well-formed whole number outside the accepted range."""


def parse_int(raw: str, *, low: int = 0, high: int = MAX_ID, signed: bool = True) -> int:
    """``raw`` (ASCII digits, with a sign if ``signed``) as an int in ``[low, high]``.

    Raises :class:`OutOfRange` for a whole number outside the range (however many digits
    it has), ``ValueError`` for anything that is not a whole number.
    """
    if (_SIGNED if signed else _UNSIGNED).fullmatch(raw) is None:
        raise ValueError(f"'{raw[:40]}' is not a whole number")
    if len(raw.lstrip("+-0")) > _MAX_DIGITS or not low <= int(raw) <= high:
        raise OutOfRange(f"must be between {low} and {high}")
    return int(raw)
