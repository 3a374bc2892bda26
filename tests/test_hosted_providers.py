"""vercel, netlify, railway: what each sends (method, path, body, headers), their rollback
paths, the HTTP discipline (429 with Retry-After, an unknown create outcome looked up, not
resent), through the real engine against the fake platforms of tests/fakes/hosted.py. The
behaviours every type shares (success, failure, deadline, cancel, refusal, drift, secrets)
are in the conformance suite (tests/test_conformance.py)."""

from __future__ import annotations

import json
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.config import ConfigError, load_config
from reconciler.providers import build_providers
from tests.conformance import Harness
from tests.fakes.backends import TOKEN, HostedBackend
from tests.fakes.hosted import FakeNetlify, FakeRailway, FakeServer, FakeVercel, Request
from tests.support import RECONCILER, cli_env

pytestmark = pytest.mark.timeout(60)


def started(fake: FakeServer) -> Iterator[FakeServer]:
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def vercel() -> Iterator[FakeServer]:
    yield from started(FakeVercel(TOKEN, team_id="team_acme"))


@pytest.fixture
def netlify() -> Iterator[FakeServer]:
    yield from started(FakeNetlify(TOKEN))


@pytest.fixture
def railway() -> Iterator[FakeServer]:
    yield from started(FakeRailway(TOKEN))


def harness(tmp_path: Path, kind: str, fake: FakeServer, **settings: Any) -> Harness:
    return Harness(tmp_path / "h", HostedBackend(kind, fake, tmp_path / "b", **settings))


def log_of(h: Harness, deployment_id: int) -> str:
    async def body(engine: Any) -> str:
        rec = engine.store.get_deployment(deployment_id, with_progress=True, with_log=True)
        return json.dumps(rec.to_json())

    text: str = h.run(body)
    return text


def bearer(r: Request) -> bool:
    return r.headers.get("authorization") == f"Bearer {TOKEN}"


# ------------------------------------------------------------------------------ vercel


def test_vercel_sends_a_production_deployment_of_the_ref_with_the_team(tmp_path, vercel):
    h = harness(tmp_path, "vercel", vercel, team_id="team_acme")
    history = h.deploy("1.0")
    assert history[0].status == "completed", history[0].error_message
    (create,) = vercel.sent("POST", "/v13/deployments")
    assert bearer(create) and create.query == {"teamId": "team_acme"}
    assert create.json() == {
        "name": "web",
        "project": "prj_web1",
        "target": "production",
        "gitSource": {"type": "github", "ref": "1.0", "org": "acme", "repo": "web"},
    }
    assert all(
        r.query.get("teamId") == "team_acme" for r in vercel.requests if r.path != "/v2/user"
    )
    assert vercel.sent("GET", "/v13/deployments/dpl_0001")  # followed readyState
    text = log_of(h, history[0].id)
    assert "Cloning github.com/acme/web (Branch: 1.0)" in text and "Build Completed" in text
    states = [p["details"].get("state") for p in json.loads(text)["progress"] if p["details"]]
    assert states[0] == "QUEUED" and states[-1] == "READY"


def test_vercel_rollback_after_a_failed_build_leaves_production_alone(tmp_path, vercel):
    h = harness(tmp_path, "vercel", vercel, team_id="team_acme")
    h.deploy("1.0", on_failure="rollback")
    history = h.deploy("1.1-fail", on_failure="rollback")
    assert [d.status for d in history[:2]] == ["completed", "rolled_back"]
    assert 'Command "npm run build" exited with 1' in history[1].error_message
    # The ERROR build never took the domains: nothing rebuilt, nothing rolled back (which
    # would switch auto-assignment off for nothing).
    assert len(vercel.sent("POST", "/v13/deployments")) == 2
    assert not [r for r in vercel.requests if "/rollback/" in r.path]
    assert vercel.live_version() == "1.0" and vercel.project["auto_assign"] is True
    assert "still serving production" in log_of(h, history[0].id)


