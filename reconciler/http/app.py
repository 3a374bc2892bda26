"""The ASGI application: routes, JSON errors, request metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reconciler.bus import Bus
from reconciler.http import api, dashboard
from reconciler.http.control import Control
from reconciler.http.metrics import Metrics
from reconciler.http.server import HttpServer
from reconciler.http.sse import LiveFeeds
from reconciler.http.webhooks import WebhookReceiver

log = logging.getLogger("reconciler.http")

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

ROUTES = [
    Route("/", dashboard.overview, methods=["GET"]),
    Route("/history", dashboard.history, methods=["GET"]),
    Route("/deployments/{id}", dashboard.deployment, methods=["GET"]),
    Route("/static/{name}", dashboard.static, methods=["GET"]),
    Route("/healthz", api.healthz, methods=["GET"]),
    Route("/readyz", api.readyz, methods=["GET"]),
    Route("/metrics", api.metrics, methods=["GET"]),
    Route("/openapi.json", api.openapi, methods=["GET"]),
    Route("/api/v1/status", api.status, methods=["GET"]),
    Route("/api/v1/deployments", api.deployments, methods=["GET"]),
    Route("/api/v1/blame", api.blame, methods=["GET"]),
    Route("/api/v1/replicas", api.replicas, methods=["GET"]),
    Route("/api/v1/deployments/{id}", api.deployment, methods=["GET"]),
    Route("/api/v1/deployments/{id}/events", api.deployment_stream, methods=["GET"]),
    Route("/api/v1/deployments/{id}/log", api.deployment_log, methods=["GET"]),
    Route("/api/v1/sync", api.sync, methods=["POST"]),
    Route("/api/v1/deploy", api.deploy, methods=["POST"]),
    Route("/api/v1/rollback", api.rollback, methods=["POST"]),
    Route("/api/v1/environments/{env}/suspend", api.suspend, methods=["POST"]),
    Route("/api/v1/environments/{env}/resume", api.resume, methods=["POST"]),
    Route("/hooks/git", api.git_hook, methods=["POST"]),
]


class RequestMetrics:
    """Counts requests by method, route template and status (pure ASGI: streams stay streams)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.http_request(method, route, status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404 and exc.detail == "Not Found":
        message = f"no such endpoint: {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error(
        "event=http_error method=%s path=%s error=%r",
        request.method,
        request.url.path,
        f"{type(exc).__name__}: {exc}".splitlines()[0],
    )
    return JSONResponse({"error": "internal error: see the daemon's log"}, status_code=500)


def create_app(
    control: Control,
    *,
    ping_interval: float = 15.0,
    ready_timeout: float = 2.0,
    replay_cache_size: int = 10_000,
    wall_clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
    bus: Bus | None = None,
) -> Starlette:
    """The HTTP API over ``control``. Subscribes its metrics to ``control.hub`` (once: build
    one app per daemon, and keep it across configuration reloads), and its live feeds to
    ``bus`` (deployments other replicas run)."""
    metrics = Metrics(control)
    control.hub.on_event(metrics.on_event)
    app = Starlette(
        routes=ROUTES,
        middleware=[Middleware(RequestMetrics, metrics=metrics)],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    app.state.ctx = api.Context(
        control=control,
        metrics=metrics,
        webhooks=WebhookReceiver(
            replay_window=control.config.server.webhook_replay_window,
            max_entries=replay_cache_size,
            wall_clock=wall_clock,
            monotonic=monotonic,
        ),
        ping_interval=ping_interval,
        ready_timeout=ready_timeout,
        stopping=asyncio.Event(),
        feeds=LiveFeeds(
            lambda: control.store,
            control.hub,
            read=api.read_in_thread,
            ping_interval=ping_interval,
        ),
    )
    metrics.connections.feeds = app.state.ctx.feeds
    if bus is not None:
        app.state.ctx.feeds.listen(bus)
    return app


def stop_streams(app: Starlette) -> None:
    """End the open event streams (the server is stopping)."""
    context: api.Context = app.state.ctx
    context.stopping.set()
    context.feeds.stop()


def watch_connections(app: Starlette, server: HttpServer) -> None:
    """Let the app's metrics count ``server``'s connections."""
    context: api.Context = app.state.ctx
    context.metrics.connections.guard = server.guard
