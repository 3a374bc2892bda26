"""One error in one desired-state file, with its position; and keeping any message one line."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["FileError", "one_line"]

# Anything a terminal or a log reader would take as a line break or a control sequence:
# C0 and C1 controls, DEL, and Unicode's line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    known = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char)
    if known is not None:
        return known
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def one_line(text: str) -> str:
    """``text`` with every control character escaped (``\\n``, ``\\x00``, ``\\u2028``).

    Messages quote what users wrote (a version, a key, a file name); escaped, such a quote
    can never make an error span two lines, nor send a control sequence to a terminal.
    """
    if _CONTROL.search(text) is None:
        return text
    return _CONTROL.sub(_escape, text)


@dataclass(frozen=True)
class FileError:
    """An error at ``file:line:col`` (1-based), about the key path ``path``.

    ``path`` is dotted (``services.api.version``, list indices as numbers:
    ``windows.0.cron``); it is ``""`` when the error is about the whole document.
    File, path and message are kept one line (:func:`one_line`) when the error is made.
    """

    file: str
    line: int
    col: int
    path: str
    message: str

    def __post_init__(self) -> None:
        for name in ("file", "path", "message"):
            value = getattr(self, name)
            clean = one_line(value)
            if clean is not value:
                object.__setattr__(self, name, clean)

    def __str__(self) -> str:
        if self.path:
            return f"{self.file}:{self.line}:{self.col}: {self.path}: {self.message}"
        return f"{self.file}:{self.line}:{self.col}: {self.message}"

    def to_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "col": self.col,
            "path": self.path,
            "message": self.message,
        }

    def sort_key(self) -> tuple[str, int, int, str, str]:
        return (self.file, self.line, self.col, self.path, self.message)