def test_vercel_rollback_is_instant_and_the_next_deployment_is_promoted(tmp_path, vercel):
    h = harness(tmp_path, "vercel", vercel, team_id="team_acme")
    h.deploy("1.0")
    h.deploy("1.1")
    out = subprocess.run(
        [
            *RECONCILER,
            "--config",
            str(h.config),
            "rollback",
            "--env",
            "staging",
            "--service",
            "api",
        ],
        capture_output=True,
        text=True,
        cwd=h.tmp,
        env=cli_env(),
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    # Restored, not rebuilt: one instant rollback to 1.0's deployment.
    assert len(vercel.sent("POST", "/v13/deployments")) == 2
    assert vercel.sent("POST", "/v1/projects/prj_web1/rollback/dpl_0001")
    assert vercel.live_version() == "1.0" and vercel.project["auto_assign"] is False
    # Auto-assignment is off now: 1.2 becomes READY without the domains, so it is promoted.
    after = h.deploy("1.2")
    assert after[0].status == "completed", after[0].error_message
    assert vercel.sent("POST", "/v10/projects/prj_web1/promote/dpl_0003")
    assert vercel.live_version() == "1.2" and vercel.project["auto_assign"] is True
    assert "promoting it" in log_of(h, after[0].id)


def test_vercel_honours_retry_after_on_429(tmp_path, vercel):
    h = harness(tmp_path, "vercel", vercel, team_id="team_acme")
    vercel.throttle(2, 0.3)
    history = h.deploy("1.0")
    assert history[0].status == "completed", history[0].error_message
    first, second, third = vercel.requests[:3]
    assert (first.path, second.path, third.path) == ("/v2/user",) * 3
    assert second.at - first.at >= 0.3 and third.at - second.at >= 0.3


def test_vercel_429_longer_than_the_time_left_fails_at_once(tmp_path, vercel):
    h = harness(tmp_path, "vercel", vercel, team_id="team_acme")
    vercel.throttle(1, 3600)
    history = h.deploy("1.0")
    assert history[0].status == "failed"
    assert (
        "HTTP 429" in history[0].error_message
        and "deadline comes first" in history[0].error_message
    )
    assert not vercel.sent("POST", "/v13/deployments")


def test_vercel_create_with_a_lost_answer_is_looked_up_not_resent(tmp_path, vercel):
    h = harness(tmp_path, "vercel", vercel, team_id="team_acme")
    vercel.lose_answer("POST", "/v13/deployments")
    history = h.deploy("1.0")
    assert history[0].status == "completed", history[0].error_message
    assert len(vercel.sent("POST", "/v13/deployments")) == 1 and len(vercel.runs) == 1
    assert "outcome unknown" in log_of(h, history[0].id)
    assert vercel.live_version() == "1.0"


def test_vercel_wrong_project_is_refused_at_validation(tmp_path, vercel):
    h = harness(tmp_path, "vercel", vercel, team_id="team_acme")
    h.backend.params = lambda: {"project": "nope", "repo": "acme/web"}  # type: ignore[method-assign]
    history = h.deploy("1.0")
    checks = {c["name"]: c for c in history[0].validation["checks"]}
    assert checks["credentials"]["ok"] and not checks["project"]["ok"]
    assert "Project not found" in checks["project"]["message"]
    assert not vercel.sent("POST", "/v13/deployments")


# ------------------------------------------------------------------------------ netlify


def test_netlify_uploads_the_zip_titled_with_the_version(tmp_path, netlify):
    h = harness(tmp_path, "netlify", netlify)
    history = h.deploy("1.0")
    assert history[0].status == "completed", history[0].error_message
    (upload,) = netlify.sent("POST", "/sites/5a1e-site/deploys")
    assert bearer(upload) and upload.query == {"title": "1.0"}
    assert upload.headers["content-type"] == "application/zip"
    artifact = tmp_path / "b" / "dist" / "site-1.0.zip"
    assert upload.body == artifact.read_bytes() and zipfile.is_zipfile(artifact)
    assert netlify.sent("GET", "/deploys/64d00001")
    assert netlify.live_version() == "1.0"


def test_netlify_rollback_restores_the_ready_deploy(tmp_path, netlify):
    h = harness(tmp_path, "netlify", netlify)
    h.deploy("1.0", on_failure="rollback")
    history = h.deploy("1.1-fail", on_failure="rollback")
    assert [d.status for d in history[:2]] == ["completed", "rolled_back"]
    assert "does not exist" in history[1].error_message  # Netlify's own error text
    assert len(netlify.sent("POST", "/sites/5a1e-site/deploys")) == 2  # no third upload
    # The failed deploy was never published: 1.0's is still live, nothing to restore.
    assert not netlify.sent("POST", "/sites/5a1e-site/deploys/64d00001/restore")
    assert "still published" in log_of(h, history[0].id)
    assert netlify.live_version() == "1.0"
    # Someone published a newer deploy out of band; rolling back restores 1.0's deploy.
    netlify.set_live("1.0.1-hotfix")
    out = subprocess.run(
        [
            *RECONCILER,
            "--config",
            str(h.config),
            "rollback",
            "--env",
            "staging",
            "--service",
            "api",
            "--to",
            "1.0",
        ],
        capture_output=True,
        text=True,
        cwd=h.tmp,
        env=cli_env(),
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert netlify.sent("POST", "/sites/5a1e-site/deploys/64d00001/restore")
    assert len(netlify.sent("POST", "/sites/5a1e-site/deploys")) == 2
    assert netlify.live_version() == "1.0"


def test_netlify_restore_of_a_deploy_that_is_not_ready_is_422(tmp_path, netlify):
    import httpx

    h = harness(tmp_path, "netlify", netlify)
    h.deploy("1.0")
    h.deploy("1.1-fail")
    resp = httpx.post(
        f"{netlify.url}/sites/5a1e-site/deploys/64d00002/restore",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert resp.status_code == 422 and "not ready" in resp.json()["message"]
    assert netlify.live_version() == "1.0"  # the provider restores only ready deploys


def test_netlify_honours_retry_after_on_429(tmp_path, netlify):
    h = harness(tmp_path, "netlify", netlify)
    netlify.throttle(1, 0.4)
    history = h.deploy("1.0")
    assert history[0].status == "completed"
    first, second = netlify.requests[:2]
    assert first.path == second.path == "/user" and second.at - first.at >= 0.4


def test_netlify_missing_artifact_is_refused_at_validation(tmp_path, netlify):
    h = harness(tmp_path, "netlify", netlify)
    h.backend.prepare = lambda version: None  # type: ignore[method-assign]
    history = h.deploy("1.0")
    checks = {c["name"]: c for c in history[0].validation["checks"]}
    assert (
        not checks["artifact"]["ok"]
        and "site-1.0.zip: no such file" in checks["artifact"]["message"]
    )
    assert not netlify.sent("POST", "/sites/5a1e-site/deploys")


# ------------------------------------------------------------------------------ railway


def gql(r: Request) -> dict[str, Any]:
    doc: dict[str, Any] = r.json()
    return doc


def ops(fake: FakeServer) -> list[str]:
    return [gql(r)["query"].split("(")[0].strip() for r in fake.requests]


def test_railway_stages_the_image_then_deploys_it(tmp_path, railway):
    h = harness(tmp_path, "railway", railway)
    history = h.deploy("1.0")
    assert history[0].status == "completed", history[0].error_message
    assert all(bearer(r) and r.path == "/" and r.method == "POST" for r in railway.requests)
    sent = [gql(r) for r in railway.requests]
    stage = next(d for d in sent if d["query"].startswith("mutation Stage"))
    assert stage["variables"] == {
        "serviceId": "svc-7f3a",
        "environmentId": "env-prod-1",
        "input": {"source": {"image": "ghcr.io/acme/web:1.0"}},
    }
    names = ops(railway)
    assert names.index("mutation Stage") < names.index("mutation Deploy")
    assert "query Status" in names and railway.invalid == []
    assert railway.live_version() == "1.0"


def test_railway_project_token_uses_its_own_header(tmp_path):
    fake = FakeRailway(TOKEN, project_token=True)
    for _ in started(fake):
        h = harness(tmp_path, "railway", fake, token_type="project")
        history = h.deploy("1.0")
        assert history[0].status == "completed", history[0].error_message
        assert all(
            r.headers.get("project-access-token") == TOKEN and "authorization" not in r.headers
            for r in fake.requests
        )


def test_railway_errors_with_http_200_are_failures(tmp_path, railway):
    h = harness(tmp_path, "railway", railway)
    h.backend.params = lambda: {  # type: ignore[method-assign]
        "service_id": "svc-gone",
        "environment_id": "env-prod-1",
        "image": "ghcr.io/acme/web",
    }
    history = h.deploy("1.0")
    checks = {c["name"]: c for c in history[0].validation["checks"]}
    assert checks["service"] == {
        "name": "service",
        "ok": False,
        "message": "ServiceInstance not found",
    }
    assert "mutation Deploy" not in ops(railway)


def test_railway_failure_text_comes_from_the_build_log_and_rollback_reuses_the_deployment(
    tmp_path, railway
):
    h = harness(tmp_path, "railway", railway)
    h.deploy("1.0", on_failure="rollback")
    history = h.deploy("1.1-fail", on_failure="rollback")
    assert [d.status for d in history[:2]] == ["completed", "rolled_back"]
    assert history[1].error_message.endswith(
        "FAILED: Error: container exited with code 1 (health check failed)"
    )
    rollbacks = [
        gql(r) for r in railway.requests if gql(r)["query"].startswith("mutation Rollback")
    ]
    assert [r["variables"] for r in rollbacks] == [{"id": "d001-9c1e"}]
    assert ops(railway).count("mutation Deploy") == 2  # 1.0 and 1.1-fail; the rollback is no build
    assert railway.live_version() == "1.0" and railway.runs[-1].data["reason"] == "rollback"


def test_railway_honours_retry_after_on_429(tmp_path, railway):
    h = harness(tmp_path, "railway", railway)
    railway.throttle(1, 0.3)
    history = h.deploy("1.0")
    assert history[0].status == "completed"
    first, second = railway.requests[:2]
    assert second.at - first.at >= 0.3


# ------------------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    ("kind", "extra", "message"),
    [
        ("vercel", "", "providers.p.token_file: required"),
        ("vercel", 'token_file = "t"\nregion = "x"', "providers.p.region: unknown key"),
        (
            "netlify",
            'token_file = "t"\napi_url = "ftp://x"',
            "providers.p.api_url: expected an http",
        ),
        ("railway", 'token_file = "t"\ntoken_type = "team"', "providers.p.token_type: expected"),
        ("railway", 'token_file = "t"\npoll_interval = "soon"', "providers.p.poll_interval:"),
    ],
)
def test_settings_mistakes_are_one_line_config_errors(tmp_path, kind, extra, message):
    (tmp_path / "t").write_text("tok-1234\n")
    cfg = tmp_path / "reconciler.toml"
    cfg.write_text(f'[repository]\nurl = "repo"\n\n[providers.p]\ntype = "{kind}"\n{extra}\n')
    with pytest.raises(ConfigError) as err:
        build_providers(load_config(cfg, environ={}))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_503_is_retried_and_a_create_refused_by_503_is_looked_up_before_resending(
    tmp_path, vercel
):
    h = harness(tmp_path, "vercel", vercel, team_id="team_acme")
    vercel.throttle(1, 0.2, status=503, path="/v13/deployments")
    vercel.throttle(1, 0.2, status=503, path="/v13/deployments/dpl_0001")
    history = h.deploy("1.0")
    assert history[0].status == "completed", history[0].error_message
    paths = [(r.method, r.path) for r in vercel.requests]
    create = paths.index(("POST", "/v13/deployments"))
    # Refused with 503: outcome unknown, so the list is read before the create is resent.
    assert paths[create + 1] == ("GET", "/v6/deployments")
    assert paths[create + 2] == ("POST", "/v13/deployments") and len(vercel.runs) == 1
    text = log_of(h, history[0].id)
    assert "GET v13/deployments/dpl_0001: HTTP 503: Service Unavailable; retrying in 0.2s" in text


def test_retry_after_accepts_seconds_and_http_dates():
    import email.utils
    import time as clock

    import httpx

    from reconciler.providers.http_api import retry_after

    def resp(value: str | None) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": value} if value else {})

    assert retry_after(resp("2"), 0) == 2.0
    date = email.utils.formatdate(clock.time() + 30, usegmt=True)
    assert 28 <= retry_after(resp(date), 0) <= 30
    assert retry_after(resp(None), 0) == 0.5 and retry_after(resp(None), 3) == 4.0
    assert retry_after(resp(None), 10) == 10.0  # capped


@pytest.mark.parametrize("kind", ["vercel", "netlify", "railway"])
def test_an_unreachable_endpoint_is_refused_at_validation(tmp_path, kind):
    fake = {"vercel": FakeVercel, "netlify": FakeNetlify, "railway": FakeRailway}[kind](TOKEN)
    for _ in started(fake):
        h = harness(tmp_path, kind, fake, api_url="http://127.0.0.1:9/api", request_timeout=1)
        history = h.deploy("1.0")
        assert history[0].status == "failed"
        (check,) = [c for c in history[0].validation["checks"] if not c["ok"]]
        assert check["name"] == "api" and "cannot connect" in check["message"]
        assert not fake.requests


@pytest.mark.parametrize(
    ("kind", "fake_class", "path", "containing"),
    [
        ("netlify", FakeNetlify, "/sites/5a1e-site/deploys", b""),
        ("railway", FakeRailway, "/", b"serviceInstanceDeployV2"),
    ],
)
def test_a_lost_answer_to_a_create_is_looked_up_not_resent(
    tmp_path, kind, fake_class, path, containing
):
    fake = fake_class(TOKEN)
    for _ in started(fake):
        h = harness(tmp_path, kind, fake)
        fake.lose_answer("POST", path, containing)
        history = h.deploy("1.0")
        assert history[0].status == "completed", history[0].error_message
        assert len(fake.runs) == 1 and fake.live_version() == "1.0"
        assert "outcome unknown" in log_of(h, history[0].id)
