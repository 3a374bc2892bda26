"""One process per state directory: an exclusive flock that names its holder."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

LOCK_NAME = "reconciler.lock"
#: The daemon's control socket in the state directory (`reconciler.channel`).
SOCKET_NAME = "control.sock"


class AlreadyRunning(Exception):
    """Another process holds the state directory; its pid is the argument (or None)."""


class StateLock:
    """An exclusive flock on the state directory: one daemon per state directory, and
    standalone commands that deploy know when a daemon is there to ask instead."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = self.path.open("a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise AlreadyRunning(self.holder()) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def holder(self) -> int | None:
        try:
            return int(self.path.read_text().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def held_by_other(self) -> int | None:
        """The pid of a daemon holding the lock, or None when nobody holds it."""
        if not self.path.exists():
            return None
        with self.path.open("a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return self.holder() or -1
            fcntl.flock(f, fcntl.LOCK_UN)
        return None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
