"""One error in one desired-state file, with its position."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FileError"]


@dataclass(frozen=True)
class FileError:
    """An error at ``file:line:col`` (1-based), about the key path ``path``.

    ``path`` is dotted (``services.api.version``, list indices as numbers:
    ``windows.0.cron``); it is ``""`` when the error is about the whole document.
    """

    file: str
    line: int
    col: int
    path: str
    message: str

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
