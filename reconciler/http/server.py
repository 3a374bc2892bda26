"""uvicorn, served inside the daemon's own asyncio loop.

The daemon owns the process's signals, so uvicorn must not install handlers of its own;
the listening socket is bound here, before uvicorn starts, so that a bind failure is one
clear exception instead of uvicorn's log line and ``sys.exit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp

log = logging.getLogger("reconciler.http")

# How long a stop waits for requests in flight (event streams end at once on stop).
GRACEFUL_SECONDS = 3.0


class HttpServerError(Exception):
    """The server cannot start (bad address, port in use); one sentence."""


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (every address) -> (host, port)."""
    text = listen.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise HttpServerError(f"bad listen address '{listen}': expected [host]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise HttpServerError(f"bad listen address '{listen}': expected host:port")
        if ":" in host:
            raise HttpServerError(
                f"bad listen address '{listen}': write IPv6 addresses as [addr]:port"
            )
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise HttpServerError(f"bad listen address '{listen}': port must be 0-65535")
    return host, int(port_text)


def _display(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host or '*'}:{port}"


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); `HttpServerError` with one sentence if not."""
    where = _display(host, port)
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        addr = host
    except ValueError:  # a name ("localhost") or "" (every address)
        try:
            infos = socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except socket.gaierror as exc:
            raise HttpServerError(f"cannot listen on {where}: {exc.strerror}") from None
        family = infos[0][0]
        addr = str(infos[0][4][0])
    try:
        sock = socket.create_server((addr, port), family=family, backlog=128)
    except OSError as exc:
        # create_server appends "(while attempting to bind ...)": say it once, plainly.
        reason = (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
        raise HttpServerError(f"cannot listen on {where}: {reason}") from None
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the daemon's loop owns SIGTERM/SIGINT/SIGHUP."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.started_event = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.started_event.set()

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29 spelled it so
        return

    # uvicorn's main loop wakes every 0.1 s to look at `should_exit`; an idle daemon should
    # not. Wake once a second (the Date header's resolution) or at once when told to exit.
    @property
    def should_exit(self) -> bool:
        return self._exit_event().is_set()

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        event = self._exit_event()
        if value:
            event.set()
        else:
            event.clear()

    def _exit_event(self) -> asyncio.Event:
        event: asyncio.Event | None = self.__dict__.get("_exit")
        if event is None:
            event = self.__dict__["_exit"] = asyncio.Event()
        return event

    async def main_loop(self) -> None:
        ticks = 0
        while not await self.on_tick(ticks):
            ticks += 10  # on_tick counts tenths of a second: refresh the Date header each time
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exit_event().wait(), 1.0)


class HttpServer:
    """One uvicorn server on one socket: ``await start()``, then ``await stop()``."""

    def __init__(
        self,
        app: ASGIApp,
        listen: str,
        *,
        on_stop: Callable[[], None] | None = None,
        graceful_seconds: float = GRACEFUL_SECONDS,
    ) -> None:
        self.app = app
        self.listen = listen
        self.on_stop = on_stop
        self.graceful_seconds = graceful_seconds
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None
        self.address: tuple[str, int] | None = None

    @property
    def url(self) -> str:
        assert self.address is not None, "the server is not started"
        host, port = self.address
        return f"http://{_display(host, port)}"

    async def start(self) -> None:
        """Bind and start serving; returns once connections are accepted."""
        host, port = parse_listen(self.listen)
        sock = bind(host, port)
        self._socket = sock
        bound: Any = sock.getsockname()
        self.address = (str(bound[0]), int(bound[1]))
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            log_config=None,  # the daemon configures logging; uvicorn must not replace it
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(max(self.graceful_seconds, 1)),
            server_header=False,
        )
        server = self._server = _Server(config)
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name="http")
        started = asyncio.ensure_future(server.started_event.wait())
        done, _ = await asyncio.wait({started, self._task}, return_when="FIRST_COMPLETED")
        if self._task in done:
            started.cancel()
            exc = self._task.exception()
            sock.close()
            raise HttpServerError(
                f"cannot serve on {self.listen}: {exc or 'the server stopped at start'}"
            )
        log.info("event=http_listening address=%s", _display(*self.address))

    async def wait(self) -> None:
        """Until the server stops."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        if self.on_stop is not None:
            self.on_stop()
        self._server.should_exit = True
        try:
            await self._task
        finally:
            if self._socket is not None:
                self._socket.close()
            self._server = None


async def serve(
    app: ASGIApp,
    listen: str,
    *,
    ready: asyncio.Event | None = None,
    on_stop: Callable[[], None] | None = None,
) -> None:
    """Serve until cancelled (then stop gracefully). ``ready`` is set once listening."""
    server = HttpServer(app, listen, on_stop=on_stop)
    await server.start()
    if ready is not None:
        ready.set()
    try:
        await server.wait()
    finally:
        await server.stop()
