"""The request handlers: parse, call the control or the store once, answer JSON.

Every error is ``{"error": "one sentence"}`` with the status that says what kind it is.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal, TypeVar
from urllib.parse import urlencode

from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from reconciler.blame import BlameError
from reconciler.blame import blame as find_blame
from reconciler.channel import DeployAction, Refused, RollbackAction, SuspendAction
from reconciler.config import ConfigError
from reconciler.http.control import Control
from reconciler.http.metrics import CONTENT_TYPE_LATEST, Metrics
from reconciler.http.openapi import openapi_document
from reconciler.http.schemas import DeployRequest, RollbackRequest, SuspendRequest, SyncRequest
from reconciler.http.sse import LiveFeeds, deployment_events
from reconciler.http.webhooks import UNSIGNED, WebhookReceiver
from reconciler.numbers import MAX_ID, OutOfRange, parse_int
from reconciler.source.gitcmd import SourceError
from reconciler.store import STATUSES, DeploymentRecord, Store, is_transient
from reconciler.store.records import LogLine, format_time
from reconciler.sync import open_source
from reconciler.times import SINCE_HELP, parse_since

log = logging.getLogger("reconciler.http")
T = TypeVar("T")

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
SYNC_BODY_MAX = 64 * 1024


@dataclass
class Context:
    """What the handlers share; kept on ``app.state.ctx``."""

    control: Control
    metrics: Metrics
    webhooks: WebhookReceiver
    ping_interval: float
    ready_timeout: float
    stopping: asyncio.Event
    feeds: LiveFeeds


def ctx(request: Request) -> Context:
    context: Context = request.app.state.ctx
    return context


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BadRequest(HTTPException):
    def __init__(self, message: str) -> None:
        super().__init__(400, message)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


#: Threads for the API's store reads. Their own: the executor writes every event through
#: asyncio's default pool, which slow or many reads would otherwise fill (the deployment
#: then waits for them); here a read waits for a read, never a deployment for a read.
READ_THREADS = 4
_reads: ThreadPoolExecutor | None = None


def read_in_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> asyncio.Future[T]:
    """Run a store read on the HTTP side's own threads."""
    global _reads
    if _reads is None:
        _reads = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="http-read")
    return asyncio.get_running_loop().run_in_executor(_reads, partial(fn, *args, **kwargs))


