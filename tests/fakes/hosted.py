"""Fake Vercel, Netlify and Railway API servers: real HTTP on 127.0.0.1, faithful to the
documented endpoints, payload shapes and state machines.

* States advance with time: a deployment moves one state every `step` seconds.
* A version ending in `-fail` ends in the platform's failure state (ERROR / error / FAILED)
  with an error text; one ending in `-hang` stays building until cancelled.
* A wrong token is refused (401; Railway: a GraphQL error with HTTP 200).
* `throttle(n, retry_after)` answers the next n requests 429 with `Retry-After`;
  `lose_answer(method, path)` performs the next matching request but answers 502.
* Every request is recorded (method, path, query, headers, body) for the tests to check.
"""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from graphql import GraphQLError, build_schema, graphql_sync

Response = tuple[int, Any, dict[str, str]]


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class HttpError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        self.status, self.body = status, body


@dataclass
class Run:
    """A platform deployment whose state is a function of the time since its creation."""

    id: str
    version: str
    states: list[str]
    final: str
    created: float = field(default_factory=time.monotonic)
    forced: str | None = None
    applied: bool = False
    data: dict[str, Any] = field(default_factory=dict)

    def state(self, step: float) -> str:
        if self.forced is not None:
            return self.forced
        i = int((time.monotonic() - self.created) / step)
        return self.states[i] if i < len(self.states) else self.final


