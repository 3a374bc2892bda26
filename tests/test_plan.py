"""The planner is pure: desired + recorded + now -> decisions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from desired_state import EnvironmentSpec
from reconciler.plan import (
    PlanSettings,
    RecordedState,
    ServiceRecord,
    dependency_triples,
    plan,
    window_state,
)

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)  # a Thursday
SETTINGS = PlanSettings(retries=3, retry_backoff=30.0, timezone=UTC)


def env(name: str = "staging", **kw) -> EnvironmentSpec:
    data = {
        "environment": name,
        "provider": "p",
        "services": kw.pop("services", {"api": {"version": "2"}, "worker": {"version": "1"}}),
        **kw,
    }
    return EnvironmentSpec.model_validate(data)


def by_service(decisions):
    return {(d.environment, d.service): d for d in decisions}


def test_out_of_sync_and_synced_in_file_order():
    recorded = RecordedState(
        services={
            ("staging", "api"): ServiceRecord(deployed_version="1"),
            ("staging", "worker"): ServiceRecord(deployed_version="1"),
        }
    )
    ds = plan({"staging": env()}, recorded, NOW, SETTINGS)
    assert [(d.service, d.state, d.deploy) for d in ds] == [
        ("api", "out_of_sync", True),
        ("worker", "synced", False),
    ]
    api = ds[0]
    assert (api.desired, api.deployed, api.trigger, api.attempt) == ("2", "1", "git", 1)


def test_never_deployed_service_deploys_with_no_previous():
    d = plan({"staging": env()}, RecordedState(), NOW, SETTINGS)[0]
    assert d.deploy and d.deployed is None


def test_running_deployment_is_not_started_twice():
    rec = RecordedState(
        services={("staging", "api"): ServiceRecord(deployed_version="1", running=True)}
    )
    d = by_service(plan({"staging": env()}, rec, NOW, SETTINGS))[("staging", "api")]
    assert d.state == "deploying" and not d.deploy


def test_retry_backoff_doubles_then_gives_up():
    def decide(count: int, ago: float):
        rec = RecordedState(
            services={
                ("staging", "api"): ServiceRecord(
                    deployed_version="1",
                    streak_version="2",
                    streak_count=count,
                    streak_last_at=NOW - timedelta(seconds=ago),
                )
            }
        )
        return by_service(plan({"staging": env()}, rec, NOW, SETTINGS))[("staging", "api")]

    first = decide(1, 10)  # backoff 30 s after the first failure
    assert first.state == "failed" and not first.deploy and "retry in 20s" in first.message
    assert first.not_before == NOW + timedelta(seconds=20)
    ready = decide(1, 31)
    assert ready.deploy and ready.trigger == "retry" and ready.attempt == 2
    second = decide(2, 31)  # 60 s after the second failure
    assert not second.deploy and "retry in 29s" in second.message
    assert decide(2, 61).deploy
    gave_up = decide(3, 10_000)
    assert gave_up.state == "failed" and not gave_up.deploy
    assert "gave up after 3 attempts" in gave_up.message
    assert "reconciler sync --env staging --service api" in gave_up.message


def test_failures_of_another_version_do_not_count():
    rec = RecordedState(
        services={
            ("staging", "api"): ServiceRecord(
                deployed_version="1", streak_version="1.9", streak_count=3, streak_last_at=NOW
            )
        }
    )
    d = by_service(plan({"staging": env()}, rec, NOW, SETTINGS))[("staging", "api")]
    assert d.deploy and d.trigger == "git" and d.attempt == 1


def test_suspended_in_git_and_by_operator_record_drift_but_deploy_nothing():
    ds = plan({"staging": env(suspended="true")}, RecordedState(), NOW, SETTINGS)
    assert {d.state for d in ds} == {"suspended"} and not any(d.deploy for d in ds)
    assert "wants 2" in ds[0].message
    op = RecordedState(operator_suspended=frozenset({"staging"}))
    ds = plan({"staging": env()}, op, NOW, SETTINGS)
    assert all(d.state == "suspended" and "operator" in d.message for d in ds)


def test_depends_on_holds_until_the_same_version_completed_upstream():
    staging = env("staging")
    production = env("production", depends_on=["staging"])
    desired = {"staging": staging, "production": production}
    assert ("staging", "api", "2") in dependency_triples(desired)
    ds = by_service(plan(desired, RecordedState(), NOW, SETTINGS))
    assert ds[("staging", "api")].deploy
    held = ds[("production", "api")]
    assert held.state == "waiting" and not held.deploy
    assert held.message.startswith("waiting: depends_on staging")
    done = RecordedState(completed=frozenset({("staging", "api", "2")}))
    ds = by_service(plan(desired, done, NOW, SETTINGS))
    assert ds[("production", "api")].deploy
    assert not ds[("production", "worker")].deploy  # worker 1 not completed in staging yet


def test_depends_on_ignores_services_the_upstream_does_not_declare():
    staging = env("staging", services={"api": {"version": "2"}})
    production = env(
        "production",
        depends_on=["staging"],
        services={"api": {"version": "2"}, "cron": {"version": "7"}},
    )
    ds = by_service(
        plan({"staging": staging, "production": production}, RecordedState(), NOW, SETTINGS)
    )
    assert ds[("production", "cron")].deploy
    assert not ds[("production", "api")].deploy


def test_window_holds_back_and_names_the_next_opening():
    spec = env(windows=[{"cron": "0 9 * * mon-fri", "duration": "2h"}])
    ds = plan({"staging": spec}, RecordedState(), NOW, SETTINGS)  # 12:00, window 09-11
    assert all(d.state == "waiting" for d in ds)
    assert ds[0].message == "waiting: window opens Fri 27 Nov 09:00"
    assert ds[0].not_before == datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
    inside = plan({"staging": spec}, RecordedState(), NOW.replace(hour=10), SETTINGS)
    assert all(d.deploy for d in inside)


def test_window_edges_and_timezones():
    w = env(windows=[{"cron": "0 9 * * *", "duration": "1h"}]).windows
    assert window_state(w, NOW.replace(hour=9, minute=0), UTC) == (True, None)
    assert window_state(w, NOW.replace(hour=9, minute=59), UTC)[0]
    is_open, nxt = window_state(w, NOW.replace(hour=10, minute=0), UTC)
    assert not is_open and nxt is not None
    assert nxt.astimezone(UTC) == datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
    tokyo = env(
        windows=[{"cron": "0 21 * * *", "duration": "1h", "timezone": "Asia/Tokyo"}]
    ).windows
    assert window_state(tokyo, NOW, UTC)[0]  # 12:00 UTC is 21:00 in Tokyo
    # The daemon's timezone applies to windows without their own.
    assert window_state(w, datetime(2026, 11, 26, 8, 30, tzinfo=UTC), ZoneInfo("Europe/Paris"))[0]


def test_invalid_environment_deploys_nothing_and_says_why():
    spec = env()
    ds = plan(
        {"staging": spec},
        RecordedState(),
        NOW,
        SETTINGS,
        invalid={"staging": "staging.yaml:3:5: services.api.version: bad", "qa": "qa.yaml:1:1: x"},
    )
    states = {(d.environment, d.service): (d.state, d.deploy) for d in ds}
    assert states[("staging", "api")] == ("invalid", False)
    assert states[("qa", "*")] == ("invalid", False)


def test_depends_on_holds_when_planning_one_environment_at_a_time():
    # The engine plans one environment at a time: what the others declare comes separately.
    staging = env("staging")
    production = env("production", depends_on=["staging"])
    declared = {"staging": staging.services.keys(), "production": production.services.keys()}
    ds = plan({"production": production}, RecordedState(), NOW, SETTINGS, declared=declared)
    assert not any(d.deploy for d in ds)
    assert all(d.state == "waiting" for d in ds)
