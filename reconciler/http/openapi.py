"""The OpenAPI 3.1 document of the HTTP API, its schemas generated from `schemas.py`."""

from __future__ import annotations

import functools
from typing import Any

from pydantic.json_schema import models_json_schema

from reconciler.http import schemas
from reconciler.store import STATUSES

API_VERSION = "1"
REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def _json(schema: dict[str, Any], description: str, **extra: Any) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}},
        **extra,
    }


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "Deployment id.",
    "schema": {"type": "integer", "minimum": 1},
}
_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]


_ENV = {
    "name": "env",
    "in": "path",
    "required": True,
    "description": "Environment name.",
    "schema": {"type": "string"},
}


def _action(
    summary: str, operation: str, body: str, *, required: bool, path: bool = False
) -> dict[str, Any]:
    """An operator action: bearer token, a JSON body, recorded with the token's holder."""
    return {
        "post": {
            "summary": summary,
            "description": (
                "Recorded as an operator action naming the token's holder "
                "(`server.token_holder`) and `reason`. The deployments run on after the answer."
            ),
            "operationId": operation,
            "security": _BEARER,
            **({"parameters": [_ENV]} if path else {}),
            "requestBody": {
                "required": required,
                "content": {"application/json": {"schema": _ref(body)}},
            },
            "responses": {
                "202": _json(_ref("ActionAccepted"), "Accepted: carried out by the daemon."),
                "400": _error("Bad body."),
                "401": _error("Missing or wrong bearer token."),
                "403": _error("No token configured: the endpoint is off."),
                "404": _error("Unknown environment or service."),
                "409": _error("Refused: no version to roll back to, or not synced yet."),
                "413": _error("Body too large."),
                "503": _error("Database unavailable."),
            },
        }
    }


def _page(
    summary: str,
    operation: str,
    parameters: list[dict[str, Any]],
    *,
    bad_request: bool = False,
    not_found: bool = False,
) -> dict[str, Any]:
    """A dashboard page (HTML; its errors are HTML pages too)."""
    html = {"text/html": {"schema": {"type": "string"}}}
    responses: dict[str, Any] = {"200": {"description": "HTML page.", "content": html}}
    if bad_request:
        responses["400"] = {"description": "Bad parameter (HTML).", "content": html}
    if not_found:
        responses["404"] = {"description": "No such deployment (HTML).", "content": html}
    return {
        "get": {
            "summary": summary,
            "operationId": operation,
            "parameters": parameters,
            "responses": responses,
        }
    }