async def db(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """A store call, off the loop; a database that is away is a 503, not a 500."""
    try:
        return await read_in_thread(fn, *args, **kwargs)
    except Exception as exc:
        if is_transient(exc):
            raise HTTPException(503, f"database unavailable: {_one_line(exc)}") from exc
        raise


def _params(request: Request, allowed: Collection[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        if key not in allowed:
            raise BadRequest(f"unknown parameter '{key}': expected {', '.join(sorted(allowed))}")
        if key in out:
            raise BadRequest(f"parameter '{key}' given twice")
        out[key] = value
    return out


def _int(params: dict[str, str], name: str, *, low: int, high: int = MAX_ID) -> int | None:
    raw = params.get(name)
    if raw is None:
        return None
    try:
        return parse_int(raw, low=low, high=high)
    except OutOfRange:
        if high != MAX_ID:
            bound = f"between {low} and {high}"
        elif raw.startswith("-") or not raw.strip("+0"):  # below low (low is 0 or 1 here)
            bound = f"at least {low}"
        else:
            bound = f"at most {high}"
        raise BadRequest(f"parameter '{name}' must be {bound}") from None
    except ValueError:
        raise BadRequest(f"parameter '{name}' must be an integer, not '{raw[:40]}'") from None


def _deployment_id(request: Request) -> int:
    raw = request.path_params["id"]
    try:
        return parse_int(raw, low=1, signed=False)
    except ValueError:  # no deployment has that id, whatever it is
        raise HTTPException(404, f"no deployment {raw[:40]}") from None


# ---- health -----------------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def _ping_database(store: Store) -> None:
    store.ping()


async def readyz(request: Request) -> Response:
    c = ctx(request)
    database = "ok"
    try:
        await asyncio.wait_for(
            read_in_thread(_ping_database, c.control.store), timeout=c.ready_timeout
        )
    except TimeoutError:
        database = f"no answer within {c.ready_timeout:g} s"
    except Exception as exc:
        database = _one_line(exc)
    fetch_error = c.control.last_fetch_error()
    if c.control.is_ready():
        repository = "ok"
    else:
        repository = f"not fetched yet: {fetch_error}" if fetch_error else "not fetched yet"
    body: dict[str, Any] = {"status": "ready", "database": database, "repository": repository}
    if database != "ok":
        body.update(status="unavailable", error=f"database: {database}")
    elif repository != "ok":
        body.update(status="unavailable", error=f"repository: {repository}")
    elif fetch_error:
        body["last_fetch_error"] = fetch_error
    return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)


async def metrics(request: Request) -> Response:
    return Response(ctx(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


# ---- read API ---------------------------------------------------------------------------


async def status(request: Request) -> Response:
    params = _params(request, {"env"})
    commit, decisions = await ctx(request).control.status(params.get("env") or None)
    return JSONResponse([d.status_json(commit) for d in decisions])


def _blame(control: Control, environment: str, service: str) -> dict[str, Any]:
    with open_source(control.config) as source:
        return find_blame(control.store, source, environment, service).to_json()


async def replicas(request: Request) -> Response:
    """`GET /api/v1/replicas`: as `reconciler status --replicas --json`."""
    _params(request, ())
    control = ctx(request).control
    body = await db(control.store.replicas_report, control.config.daemon.lease_ttl)
    return JSONResponse(body)


async def blame(request: Request) -> Response:
    """`GET /api/v1/blame?env=&service=`: as `reconciler blame --json`."""
    params = _params(request, {"env", "service"})
    missing = [name for name in ("env", "service") if not params.get(name)]
    if missing:
        raise BadRequest(f"parameter '{missing[0]}' is required")
    try:
        body = await db(_blame, ctx(request).control, params["env"], params["service"])
    except BlameError as exc:
        raise HTTPException(404 if exc.code == 2 else 409, str(exc)) from None
    except SourceError as exc:  # the mirror cannot be read (not fetched yet, broken)
        raise HTTPException(503, str(exc)) from None
    return JSONResponse(body)


def _since(raw: str | None) -> datetime | None:
    """A time (2026-11-26T10:00:00Z, 2026-11-26) or an age (2h, 7d), as `history --since`."""
    if raw is None:
        return None
    try:
        return parse_since(raw)
    except ValueError:
        raise BadRequest(f"parameter 'since' must be {SINCE_HELP}") from None


HISTORY_PARAMS = frozenset({"env", "service", "status", "since", "limit", "before"})


@dataclass(frozen=True)
class HistoryQuery:
    """The filters of `GET /api/v1/deployments` (and of the dashboard's history page)."""

    environment: str | None
    service: str | None
    status: str | None
    since: datetime | None
    limit: int
    before_id: int | None

    def read(self, store: Store) -> list[DeploymentRecord]:
        return store.history(
            environment=self.environment,
            service=self.service,
            status=self.status,
            since=self.since,
            limit=self.limit,
            before_id=self.before_id,
        )


def history_query(params: dict[str, str]) -> HistoryQuery:
    """`HistoryQuery` from query parameters (`_params(request, HISTORY_PARAMS)`); 400 if bad."""
    status_filter = params.get("status")
    if status_filter is not None and status_filter not in STATUSES:
        raise BadRequest(f"parameter 'status' must be one of {', '.join(STATUSES)}")
    return HistoryQuery(
        environment=params.get("env") or None,
        service=params.get("service") or None,
        status=status_filter,
        since=_since(params.get("since")),
        limit=_int(params, "limit", low=1, high=MAX_LIMIT) or DEFAULT_LIMIT,
        before_id=_int(params, "before", low=1),
    )


async def deployments(request: Request) -> Response:
    params = _params(request, HISTORY_PARAMS)
    query = history_query(params)
    records = await db(query.read, ctx(request).control.store)
    headers = {}
    if len(records) == query.limit:
        following = {k: v for k, v in params.items() if k != "before"}
        following["before"] = str(records[-1].id)
        headers["Link"] = f'<{request.url.path}?{urlencode(following)}>; rel="next"'
    return JSONResponse([r.to_json() for r in records], headers=headers)


# A run's log can be large (up to the capture cap, far more for runs recorded before it):
# a deployment carries only its tail, and `/log` pages the rest, each bounded in lines and
# bytes and read off the loop, so that no request builds a large body.
LOG_TAIL_LINES = 200
LOG_TAIL_BYTES = 64 * 1024
LOG_PAGE_LINES = 1000
LOG_PAGE_MAX_LINES = 10_000
LOG_PAGE_BYTES = 1024 * 1024
LOG_LINE_CHARS = 16 * 1024
MAX_OFFSET = 2**31 - 1


def _log_url(dep_id: int) -> str:
    return f"/api/v1/deployments/{dep_id}/log"


def _within(
    lines: list[LogLine], budget: int, *, from_end: bool, overhead: int = 1
) -> list[LogLine]:
    """The lines from one end that fit in ``budget`` bytes, counting ``overhead`` bytes
    around each (at least one line)."""
    kept: list[LogLine] = []
    size = 0
    for entry in reversed(lines) if from_end else lines:
        size += len(entry.line.encode()) + overhead
        if size > budget and kept:
            break
        kept.append(entry)
    return kept[::-1] if from_end else kept


def deployment_and_tail(
    store: Store, dep_id: int
) -> tuple[DeploymentRecord, int, list[LogLine]] | None:
    """(the deployment with its progress, its log's line count, the log's tail) or None."""
    record = store.get_deployment(dep_id, with_progress=True)
    if record is None:
        return None
    total, tail = store.log_tail(dep_id, LOG_TAIL_LINES, max_chars=LOG_LINE_CHARS)
    return record, total, _within(tail, LOG_TAIL_BYTES, from_end=True)


def _deployment_detail(store: Store, dep_id: int) -> dict[str, Any] | None:
    found = deployment_and_tail(store, dep_id)
    if found is None:
        return None
    record, total, tail = found
    body = replace(record, log=tail).to_json()
    body.update(
        log_lines=total,
        log_truncated=len(tail) < total,
        log_url=_log_url(dep_id),
    )
    return body


async def deployment(request: Request) -> Response:
    _params(request, ())
    dep_id = _deployment_id(request)
    body = await db(_deployment_detail, ctx(request).control.store, dep_id)
    if body is None:
        raise HTTPException(404, f"no deployment {dep_id}")
    return JSONResponse(body)


def _log_page(store: Store, dep_id: int, offset: int, limit: int) -> dict[str, Any] | None:
    if store.get_deployment(dep_id) is None:
        return None
    # One line more than asked says whether there is a next page.
    lines = store.log_page(dep_id, offset, limit + 1, max_chars=LOG_LINE_CHARS)
    # Each line is an object of about 64 bytes besides the line itself (stream, at, quotes).
    page = _within(lines[:limit], LOG_PAGE_BYTES, from_end=False, overhead=64)
    more = len(page) < len(lines)
    return {
        "deployment_id": dep_id,
        "offset": offset,
        "lines": [{"stream": e.stream, "line": e.line, "at": format_time(e.at)} for e in page],
        "next_offset": offset + len(page) if more else None,
    }


async def deployment_log(request: Request) -> Response:
    params = _params(request, {"offset", "limit"})
    dep_id = _deployment_id(request)
    offset = _int(params, "offset", low=0, high=MAX_OFFSET) or 0
    limit = _int(params, "limit", low=1, high=LOG_PAGE_MAX_LINES) or LOG_PAGE_LINES
    body = await db(_log_page, ctx(request).control.store, dep_id, offset, limit)
    if body is None:
        raise HTTPException(404, f"no deployment {dep_id}")
    headers = {}
    if body["next_offset"] is not None:
        query = urlencode({"offset": body["next_offset"], "limit": limit})
        headers["Link"] = f'<{_log_url(dep_id)}?{query}>; rel="next"'
    return JSONResponse(body, headers=headers)


async def deployment_stream(request: Request) -> Response:
    c = ctx(request)
    _params(request, ())
    dep_id = _deployment_id(request)
    raw = request.headers.get("last-event-id", "").strip()
    last_id = 0
    if raw:
        try:
            last_id = parse_int(raw, signed=False)
        except ValueError:
            raise BadRequest(f"Last-Event-ID must be an event id, not '{raw[:40]}'") from None
    if await db(c.control.store.get_deployment, dep_id) is None:
        raise HTTPException(404, f"no deployment {dep_id}")
    return StreamingResponse(
        deployment_events(c.feeds, dep_id, last_event_id=last_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# ---- changing things --------------------------------------------------------------------


def _drain_limit(limit: int) -> int:
    # Past the limit a body is still read (and dropped) up to this size, so that the client
    # can read the 413 on a clean connection; a bigger one has the connection closed on it.
    return 2 * limit + 65536


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None when it is larger than ``limit`` (announced or actually sent)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise BadRequest("Content-Length must be a number of bytes")
        if int(declared) > _drain_limit(limit):
            return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            chunks.clear()
            if size > _drain_limit(limit):
                return None
            continue
        chunks.append(chunk)
    return None if size > limit else b"".join(chunks)


def _bearer_ok(header: str | None, token: str) -> bool:
    if not header:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


BEARER_CHALLENGE = 'Bearer realm="reconciler"'


async def _authorize(request: Request) -> Response | None:
    """None when the request carries the configured bearer token, else the refusal."""
    c = ctx(request)
    server = c.control.config.server
    if not server.token_file:
        return error(403, "no token configured: set server.token_file")
    try:
        token = c.control.config.read_secret(server.token_file)
    except ConfigError as exc:
        log.error("event=http_token_unreadable error=%r", str(exc))
        return error(503, "the API token cannot be read: see the daemon's log")
    header = request.headers.get("authorization")
    if not header:
        return error(
            401,
            "missing bearer token: send Authorization: Bearer <token>",
            {"WWW-Authenticate": BEARER_CHALLENGE},
        )
    if not _bearer_ok(header, token):
        log.warning("event=http_unauthorized path=%s client=%s", request.url.path, _client(request))
        return error(
            401,
            "wrong bearer token",
            {"WWW-Authenticate": BEARER_CHALLENGE + ', error="invalid_token"'},
        )
    return None


M = TypeVar("M", bound=BaseModel)


async def _authorized_body(request: Request, model: type[M]) -> M | Response:
    """A changing request: no query parameters, the bearer token, then the body as
    `model`; or the refusal to answer with."""
    _params(request, ())
    refused = await _authorize(request)
    if refused is not None:
        return refused
    return await _body(request, model)


async def _body(request: Request, model: type[M]) -> M | Response:
    """The JSON body as `model` (an empty body is the model's defaults), or the 4xx."""
    try:
        body = await _read_body(request, SYNC_BODY_MAX)
    except ClientDisconnect:
        return error(400, "the client went away while sending the body")
    if body is None:
        return error(413, f"body larger than {SYNC_BODY_MAX} bytes")
    try:
        return model.model_validate_json(body) if body.strip() else model()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = str(first["msg"])
        return error(400, f"bad body: {where + ': ' if where else ''}{message}")


async def sync(request: Request) -> Response:
    c = ctx(request)
    req = await _authorized_body(request, SyncRequest)
    if isinstance(req, Response):
        return req
    if req.service is not None:
        if not req.environment:
            return error(400, "bad body: service needs environment")
        try:
            await c.control.retry(req.environment, req.service, origin=_origin(request))
        except KeyError:
            return error(404, f"no service {req.service} in environment {req.environment}")
    elif req.environment is not None and c.control.is_ready():
        _, decisions = await c.control.status(req.environment)
        if not decisions:
            return error(404, f"no environment {req.environment}")
    c.control.request_sync("manual")
    if req.service is None and c.control.is_ready():
        _record_forced_sync(c.control, req.environment, _origin(request))
    log.info(
        "event=http_sync environment=%s service=%s client=%s",
        req.environment or "-",
        req.service or "-",
        _client(request),
    )
    return JSONResponse({"status": "accepted"}, status_code=202)


async def _act(request: Request, action: DeployAction | RollbackAction | SuspendAction) -> Response:
    """Have the daemon carry out an operator action, recorded with the token's holder."""
    c = ctx(request)
    holder = c.control.config.server.token_holder
    try:
        accepted = await c.control.act(action, holder, origin=_origin(request))
    except Refused as exc:
        return error(exc.status, str(exc))
    log.info(
        "event=http_action action=%s environment=%s actor=%s client=%s",
        action.action,
        action.environment,
        holder,
        _client(request),
    )
    return JSONResponse(
        {"status": "accepted", "message": accepted.message, "warnings": accepted.warnings},
        status_code=202,
    )


async def deploy(request: Request) -> Response:
    req = await _authorized_body(request, DeployRequest)
    if isinstance(req, Response):
        return req
    return await _act(
        request,
        DeployAction(
            environment=req.environment,
            version=req.version,
            services=[req.service],
            reason=req.reason,
        ),
    )


async def rollback(request: Request) -> Response:
    req = await _authorized_body(request, RollbackRequest)
    if isinstance(req, Response):
        return req
    return await _act(
        request,
        RollbackAction(
            environment=req.environment, service=req.service, to=req.to, reason=req.reason
        ),
    )


async def suspend(request: Request) -> Response:
    return await _suspend_or_resume(request, "suspend")


async def resume(request: Request) -> Response:
    return await _suspend_or_resume(request, "resume")


async def _suspend_or_resume(request: Request, which: Literal["suspend", "resume"]) -> Response:
    req = await _authorized_body(request, SuspendRequest)
    if isinstance(req, Response):
        return req
    env = request.path_params["env"]
    if not ENV_NAME.fullmatch(env):
        return error(404, f"no environment {env[:63]}")
    return await _act(request, SuspendAction(action=which, environment=env, reason=req.reason))


ENV_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _client(request: Request) -> str:
    return request.client.host if request.client else "-"


#: Forced syncs being recorded (a reference keeps each task alive until it is done).
_recording: set[asyncio.Task[None]] = set()


def _record_forced_sync(control: Control, environment: str | None, origin: str) -> None:
    """Record an operator's forced sync (the audit ledger) without holding up the answer:
    the sync is requested already, and a busy database must not make the client wait."""

    async def record() -> None:
        try:
            await asyncio.to_thread(
                control.store.record_operator_action,
                environment=environment or "*",
                service=None,
                action="sync",
                actor=control.config.server.token_holder,
                note=None,
                at=datetime.now(UTC),
                origin=origin,
            )
        except Exception as exc:
            log.error("event=audit_error error=%r", f"{type(exc).__name__}: {exc}".splitlines()[0])

    task = asyncio.get_running_loop().create_task(record())
    _recording.add(task)
    task.add_done_callback(_recording.discard)


def _origin(request: Request) -> str:
    """Where an operator action came from, as the audit ledger records it."""
    return f"http {_client(request)}"


async def git_hook(request: Request) -> Response:
    c = ctx(request)
    server = c.control.config.server

    def refuse(result: str, status_code: int, message: str, **headers: str) -> Response:
        c.metrics.webhook(result)
        log.warning(
            "event=webhook result=%s client=%s reason=%r", result, _client(request), message
        )
        return error(status_code, message, headers or None)

    if not server.webhook_secret_file:
        return refuse("unavailable", 503, "webhooks are off: set server.webhook_secret_file")
    try:
        body = await _read_body(request, server.webhook_max_bytes)
    except HTTPException as exc:
        return refuse("bad_request", 400, str(exc.detail))
    except ClientDisconnect:
        return refuse("bad_request", 400, "the client went away while sending the body")
    if body is None:
        return refuse("too_large", 413, f"body larger than {server.webhook_max_bytes} bytes")
    if not any(
        h in request.headers
        for h in ("x-hub-signature-256", "x-gitlab-token", "x-reconciler-signature-256")
    ):
        return refuse("unauthorized", 401, UNSIGNED)
    try:
        secret = c.control.config.read_secret(server.webhook_secret_file)
    except ConfigError as exc:
        log.error("event=webhook_secret_unreadable error=%r", str(exc))
        return refuse("unavailable", 503, "the webhook secret cannot be read: see the daemon's log")
    outcome = c.webhooks.receive(
        secret,
        request.headers,
        body,
        branch=c.control.config.repository.branch,
        replay_window=server.webhook_replay_window,
    )
    c.metrics.webhook(outcome.result)
    level = (
        logging.INFO if outcome.result in ("accepted", "ignored", "duplicate") else logging.WARNING
    )
    log.log(
        level,
        "event=webhook result=%s sender=%s delivery=%s client=%s reason=%r",
        outcome.result,
        outcome.sender or "-",
        outcome.delivery or "-",
        _client(request),
        outcome.message,
    )
    if outcome.result == "accepted":
        c.control.request_sync("webhook")
    return JSONResponse(outcome.to_json(), status_code=outcome.status_code)
