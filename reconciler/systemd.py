"""systemd's notify protocol: one datagram per message, no dependency.

`Type=notify` units learn readiness (READY=1), a status line (STATUS=...), liveness
(WATCHDOG=1 within WatchdogSec), that a stop or reload is under way (STOPPING=1,
RELOADING=1) and that it needs more time (EXTEND_TIMEOUT_USEC=...). Outside systemd
(no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class SystemdNotifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        # An address starting with "@" is in the abstract namespace.
        self.address: str | None = ("\0" + addr[1:] if addr.startswith("@") else addr) or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        wanted = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        self.watchdog_seconds: float | None = int(usec) / 1e6 if wanted else None
        self._sock: socket.socket | None = None
        self._last_status: str | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError as exc:  # systemd gone (or a test closed its socket): not fatal
            log.warning("event=sd_notify_failed error=%r", exc.strerror or str(exc))
            return False

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self, extend_seconds: float | None = None) -> None:
        self.send("STOPPING=1", *self._extend(extend_seconds))

    def reloading(self) -> None:
        # MONOTONIC_USEC lets Type=notify-reload units match this to the reload request.
        self.send(
            "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        )

    def extend_timeout(self, seconds: float) -> None:
        self.send(*self._extend(seconds))

    @staticmethod
    def _extend(seconds: float | None) -> list[str]:
        return [] if seconds is None else [f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}"]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
