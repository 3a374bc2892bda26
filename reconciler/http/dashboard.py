"""The dashboard (`GET /`, `/history`, `/deployments/{id}`): server-rendered, read-only HTML.

It shows what the read API shows, read the same way (`Control.status`, `HistoryQuery`,
`deployment_and_tail`, the log's pages), and works without JavaScript; one small script
makes a running deployment's page follow its events (`/api/v1/deployments/{id}/events`).
The overview is streamed (`pages.stream`): its first bytes leave before the fleet is read.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial, wraps
from typing import Any
from urllib.parse import quote, urlencode

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse

from reconciler.http import api, pages
from reconciler.http.control import Control
from reconciler.plan import Decision
from reconciler.store import STATUSES, Store, SyncRecord
from reconciler.store.records import SYNC_APPLIED_RESULTS, format_time

HTML = "text/html; charset=utf-8"
#: Syncs read to find the refusals since the last applied one.
RECENT_SYNCS = 20
#: Every state `status` knows, in the order the overview counts them.
STATES = (
    "failed",
    "invalid",
    "drifted",
    "deploying",
    "out_of_sync",
    "waiting",
    "suspended",
    "synced",
)
_CALM = frozenset({"synced", "suspended"})
_URL_SAFE = re.compile(r"[A-Za-z0-9._-]*")  # what valid names are made of
_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


def _quoted(name: str) -> str:
    """A name as a URL's query value (valid names need no quoting: the check is cheaper)."""
    return name if _URL_SAFE.fullmatch(name) else quote(name, safe="")


# ---- the chain-verified badge (wired by the ledger) -------------------------------------


@dataclass(frozen=True)
class LedgerStatus:
    """What the overview's chain badge says: verified or not, and one line of detail."""

    verified: bool
    detail: str


async def ledger_status(control: Control) -> LedgerStatus | None:
    """The badge's value: the daemon's latest walk of the audit ledger (`[audit]
    verify_interval`); None (no badge) before the first one or with the walks off."""
    check = control.ledger_check()
    if check is None:
        return None
    report, at = check.report, format_time(check.at)
    if report.ok:
        head = f", head entry {report.head.seq}" if report.head else ""
        return LedgerStatus(True, f"{report.entries:,} entries{head}, checked {at}")
    found = len(report.findings) + report.more
    first = report.findings[0].line()
    return LedgerStatus(False, f"{found:,} finding(s) at {at}, first: {first}")


# ---- overview ----------------------------------------------------------------------------