class FakeServer:
    """A threaded HTTP server dispatching to `handle`; one lock serialises the fake's state."""

    prefix = ""

    def __init__(self, token: str, step: float = 0.05) -> None:
        self.token, self.step = token, step
        self.requests: list[Request] = []
        self.lock = threading.RLock()
        self._throttle: list[tuple[int, float, str | None]] = []
        self._lose: list[tuple[str, str, bytes]] = []
        self.runs: list[Run] = []
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> str:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, payload, headers = fake.dispatch(
                    self.command, self.path, dict(self.headers.items()), body
                )
                data = b"" if payload is None else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a run stopped mid-call)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self.url

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}{self.prefix}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # ------------------------------------------------------------------ faults
    def throttle(
        self, n: int, retry_after: float, status: int = 429, path: str | None = None
    ) -> None:
        """The next n requests (to `path`, else any) are answered `status` (429, 503) with
        `Retry-After`, without being performed."""
        with self.lock:
            self._throttle += [(status, retry_after, path)] * n

    def lose_answer(self, method: str, path: str, containing: bytes = b"") -> None:
        """The next `method path` (whose body contains `containing`) is performed, but its
        answer is a 502."""
        with self.lock:
            self._lose.append((method, path, containing))

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, method: str, raw: str, headers: dict[str, str], body: bytes) -> Response:
        parts = urlsplit(raw)
        path = parts.path.removeprefix(self.prefix) or "/"
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        lower = {k.lower(): v for k, v in headers.items()}
        with self.lock:
            self.requests.append(Request(method, path, query, lower, body, time.monotonic()))
            hit = next((t for t in self._throttle if t[2] in (None, path)), None)
            if hit is not None:
                self._throttle.remove(hit)
                status, after, _ = hit
                text = "Too Many Requests" if status == 429 else "Service Unavailable"
                return (
                    status,
                    {"error": {"code": "throttled", "message": text}},
                    {"Retry-After": f"{after:g}"},
                )
            self.advance()
            try:
                status, payload = self.handle(method, path, query, lower, body)
            except HttpError as exc:
                return exc.status, exc.body, {}
            lost = next((x for x in self._lose if x[:2] == (method, path) and x[2] in body), None)
            if lost is not None:
                self._lose.remove(lost)
                return 502, {"message": "Bad Gateway"}, {}
            return status, payload, {}

    def handle(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: bytes
    ) -> tuple[int, Any]:
        raise NotImplementedError

    def advance(self) -> None:
        """Apply the effects of deployments that reached their final state (in order)."""
        for run in self.runs:
            if not run.applied and run.state(self.step) == run.final and run.forced is None:
                run.applied = True
                self.finished(run)

    def finished(self, run: Run) -> None:
        pass

    def authorized(self, headers: dict[str, str]) -> bool:
        return headers.get("authorization") == f"Bearer {self.token}"

    def sent(self, method: str | None = None, path: str | None = None) -> list[Request]:
        with self.lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method) and (path is None or r.path == path)
            ]

    def wait(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > end:
                raise AssertionError("fake: condition not reached")
            time.sleep(self.step / 2)


def _outcome(
    version: str, states: list[str], ok: str, bad: str, hang: str
) -> tuple[list[str], str]:
    if version.endswith("-fail"):
        return states, bad
    if version.endswith("-hang"):
        return states, hang
    return states, ok


# ============================================================================ Vercel


class FakeVercel(FakeServer):
    """Vercel REST API: /v2/user, /v9/projects, /v13/deployments, /v6/deployments,
    /v3/deployments/{id}/events, /v12/deployments/{id}/cancel, /v1/projects/{id}/rollback,
    /v10/projects/{id}/promote. After an instant rollback, new production deployments are
    not auto-assigned the production domains until one is promoted."""

    STATES = ["QUEUED", "INITIALIZING", "BUILDING", "BUILDING"]

    def __init__(self, token: str, step: float = 0.05, team_id: str | None = None) -> None:
        super().__init__(token, step)
        self.team_id = team_id
        self.project: dict[str, Any] = {"id": "prj_web1", "name": "web", "auto_assign": True}
        self.production: Run | None = None
        self.repo = ("acme", "web")

    def _dep(self, run: Run) -> dict[str, Any]:
        state = run.state(self.step)
        out = {
            "id": run.id,
            "uid": run.id,
            "name": self.project["name"],
            "url": f"web-{run.id[4:]}.vercel.app",
            "projectId": self.project["id"],
            "target": "production",
            "readyState": state,
            "state": state,
            "createdAt": int(run.data["created_ms"]),
            "created": int(run.data["created_ms"]),
            "meta": {
                "githubCommitRef": run.version,
                "githubOrg": self.repo[0],
                "githubRepo": self.repo[1],
            },
        }
        if state == "ERROR":
            out["errorMessage"] = run.data.get("error", 'Command "npm run build" exited with 1')
            out["errorCode"] = "BUILD_FAILED"
        return out

    def _project(self) -> dict[str, Any]:
        p = {"id": self.project["id"], "name": self.project["name"], "targets": {}}
        if self.production is not None:
            p["targets"] = {"production": self._dep(self.production)}
        p["lastRollbackTarget"] = (
            None if self.project["auto_assign"] else {"jobStatus": "succeeded"}
        )
        return p

    def _run(self, dep_id: str) -> Run:
        for run in self.runs:
            if run.id == dep_id:
                return run
        raise HttpError(404, {"error": {"code": "not_found", "message": "Deployment not found"}})

    def finished(self, run: Run) -> None:
        if run.final == "READY" and self.project["auto_assign"]:
            self.production = run

    def create(self, version: str, ready: bool = False) -> Run:
        states, final = _outcome(version, self.STATES, "READY", "ERROR", "BUILDING")
        run = Run(f"dpl_{len(self.runs) + 1:04d}", version, [] if ready else states, final)
        run.data["created_ms"] = time.time() * 1000
        self.runs.append(run)
        return run

    def set_live(self, version: str) -> None:
        """Out of band (someone deployed from the dashboard)."""
        with self.lock:
            run = self.create(version, ready=True)
            run.applied = True
            self.production = run

    def live_version(self) -> str | None:
        with self.lock:
            self.advance()
            return self.production.version if self.production else None

    def in_flight(self) -> list[str]:
        with self.lock:
            return [
                r.id for r in self.runs if r.state(self.step) not in ("READY", "ERROR", "CANCELED")
            ]

    def handle(self, method, path, query, headers, body):  # type: ignore[no-untyped-def]
        if not self.authorized(headers):
            raise HttpError(
                401,
                {"error": {"code": "forbidden", "message": "Not authorized", "invalidToken": True}},
            )
        if self.team_id is not None and path != "/v2/user" and query.get("teamId") != self.team_id:
            raise HttpError(404, {"error": {"code": "not_found", "message": "Project not found"}})
        seg = path.strip("/").split("/")
        if (method, path) == ("GET", "/v2/user"):
            return 200, {"user": {"id": "usr_1", "username": "ada", "email": "ada@example.com"}}
        if method == "GET" and seg[:2] == ["v9", "projects"] and len(seg) == 3:
            if seg[2] not in (self.project["id"], self.project["name"]):
                raise HttpError(
                    404, {"error": {"code": "not_found", "message": "Project not found"}}
                )
            return 200, self._project()
        if (method, path) == ("POST", "/v13/deployments"):
            b = json.loads(body)
            git = b.get("gitSource") or {}
            if b.get("target") != "production" or git.get("type") != "github":
                raise HttpError(
                    400, {"error": {"code": "bad_request", "message": "Invalid request"}}
                )
            if (git.get("org"), git.get("repo")) != self.repo or not git.get("ref"):
                raise HttpError(
                    400,
                    {
                        "error": {
                            "code": "incorrect_git_source_info",
                            "message": "Repository not found",
                        }
                    },
                )
            return 200, self._dep(self.create(git["ref"]))
        if method == "GET" and seg[:2] == ["v13", "deployments"] and len(seg) == 3:
            return 200, self._dep(self._run(seg[2]))
        if method == "GET" and seg[:2] == ["v3", "deployments"] and seg[-1] == "events":
            run = self._run(seg[2])
            state = run.state(self.step)
            lines = [
                f"Cloning github.com/{'/'.join(self.repo)} (Branch: {run.version})",
                'Running "npm run build"',
            ]
            if state == "ERROR":
                lines.append('Error: Command "npm run build" exited with 1')
            if state == "READY":
                lines.append("Build Completed")
            return 200, [
                {
                    "type": "stderr" if line.startswith("Error") else "stdout",
                    "created": 1,
                    "payload": {"id": f"{run.id}-{i}", "text": line, "date": 1},
                }
                for i, line in enumerate(lines)
            ]
        if method == "PATCH" and seg[:2] == ["v12", "deployments"] and seg[-1] == "cancel":
            run = self._run(seg[2])
            if run.state(self.step) in ("READY", "ERROR", "CANCELED"):
                raise HttpError(
                    400,
                    {
                        "error": {
                            "code": "bad_request",
                            "message": "Cannot cancel a finished deployment",
                        }
                    },
                )
            run.forced = "CANCELED"
            return 200, self._dep(run)
        if (method, path) == ("GET", "/v6/deployments"):
            if query.get("projectId") != self.project["id"]:
                return 200, {"deployments": [], "pagination": {"count": 0}}
            deps = [self._dep(r) for r in reversed(self.runs)]
            return 200, {"deployments": deps, "pagination": {"count": len(deps), "next": None}}
        if (
            method == "POST"
            and seg[0] in ("v1", "v10")
            and seg[1] == "projects"
            and seg[3] in ("rollback", "promote")
        ):
            run = self._run(seg[4])
            if seg[2] != self.project["id"] or run.state(self.step) != "READY":
                raise HttpError(
                    422, {"error": {"code": "not_ready", "message": "Deployment is not READY"}}
                )
            self.production = run
            self.project["auto_assign"] = seg[3] == "promote"
            return 201, None
        raise HttpError(
            404, {"error": {"code": "not_found", "message": f"no route {method} {path}"}}
        )


# ============================================================================ Netlify


class FakeNetlify(FakeServer):
    """Netlify API v1: /user, /sites/{id}, /sites/{id}/deploys (zip), /deploys/{id},
    /deploys/{id}/cancel, /sites/{id}/deploys/{id}/restore (422 unless the deploy is ready)."""

    prefix = "/api/v1"
    STATES = ["uploading", "uploaded", "preparing", "prepared", "processing"]

    def __init__(self, token: str, step: float = 0.05) -> None:
        super().__init__(token, step)
        self.site = {"id": "5a1e-site", "name": "acme-web"}
        self.published: Run | None = None
        self.locked = False  # auto publishing locked

    def _deploy(self, run: Run) -> dict[str, Any]:
        state = run.state(self.step)
        return {
            "id": run.id,
            "site_id": self.site["id"],
            "title": run.version,
            "state": state,
            "error_message": run.data.get("error") if state == "error" else None,
            "created_at": run.data["created_at"],
            "deploy_url": f"https://{run.id}--acme-web.netlify.app",
            "context": "production",
        }

    def _run(self, deploy_id: str) -> Run:
        for run in self.runs:
            if run.id == deploy_id:
                return run
        raise HttpError(404, {"code": 404, "message": "Not Found"})

    def finished(self, run: Run) -> None:
        if run.final == "ready" and not self.locked:
            self.published = run

    def create(self, title: str, ready: bool = False) -> Run:
        states, final = _outcome(title, self.STATES, "ready", "error", "processing")
        run = Run(f"64d{len(self.runs) + 1:05d}", title, [] if ready else states, final)
        run.data["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        if final == "error":
            run.data["error"] = (
                "Failed during stage 'processing site': deploy directory 'dist' does not exist"
            )
        self.runs.append(run)
        return run

    def set_live(self, version: str) -> None:
        with self.lock:
            run = self.create(version, ready=True)
            run.applied = True
            self.published = run

    def live_version(self) -> str | None:
        with self.lock:
            self.advance()
            return self.published.version if self.published else None

    def in_flight(self) -> list[str]:
        with self.lock:
            return [r.id for r in self.runs if r.state(self.step) not in ("ready", "error")]

    def handle(self, method, path, query, headers, body):  # type: ignore[no-untyped-def]
        if not self.authorized(headers):
            raise HttpError(401, {"code": 401, "message": "Access Denied: your token is invalid"})
        seg = path.strip("/").split("/")
        if (method, path) == ("GET", "/user"):
            return 200, {"id": "u1", "email": "ada@example.com", "full_name": "Ada"}
        if seg[0] == "sites":
            if seg[1] != self.site["id"]:
                raise HttpError(404, {"code": 404, "message": "Not Found"})
            if method == "GET" and len(seg) == 2:
                pub = self._deploy(self.published) if self.published else None
                return 200, {
                    **self.site,
                    "published_deploy": pub,
                    "url": "https://acme-web.netlify.app",
                }
            if method == "POST" and seg[2:] == ["deploys"]:
                if headers.get("content-type") != "application/zip":
                    raise HttpError(422, {"code": 422, "message": "Unprocessable Entity"})
                try:
                    zipfile.ZipFile(io.BytesIO(body)).testzip()
                except zipfile.BadZipFile:
                    raise HttpError(422, {"code": 422, "message": "Invalid zip file"}) from None
                return 200, self._deploy(self.create(query.get("title", "")))
            if method == "GET" and seg[2:] == ["deploys"]:
                return 200, [self._deploy(r) for r in reversed(self.runs)]
            if method == "POST" and len(seg) == 5 and seg[4] == "restore":
                run = self._run(seg[3])
                if run.state(self.step) != "ready":
                    raise HttpError(
                        422, {"code": 422, "message": "Deploy is not ready and cannot be published"}
                    )
                self.published = run
                return 200, self._deploy(run)
        if seg[0] == "deploys":
            run = self._run(seg[1])
            if method == "GET" and len(seg) == 2:
                return 200, self._deploy(run)
            if method == "POST" and seg[2:] == ["cancel"]:
                if run.state(self.step) not in ("ready", "error"):
                    run.forced = "error"
                    run.data["error"] = "Canceled build"
                return 200, self._deploy(run)
        raise HttpError(404, {"code": 404, "message": "Not Found"})


# ============================================================================ Railway

SCHEMA = build_schema((Path(__file__).parent / "railway.graphql").read_text())


class FakeRailway(FakeServer):
    """Railway GraphQL v2, executed with graphql-core against the hand-written schema:
    documents that do not validate get their errors, auth failures are errors with HTTP 200."""

    prefix = "/graphql/v2"
    STATES = ["QUEUED", "INITIALIZING", "BUILDING", "DEPLOYING"]

    def __init__(self, token: str, step: float = 0.05, project_token: bool = False) -> None:
        super().__init__(token, step)
        self.project_token = project_token
        self.service, self.environment = "svc-7f3a", "env-prod-1"
        self.source_image: str | None = None
        self.invalid: list[str] = []  # validation errors of documents sent (should stay empty)

    def authorized(self, headers: dict[str, str]) -> bool:
        if self.project_token:
            return headers.get("project-access-token") == self.token
        return super().authorized(headers)

    def _node(self, run: Run) -> dict[str, Any]:
        state = run.state(self.step)
        return {
            "id": run.id,
            "status": state,
            "createdAt": run.data["created_at"],
            "serviceId": self.service,
            "environmentId": self.environment,
            "meta": {"image": run.data["image"], "reason": run.data.get("reason", "deploy")},
            "canRollback": bool(run.data.get("succeeded")) and state in ("SUCCESS", "REMOVED"),
            "canRedeploy": True,
            "staticUrl": "web-production.up.railway.app",
        }

    def finished(self, run: Run) -> None:
        if run.final == "SUCCESS":
            for other in self.runs:
                if other is not run and other.data.get("succeeded") and other.forced is None:
                    other.forced = "REMOVED"  # Railway removes the deployment it replaced
            run.data["succeeded"] = True

    def create(self, image: str, ready: bool = False, reason: str = "deploy") -> Run:
        tag = image.rpartition(":")[2]
        states, final = _outcome(tag, self.STATES, "SUCCESS", "FAILED", "BUILDING")
        run = Run(f"d{len(self.runs) + 1:03d}-9c1e", tag, [] if ready else states, final)
        run.data.update(
            image=image,
            reason=reason,
            created_at=time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        )
        self.runs.append(run)
        return run

    def set_live(self, version: str) -> None:
        with self.lock:
            self.source_image = f"ghcr.io/acme/web:{version}"
            run = self.create(self.source_image, ready=True)
            run.applied = True
            self.finished(run)

    def live_version(self) -> str | None:
        with self.lock:
            self.advance()
            for run in reversed(self.runs):
                if run.state(self.step) == "SUCCESS":
                    return run.version
            return None

    def in_flight(self) -> list[str]:
        with self.lock:
            done = ("SUCCESS", "FAILED", "CRASHED", "REMOVED")
            return [r.id for r in self.runs if r.state(self.step) not in done]

    def _find(self, dep_id: str) -> Run:
        for run in self.runs:
            if run.id == dep_id:
                return run
        raise GraphQLError("Deployment not found")

    # Root resolvers (graphql-core calls root_value attributes with (info, **args)).
    def _root(self) -> dict[str, Any]:
        def instance(info: Any, serviceId: str, environmentId: str) -> dict[str, Any]:
            if (serviceId, environmentId) != (self.service, self.environment):
                raise GraphQLError("ServiceInstance not found")
            return {
                "id": "si-1",
                "serviceId": serviceId,
                "serviceName": "web",
                "environmentId": environmentId,
                "source": {"image": self.source_image},
            }

        def deployments(
            info: Any, input: dict[str, Any], first: int | None = None, **_: Any
        ) -> dict[str, Any]:
            runs = [
                r
                for r in reversed(self.runs)
                if input.get("serviceId") in (None, self.service)
                and input.get("environmentId") in (None, self.environment)
            ]
            wanted = (input.get("status") or {}).get("in")
            nodes = [self._node(r) for r in runs]
            if wanted:
                nodes = [n for n in nodes if n["status"] in wanted]
            return {"edges": [{"cursor": n["id"], "node": n} for n in nodes[: first or None]]}

        def update(
            info: Any, serviceId: str, input: dict[str, Any], environmentId: str | None = None
        ) -> bool:
            instance(info, serviceId, environmentId or "")
            image = (input.get("source") or {}).get("image")
            if image:
                self.source_image = image  # staged: nothing deploys yet
            return True

        def deploy(
            info: Any, serviceId: str, environmentId: str, commitSha: str | None = None
        ) -> str:
            instance(info, serviceId, environmentId)
            if not self.source_image:
                raise GraphQLError("Service has no source")
            return self.create(self.source_image).id

        def cancel(info: Any, id: str) -> bool:
            run = self._find(id)
            if run.state(self.step) in ("SUCCESS", "FAILED", "CRASHED", "REMOVED"):
                raise GraphQLError("Deployment is not in progress")
            run.forced = "REMOVED"
            return True

        def rollback(info: Any, id: str) -> bool:
            run = self._find(id)
            if not self._node(run)["canRollback"]:
                raise GraphQLError("Deployment cannot be rolled back")
            self.source_image = run.data["image"]
            self.create(run.data["image"], reason="rollback")
            return True

        def logs(
            info: Any, deploymentId: str, limit: int | None = None, **_: Any
        ) -> list[dict[str, Any]]:
            run = self._find(deploymentId)
            out = [
                {"message": f"Pulling {run.data['image']}", "severity": "info", "timestamp": "t"}
            ]
            if run.state(self.step) == "FAILED":
                out.append(
                    {
                        "message": "Error: container exited with code 1 (health check failed)",
                        "severity": "error",
                        "timestamp": "t",
                    }
                )
            return out[: limit or None]

        return {
            "serviceInstance": instance,
            "deployments": deployments,
            "deployment": lambda info, id: self._node(self._find(id)),
            "buildLogs": logs,
            "serviceInstanceUpdate": update,
            "serviceInstanceDeployV2": deploy,
            "deploymentCancel": cancel,
            "deploymentRollback": rollback,
        }

    def handle(self, method, path, query, headers, body):  # type: ignore[no-untyped-def]
        if method != "POST" or path not in ("/", ""):
            raise HttpError(404, {"message": "Not Found"})
        if not self.authorized(headers):
            return 200, {
                "data": None,
                "errors": [{"message": "Not Authorized", "extensions": {"code": "UNAUTHORIZED"}}],
            }
        doc = json.loads(body)
        result = graphql_sync(
            SCHEMA, doc["query"], root_value=self._root(), variable_values=doc.get("variables")
        )
        out: dict[str, Any] = {"data": result.data}
        if result.errors:
            out["errors"] = [{"message": e.message} for e in result.errors]
            if result.data is None and not any(e.original_error for e in result.errors):
                self.invalid += [e.message for e in result.errors]
        return 200, out


def make_zip(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("index.html", text)
    return path


def serve(fake: FakeServer) -> Iterator[FakeServer]:
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
