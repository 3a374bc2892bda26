"""The daemon's HTTP side (SPEC §8): health, metrics, read API, sync, git webhooks.

Served by uvicorn inside the daemon's asyncio loop::

    server = await start_http(control)   # HttpServerError: one sentence, e.g. port in use
    ...
    await server.stop()
"""

from __future__ import annotations

from reconciler.bus import Bus
from reconciler.http.app import create_app, stop_streams, watch_connections
from reconciler.http.control import Control
from reconciler.http.server import (
    HttpServer,
    HttpServerError,
    Limits,
    parse_listen,
    raise_fd_limit,
    serve,
)


async def start_http(
    control: Control, listen: str | None = None, bus: Bus | None = None
) -> HttpServer:
    """Build the app over ``control`` and serve it on ``listen`` (default: server.listen);
    ``bus``: the notices live pages follow other replicas' deployments by.

    Raises the process's soft limit of open files first (up to the hard limit): the
    connection cap is computed from it."""
    fd_limit = raise_fd_limit()
    app = create_app(control, bus=bus)
    server_config = control.config.server
    server = HttpServer(
        app,
        server_config.listen if listen is None else listen,
        on_stop=lambda: stop_streams(app),
        limits=Limits(
            max_connections=server_config.max_connections,
            header_timeout=server_config.header_timeout,
            body_timeout=server_config.body_timeout,
            write_timeout=server_config.write_timeout,
        ),
        fd_limit=fd_limit,
    )
    watch_connections(app, server)
    await server.start()
    return server


__all__ = [
    "Control",
    "HttpServer",
    "HttpServerError",
    "Limits",
    "create_app",
    "parse_listen",
    "serve",
    "start_http",
    "stop_streams",
    "watch_connections",
]
