"""uvicorn, served inside the daemon's own asyncio loop.

The daemon owns the process's signals, so uvicorn must not install handlers of its own;
the listening socket is bound here, before uvicorn starts, so that a bind failure is one
clear exception instead of uvicorn's log line and ``sys.exit``.

Every connection costs a file descriptor, which the daemon also needs for git, its database
and deployment commands; so connections are guarded (`ConnectionGuard`): a client must send
its request headers within ``header_timeout`` and its body within ``body_timeout``, one that
does not read its response for ``write_timeout`` is dropped, and at most ``max_connections``
are open (fewer if the descriptor limit is low). At the cap, the oldest connection still
waiting for its first request (else the oldest kept-alive idle one) is closed to make room;
only when every connection is busy is a new one refused (a 503), and refusals are logged
once a minute with their count, not each.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import resource
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

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
        sock = socket.create_server((addr, port), family=family, backlog=LISTEN_BACKLOG)
    except OSError as exc:
        # create_server appends "(while attempting to bind ...)": say it once, plainly.
        reason = (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
        raise HttpServerError(f"cannot listen on {where}: {reason}") from None
    sock.setblocking(False)
    return sock


# Pending connections the kernel queues before the server accepts them (no descriptor each
# yet): a full queue drops new ones (clients retry after 1 s, 3 s...), so it holds a burst
# (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG = 2048
# asyncio accepts up to its `backlog` connections per loop turn, each a descriptor before the
# guard sees it: so that batch is small, and the listen queue set apart (see `start`).
ACCEPT_BATCH = 32
# Descriptors kept for everything but HTTP connections (git, the database, deployment
# commands, and connections accepted but not yet counted): at least this many, or a quarter.
FD_RESERVE = 128
#: Descriptors the daemon asks for at start when the hard limit is unlimited.
FD_WANTED = 65536
#: Refusals are logged at most this often (with how many there were).
REFUSAL_LOG_SECONDS = 60.0


def _canned(status: str, message: str, *extra: str) -> bytes:
    """A whole response written straight to a transport (no request cycle to answer in)."""
    body = ('{"error": "' + message + '"}').encode()
    head = [
        f"HTTP/1.1 {status}",
        "content-type: application/json",
        "connection: close",
        f"content-length: {len(body)}",
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_REFUSAL = _canned(
    "503 Service Unavailable", "too many connections: try again shortly", "retry-after: 1"
)
_TIMEOUT = _canned("408 Request Timeout", "request not received in time")


def raise_fd_limit(wanted: int = FD_WANTED) -> int:
    """Raise the soft limit of open files towards the hard limit; the soft limit after.

    Python programs start with the soft limit (often 1,024) even where the hard one is much
    higher; the daemon holds a descriptor per HTTP connection besides its own."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("event=fd_limit_unchanged soft=%d hard=%d error=%r", soft, hard, str(exc))
    return soft