def html_errors(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """A page's refusals (bad parameter, unknown id, database away) as HTML pages."""

    @wraps(handler)
    async def page(request: Request) -> Response:
        try:
            return await handler(request)
        except HTTPException as exc:
            return await _error(exc.status_code, str(exc.detail))

    return page


def _summary(counts: Counter[str]) -> list[tuple[str, int]]:
    """(state, how many) for each state present, in `STATES` order."""
    return [(state, counts[state]) for state in STATES if counts[state]]


@dataclass
class EnvironmentView:
    name: str
    services: list[Decision] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    suspended: bool = False
    reason: str | None = None

    @property
    def calm(self) -> bool:
        """Nothing to look at: every service synced (or the environment suspended)."""
        return all(state in _CALM for state in self.counts)

    def summary(self) -> list[tuple[str, int]]:
        return _summary(self.counts)

    def rows(self) -> list[tuple[str, str, str, str, str, int | None, str]]:
        """(service, desired, deployed, state, why, last deployment id, its history's URL)
        for each service: the overview's hot loop, kept to plain tuples."""
        history = f"/history?env={_quoted(self.name)}&service="
        return [
            (
                d.service,
                d.desired or "-",
                d.deployed or "-",
                d.state,
                d.message,
                d.last_deployment_id,
                history + _quoted(d.service),
            )
            for d in self.services
        ]


@dataclass
class Fleet:
    commit: str | None
    environments: list[EnvironmentView]
    counts: Counter[str]

    def summary(self) -> list[tuple[str, int]]:
        return _summary(self.counts)

    @property
    def services(self) -> int:
        return sum(self.counts.values())


def group(commit: str | None, decisions: list[Decision], reasons: dict[str, str | None]) -> Fleet:
    """Decisions by environment, in the order status lists them."""
    envs: dict[str, EnvironmentView] = {}
    counts: Counter[str] = Counter()
    for decision in decisions:
        view = envs.get(decision.environment)
        if view is None:
            name = decision.environment
            view = envs[name] = EnvironmentView(
                name, suspended=name in reasons, reason=reasons.get(name)
            )
        view.services.append(decision)
        view.counts[decision.state] += 1
        counts[decision.state] += 1
    return Fleet(commit, list(envs.values()), counts)


@dataclass
class SyncView:
    """The latest sync and the refused ones since the last that applied, newest first."""

    last: SyncRecord | None
    refusals: list[SyncRecord]
    suspended: dict[str, str | None]
    fetch_error: str | None


def _syncs(store: Store) -> tuple[list[SyncRecord], dict[str, str | None]]:
    return store.list_syncs(RECENT_SYNCS), store.suspension_reasons()


async def _sync_view(control: Control) -> SyncView:
    syncs, reasons = await api.db(_syncs, control.store)
    refusals = []
    for sync in syncs:
        if sync.result in SYNC_APPLIED_RESULTS:
            break
        if sync.result == "refused":
            refusals.append(sync)
    return SyncView(syncs[0] if syncs else None, refusals, reasons, control.last_fetch_error())


async def _fleet(
    control: Control, environment: str | None, reasons: dict[str, str | None]
) -> Fleet:
    if not control.is_ready():
        error = control.last_fetch_error()
        raise HTTPException(
            503, "the repository is not fetched yet" + (f": {error}" if error else "")
        )
    commit, decisions = await control.status(environment)
    return group(commit, decisions, reasons)


@html_errors
async def overview(request: Request) -> Response:
    params = api._params(request, {"env"})
    environment = params.get("env") or None
    control = api.ctx(request).control
    body = pages.stream(
        "overview.html",
        title=f"{environment} · reconciler" if environment else "reconciler",
        page="overview",
        environment=environment,
        ledger=pages.Later(lambda: ledger_status(control)),
        syncs=pages.Later(lambda: _sync_view(control)),
        fleet=pages.Later(partial(_fleet, control, environment)),
    )
    return StreamingResponse(body, media_type=HTML, headers={"Cache-Control": "no-store"})


# ---- history -----------------------------------------------------------------------------


@html_errors
async def history(request: Request) -> Response:
    # A form sends its empty fields: they mean "any".
    raw = {k: v for k, v in api._params(request, api.HISTORY_PARAMS).items() if v.strip()}
    context: dict[str, Any] = {
        "title": "History · reconciler",
        "page": "history",
        "form": raw,
        "statuses": STATUSES,
        "records": [],
        "older": None,
        "newest": None,
        "error": None,
    }
    try:
        query = api.history_query(raw)
    except HTTPException as exc:
        context["error"] = str(exc.detail)
        return await _page("history.html", context, status=400)
    records = await api.db(query.read, api.ctx(request).control.store)
    filters = {k: v for k, v in raw.items() if k != "before"}
    if len(records) == query.limit:
        context["older"] = "/history?" + urlencode({**filters, "before": records[-1].id})
    if query.before_id is not None:
        context["newest"] = "/history" + (f"?{urlencode(filters)}" if filters else "")
    context["records"] = [r.to_json() for r in records]
    return await _page("history.html", context)


# ---- one deployment ----------------------------------------------------------------------


@html_errors
async def deployment(request: Request) -> Response:
    params = api._params(request, {"offset"})
    dep_id = api._deployment_id(request)
    store = api.ctx(request).control.store
    found = await api.db(api.deployment_and_tail, store, dep_id)
    if found is None:
        raise HTTPException(404, f"no deployment {dep_id}")
    record, total, tail = found
    context: dict[str, Any] = {
        "title": f"Deployment {dep_id} · reconciler",
        "page": "deployment",
        "record": record.to_json(),
        "terminal": record.terminal,
        "last_event_id": max((e.id for e in record.progress or ()), default=0),
        "log_total": total,
        "log_url": api._log_url(dep_id),
        "events_url": f"/api/v1/deployments/{dep_id}/events",
        "page_url": f"/deployments/{dep_id}",
    }
    if "offset" in params:  # a page of the whole log, as the log endpoint pages it
        offset = api._int(params, "offset", low=0, high=api.MAX_OFFSET) or 0
        page = await api.db(api._log_page, store, dep_id, offset, api.LOG_PAGE_LINES)
        assert page is not None  # the deployment exists (deployments are never deleted)
        context.update(
            log=page["lines"],
            log_offset=offset,
            log_next=page["next_offset"],
            log_previous=max(0, offset - api.LOG_PAGE_LINES) if offset else None,
        )
    else:  # the tail, followed live
        context.update(
            log=[{"stream": e.stream, "line": e.line} for e in tail],
            log_offset=total - len(tail),
            log_next=None,
            log_previous=None,
        )
    return await _page("deployment.html", context)


# ---- shared ------------------------------------------------------------------------------


async def _page(name: str, context: dict[str, Any], status: int = 200) -> Response:
    html = await pages.render(name, **context)
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})


async def _error(status: int, message: str) -> Response:
    return await _page(
        "error.html",
        {"title": f"{status} · reconciler", "page": None, "status": status, "message": message},
        status=status,
    )


async def static(request: Request) -> Response:
    name = request.path_params["name"]
    suffix = name[name.rfind(".") :] if "." in name else ""
    content = pages.static_file(name) if suffix in _STATIC_TYPES else None
    if content is None:
        raise HTTPException(404, f"no such file: {request.url.path}")
    return Response(
        content, media_type=_STATIC_TYPES[suffix], headers={"Cache-Control": "max-age=300"}
    )