def _paths() -> dict[str, Any]:
    status_enum = {"type": "string", "enum": list(STATUSES)}
    return {
        "/": _page(
            "Dashboard overview: environments and services (as `/api/v1/status`), the last "
            "sync with its file errors and refusals, suspended environments. Streamed.",
            "dashboard",
            [_query("env", "Only this environment.", {"type": "string"})],
        ),
        "/history": _page(
            "Dashboard history: deployments newest first, filtered as `/api/v1/deployments`.",
            "dashboardHistory",
            [
                _query("env", "Environment.", {"type": "string"}),
                _query("service", "Service.", {"type": "string"}),
                _query("status", "Status (empty: any).", {"type": "string"}),
                _query("since", "A time or an age (2h, 7d).", {"type": "string"}),
                _query("limit", "Rows per page.", {"type": "integer"}),
                _query("before", "Rows with a smaller id (next page).", {"type": "integer"}),
            ],
            bad_request=True,
        ),
        "/deployments/{id}": _page(
            "Dashboard page of one deployment: record, progress, log tail (followed live "
            "while it runs), or a page of the log from `offset`.",
            "dashboardDeployment",
            [_ID, _query("offset", "Show the log's lines from here.", {"type": "integer"})],
            bad_request=True,
            not_found=True,
        ),
        "/static/{name}": {
            "get": {
                "summary": "The dashboard's stylesheet and script.",
                "operationId": "dashboardStatic",
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {"description": "CSS or JavaScript."},
                    "404": _error("No such file."),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "The process lives.",
                "operationId": "health",
                "responses": {"200": _json(_ref("Health"), "Alive.")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Database reachable and repository fetched.",
                "operationId": "ready",
                "responses": {
                    "200": _json(_ref("Ready"), "Ready."),
                    "503": _json(_ref("Ready"), "Not ready; says which check fails."),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text exposition format).",
                "operationId": "metrics",
                "responses": {
                    "200": {
                        "description": "Metrics.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document.",
                "operationId": "openapi",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1 document.")},
            }
        },
        "/api/v1/status": {
            "get": {
                "summary": "Per service: desired, deployed, state, last commit (as `status --json`).",
                "operationId": "status",
                "parameters": [_query("env", "Only this environment.", {"type": "string"})],
                "responses": {
                    "200": _json(
                        {"type": "array", "items": _ref("StatusEntry")}, "One entry per service."
                    ),
                    "400": _error("Bad parameter."),
                    "503": _error("Database unavailable."),
                },
            }
        },
        "/api/v1/deployments": {
            "get": {
                "summary": "Deployments, newest first.",
                "operationId": "listDeployments",
                "parameters": [
                    _query("env", "Only this environment.", {"type": "string"}),
                    _query("service", "Only this service.", {"type": "string"}),
                    _query("status", "Only this status.", status_enum),
                    _query(
                        "since",
                        "Only deployments created at or after a time (2026-11-26T10:00:00Z) or within an age (2h, 7d).",
                        {"type": "string"},
                    ),
                    _query(
                        "limit",
                        "Page size (default 50).",
                        {"type": "integer", "minimum": 1, "maximum": 1000},
                    ),
                    _query(
                        "before",
                        "Only ids below this one (the next page's cursor).",
                        {"type": "integer", "minimum": 1},
                    ),
                ],
                "responses": {
                    "200": _json(
                        {"type": "array", "items": _ref("Deployment")},
                        "Deployments, newest first.",
                        headers={
                            "Link": {
                                "description": 'The next page, `<...?before=ID>; rel="next"`, when this page is full.',
                                "schema": {"type": "string"},
                            }
                        },
                    ),
                    "400": _error("Bad parameter."),
                    "503": _error("Database unavailable."),
                },
            }
        },
        "/api/v1/blame": {
            "get": {
                "summary": "The commit that set a service's desired version, and the deployment that applied it (as `blame --json`).",
                "operationId": "blame",
                "parameters": [
                    {**_query("env", "The environment.", {"type": "string"}), "required": True},
                    {**_query("service", "The service.", {"type": "string"}), "required": True},
                ],
                "responses": {
                    "200": _json(_ref("Blame"), "Who set the version, and what became of it."),
                    "400": _error("Bad or missing parameter."),
                    "404": _error("Unknown environment or service."),
                    "409": _error(
                        "Nothing to answer from yet (no sync), or the file's history was rewritten."
                    ),
                    "503": _error("Database unavailable."),
                },
            }
        },
        "/api/v1/replicas": {
            "get": {
                "summary": "The daemons sharing the database and their environment leases (as `status --replicas --json`).",
                "operationId": "replicas",
                "responses": {
                    "200": _json(_ref("Replicas"), "Replicas and leases."),
                    "400": _error("Bad parameter."),
                    "503": _error("Database unavailable."),
                },
            }
        },
        "/api/v1/deployments/{id}": {
            "get": {
                "summary": "One deployment, with its progress timeline and the tail of its log.",
                "description": (
                    "As `show --json`, except that `log` is only the log's last lines (at most "
                    "200 lines and 64 KiB); `log_lines`, `log_truncated` and `log_url` say how "
                    "much there is and where to page it."
                ),
                "operationId": "getDeployment",
                "parameters": [_ID],
                "responses": {
                    "200": _json(_ref("DeploymentDetail"), "The deployment."),
                    "404": _error("No such deployment."),
                    "503": _error("Database unavailable."),
                },
            }
        },
        "/api/v1/deployments/{id}/log": {
            "get": {
                "summary": "One deployment's log, a page at a time.",
                "description": (
                    "Lines `offset` to `offset + limit` of the run's log, at most 1 MiB "
                    "(a shorter page then: follow `next_offset`); a line longer than 16 KiB "
                    "ends with how much of it was cut."
                ),
                "operationId": "getDeploymentLog",
                "parameters": [
                    _ID,
                    _query(
                        "offset",
                        "First line (0-based; default 0).",
                        {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
                    ),
                    _query(
                        "limit",
                        "Lines per page (default 1000).",
                        {"type": "integer", "minimum": 1, "maximum": 10000},
                    ),
                ],
                "responses": {
                    "200": _json(
                        _ref("LogPage"),
                        "A page of the log.",
                        headers={
                            "Link": {
                                "description": 'The next page, `<...?offset=N&limit=L>; rel="next"`, unless this is the last.',
                                "schema": {"type": "string"},
                            }
                        },
                    ),
                    "400": _error("Bad parameter."),
                    "404": _error("No such deployment."),
                    "503": _error("Database unavailable."),
                },
            }
        },
        "/api/v1/deployments/{id}/events": {
            "get": {
                "summary": "Live progress as server-sent events.",
                "description": (
                    "First every recorded progress event, then new ones as they are recorded, "
                    "each as `id: <event id>`, `event: progress`, `data: <ProgressEvent JSON>`. "
                    "When the deployment has ended: `event: end` with the final Deployment JSON, "
                    "and the stream closes. `: ping` comments keep the connection open. "
                    "Send `Last-Event-ID` to resume after a given event."
                ),
                "operationId": "deploymentEvents",
                "parameters": [
                    _ID,
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "description": "Resume after this event id.",
                        "schema": {"type": "integer", "minimum": 0},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "An event stream; `data` is ProgressEvent or (event `end`) Deployment.",
                        "content": {
                            "text/event-stream": {
                                "schema": {"type": "string"},
                                "x-event-schemas": {
                                    "progress": _ref("ProgressEvent"),
                                    "end": _ref("Deployment"),
                                },
                            }
                        },
                    },
                    "400": _error("Bad Last-Event-ID."),
                    "404": _error("No such deployment."),
                },
            }
        },
        "/api/v1/sync": {
            "post": {
                "summary": "Reconcile now; with environment and service, retry a service that gave up.",
                "operationId": "sync",
                "security": _BEARER,
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": _ref("SyncRequest")}},
                },
                "responses": {
                    "202": _json(_ref("Accepted"), "Sync requested."),
                    "400": _error("Bad body."),
                    "401": _error("Missing or wrong bearer token."),
                    "403": _error("No token configured: the endpoint is off."),
                    "404": _error("Unknown environment or service."),
                    "413": _error("Body too large."),
                    "503": _error("Database unavailable."),
                },
            }
        },
        "/api/v1/deploy": _action(
            "Deploy a version of one service now (trigger `manual`); git wins at the next "
            "sync unless the environment is suspended.",
            "deploy",
            "DeployRequest",
            required=True,
        ),
        "/api/v1/rollback": _action(
            "Deploy the previous (or given) completed version of one service (trigger `rollback`).",
            "rollback",
            "RollbackRequest",
            required=True,
        ),
        "/api/v1/environments/{env}/suspend": _action(
            "Stop deploying to an environment (drift is still recorded).",
            "suspend",
            "SuspendRequest",
            required=False,
            path=True,
        ),
        "/api/v1/environments/{env}/resume": _action(
            "Deploy to an environment again.",
            "resume",
            "SuspendRequest",
            required=False,
            path=True,
        ),
        "/hooks/git": {
            "post": {
                "summary": "Git host webhook: a push to the tracked branch starts a fetch at once.",
                "description": (
                    "Authenticated by GitHub's `X-Hub-Signature-256`, GitLab's `X-Gitlab-Token`, "
                    "or `X-Reconciler-Signature-256: sha256=<hex HMAC-SHA256(secret, timestamp + "
                    '"." + delivery + "." + body)>` with `X-Reconciler-Timestamp` and '
                    '`X-Reconciler-Delivery` (without a delivery id: timestamp + "." + body). '
                    "Deliveries repeated within the replay window are answered `duplicate` and "
                    "ignored."
                ),
                "operationId": "gitWebhook",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {
                    "200": _json(_ref("WebhookReply"), "A duplicate delivery, ignored."),
                    "202": _json(_ref("WebhookReply"), "Accepted, or ignored with a reason."),
                    "400": _error("Malformed body."),
                    "401": _error("Unsigned."),
                    "403": _error("Bad signature or stale timestamp."),
                    "413": _error("Body too large."),
                    "503": _error("Webhooks are off."),
                },
            }
        },
    }


def component_schemas() -> dict[str, Any]:
    models: list[tuple[type[Any], Any]] = [(m, "serialization") for m in schemas.RESPONSE_MODELS]
    models += [(m, "validation") for m in schemas.REQUEST_MODELS]
    _, top = models_json_schema(models, ref_template=REF)
    defs: dict[str, Any] = top.get("$defs", {})
    return defs


@functools.cache
def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "reconciler",
            "version": API_VERSION,
            "description": (
                "Health, metrics, read API, operator actions and git webhooks of the "
                "reconciler daemon."
            ),
        },
        "paths": _paths(),
        "components": {
            "schemas": component_schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