def connection_budget(max_connections: int, fd_limit: int) -> int:
    """How many HTTP connections fit beside what the rest of the daemon needs."""
    if fd_limit == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, fd_limit - max(FD_RESERVE, fd_limit // 4)))


@dataclass
class Limits:
    max_connections: int = 1000
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    write_timeout: float = 30.0


class ConnectionGuard:
    """What the connections of one server share: the cap, the timeouts, the idle queue."""

    def __init__(self, limits: Limits, *, monotonic: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.max_connections = limits.max_connections
        self.monotonic = monotonic
        # Connections waiting for a request, oldest first: never asked anything yet, and
        # kept alive after a response (a client's pool: closed to make room only when no
        # fresh one is left, since reusing it then fails for that client once).
        self.fresh: dict[GuardedH11Protocol, None] = {}
        self.kept_alive: dict[GuardedH11Protocol, None] = {}
        self.refused = 0
        self.evicted = 0
        self.timed_out = 0  # a request's headers or body not received in time
        self.write_timeouts = 0  # a response not read in time
        self.open = 0
        self._unlogged = 0
        self._logged_at: float | None = None

    def refuse(self, open_now: int) -> None:
        self.refused += 1
        self._unlogged += 1
        now = self.monotonic()
        if self._logged_at is None or now - self._logged_at >= REFUSAL_LOG_SECONDS:
            log.warning(
                "event=http_connections_refused count=%d open=%d max_connections=%d reason=%r",
                self._unlogged,
                open_now,
                self.max_connections,
                "every connection is busy: raise server.max_connections or LimitNOFILE",
            )
            self._unlogged = 0
            self._logged_at = now


def _no_delay(transport: asyncio.Transport) -> None:
    """TCP_NODELAY on a connection. asyncio sets it only on sockets whose ``proto`` is
    IPPROTO_TCP, and those accepted from `bind`'s socket have 0: without it, a response
    written in two parts (headers, body) on a kept-alive connection waited for the
    client's delayed ACK, ~40 ms a request."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with the guard's cap and timeouts."""

    guard: ConnectionGuard  # set on the per-server subclass made by `HttpServer.start`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        guard = self.guard
        self._deadline: asyncio.TimerHandle | None = None
        self._in_body = False
        self._write_stall: asyncio.TimerHandle | None = None
        self._refused = False
        if len(self.connections) >= guard.max_connections:
            idle = guard.fresh or guard.kept_alive
            if idle:  # make room: the oldest connection waiting for a request
                next(iter(idle))._drop(evicted=True)
            else:
                self._refused = True
                guard.refuse(len(self.connections))
                transport.write(_REFUSAL)
                transport.close()
                return
        _no_delay(transport)
        super().connection_made(transport)
        guard.open += 1
        guard.fresh[self] = None
        self._arm(guard.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self.guard.open -= 1
        self._disarm()
        self._busy()
        if self._write_stall is not None:
            self._write_stall.cancel()
            self._write_stall = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.IDLE:  # part of a request's headers
            if self._deadline is None:
                self._arm(self.guard.limits.header_timeout)
        elif state is h11.SEND_BODY:
            self._busy()
            if not self._in_body:
                self._in_body = True
                self._arm(self.guard.limits.body_timeout)
        else:  # the whole request is in
            self._busy()
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            # Idle again (uvicorn's keep-alive timeout applies).
            self.guard.kept_alive[self] = None

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_stall is None:
            self._write_stall = self.loop.call_later(
                self.guard.limits.write_timeout, self._write_timed_out
            )

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_stall is not None:
            self._write_stall.cancel()
            self._write_stall = None

    def _busy(self) -> None:
        self.guard.fresh.pop(self, None)
        self.guard.kept_alive.pop(self, None)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self.conn.their_state is not h11.SEND_BODY:
            self._in_body = False

    def _timed_out(self) -> None:
        self._deadline = None
        self.guard.timed_out += 1
        if self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE:
            self.transport.write(_TIMEOUT)  # nothing answered yet: say why, then close
            self._busy()
            self.transport.close()
        else:
            self._drop(evicted=False)

    def _write_timed_out(self) -> None:
        self.guard.write_timeouts += 1
        self._drop()

    def _drop(self, evicted: bool = False) -> None:
        """Close at once, whatever is buffered (the peer is not reading, or is idle)."""
        self._busy()
        self._write_stall = None
        if evicted:
            self.guard.evicted += 1
        self.transport.abort()


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
        limits: Limits | None = None,
        fd_limit: int | None = None,
    ) -> None:
        self.app = app
        self.listen = listen
        self.on_stop = on_stop
        self.graceful_seconds = graceful_seconds
        self.limits = limits or Limits()
        if fd_limit is None:
            fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.guard = ConnectionGuard(self.limits)
        self.guard.max_connections = connection_budget(self.limits.max_connections, fd_limit)
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
            http=type("Guarded", (GuardedH11Protocol,), {"guard": self.guard}),
            backlog=ACCEPT_BATCH,
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
        # asyncio's listen(ACCEPT_BATCH) also set the kernel's queue that small: widen it
        # again (listen() on a listening socket only changes its backlog).
        sock.listen(LISTEN_BACKLOG)
        log.info(
            "event=http_listening address=%s max_connections=%d",
            _display(*self.address),
            self.guard.max_connections,
        )

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
