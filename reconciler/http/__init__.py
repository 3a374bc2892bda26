"""The daemon's HTTP side (SPEC §8): health, metrics, read API, sync, git webhooks.

Served by uvicorn inside the daemon's asyncio loop::

    server = await start_http(control)   # HttpServerError: one sentence, e.g. port in use
    ...
    await server.stop()
"""

from __future__ import annotations

from reconciler.http.app import create_app, stop_streams
from reconciler.http.control import Control
from reconciler.http.server import HttpServer, HttpServerError, parse_listen, serve


async def start_http(control: Control, listen: str | None = None) -> HttpServer:
    """Build the app over ``control`` and serve it on ``listen`` (default: server.listen)."""
    app = create_app(control)
    server = HttpServer(
        app,
        control.config.server.listen if listen is None else listen,
        on_stop=lambda: stop_streams(app),
    )
    await server.start()
    return server


__all__ = [
    "Control",
    "HttpServer",
    "HttpServerError",
    "create_app",
    "parse_listen",
    "serve",
    "start_http",
    "stop_streams",
]
