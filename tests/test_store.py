"""The store's queries, on SQLite and (when configured) PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from reconciler.store import (
    CommitMeta,
    NewDeployment,
    Store,
    StoreError,
)

T0 = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def new(
    environment: str = "production",
    service: str = "api",
    version: str = "1.0.0",
    **overrides: Any,
) -> NewDeployment:
    values: dict[str, Any] = {
        "environment": environment,
        "service": service,
        "version": version,
        "previous_version": None,
        "provider": "local",
        "provider_type": "command",
        "strategy": {"type": "rolling"},
        "trigger": "git",
        "commit": "9f1c" * 10,
        "commit_author": "Ada <ada@example.com>",
        "attempt": 1,
        "timeout_seconds": 1800,
        "params": {"deployment": service},
    }
    values.update(overrides)
    return NewDeployment(**values)


def run(store: Store, deployment: NewDeployment, final: str, start: float, **kw: Any) -> int:
    """Create a deployment and drive it to ``final`` (started at ``start`` s, ended +10 s)."""
    record = store.create_deployment(deployment)
    if final == "pending":
        return record.id
    store.set_status(record.id, "in_progress", at=at(start))
    if final != "in_progress":
        store.set_status(record.id, final, at=at(start + 10), **kw)
    return record.id


def assert_rebuild_matches(store: Store) -> None:
    incremental = store.service_states()
    store.rebuild_service_state()
    assert store.service_states() == incremental


# --------------------------------------------------------------------------- deployments


def test_create_deployment_is_pending_with_event(store: Store) -> None:
    record = store.create_deployment(new(created_at=at(0)))
    assert record.status == "pending"
    assert record.created_at == at(0)
    assert record.started_at is None and record.completed_at is None
    assert record.strategy == {"type": "rolling"}
    assert record.params == {"deployment": "api"}
    full = store.get_deployment(record.id, with_progress=True, with_log=True)
    assert full is not None
    assert [e.status for e in full.progress or []] == ["pending"]
    assert full.log == []
    state = store.service_states()[("production", "api")]
    assert state.running_deployment_id == record.id
    assert state.last_deployment_id == record.id
    assert state.last_status == "pending"
    assert state.deployed_version is None


def test_created_at_defaults_to_now(store: Store) -> None:
    before = datetime.now(UTC)
    record = store.create_deployment(new())
    assert before - timedelta(seconds=1) <= record.created_at <= datetime.now(UTC)
    assert record.created_at.tzinfo is not None


def test_status_transitions(store: Store) -> None:
    d = store.create_deployment(new()).id
    r = store.set_status(d, "validating", at=at(1))
    assert r.started_at == at(1)
    r = store.set_status(d, "in_progress", at=at(2), validation={"ok": True, "checks": []})
    assert r.started_at == at(1), "started_at is set only the first time"
    assert r.validation == {"ok": True, "checks": []}
    r = store.set_status(d, "completed", at=at(73.5))
    assert r.completed_at == at(73.5)
    assert r.duration_seconds == 72.5
    full = store.get_deployment(d, with_progress=True)
    assert full is not None and full.progress is not None
    assert [e.status for e in full.progress] == [
        "pending",
        "validating",
        "in_progress",
        "completed",
    ]
    assert full.progress[-1].percent == 100
    assert full.progress[-1].message == "deployment completed"
    state = store.service_states()[("production", "api")]
    assert state.running_deployment_id is None
    assert state.deployed_version == "1.0.0"
    assert state.deployed_deployment_id == d
    assert state.last_ended_at == at(73.5)


@pytest.mark.parametrize("final", ["completed", "failed", "rolled_back", "timed_out", "cancelled"])
def test_terminal_records_are_not_changed(store: Store, final: str) -> None:
    d = run(store, new(), final, 0, error_message="boom" if final != "completed" else None)
    before = store.get_deployment(d, with_progress=True)
    for status in ("pending", "in_progress", "completed", "failed", "cancelled"):
        with pytest.raises(StoreError):
            store.set_status(d, status, at=at(100))
    if final != "failed":
        with pytest.raises(StoreError):
            store.set_status(d, "rolled_back", at=at(100))
    assert store.get_deployment(d, with_progress=True) == before


def test_failed_to_rolled_back_keeps_error(store: Store) -> None:
    d = run(store, new(), "failed", 0, error_message="exit status 3: boom")
    r = store.set_status(d, "rolled_back", at=at(50), message="rolled back to 0.9.0")
    assert r.status == "rolled_back"
    assert r.error_message == "exit status 3: boom"
    assert r.completed_at == at(10), "the end of the run is kept"
    full = store.get_deployment(d, with_progress=True)
    assert full is not None and full.progress is not None
    assert full.progress[-1].status == "rolled_back"
    assert full.progress[-1].message == "rolled back to 0.9.0"
    with pytest.raises(StoreError):
        store.set_status(d, "rolled_back", at=at(60))


def test_unknown_values_are_refused(store: Store) -> None:
    with pytest.raises(StoreError):
        store.create_deployment(new(trigger="cron"))
    d = store.create_deployment(new()).id
    with pytest.raises(StoreError):
        store.set_status(d, "done", at=at(1))
    with pytest.raises(StoreError):
        store.set_status(d, "in_progress", at=datetime(2026, 1, 1))  # naive
    with pytest.raises(StoreError):
        store.set_status(d + 1000, "in_progress", at=at(1))
    with pytest.raises(StoreError):
        store.append_log(d, [("stdlog", "x", at(1))])
    with pytest.raises(StoreError):
        store.add_event(
            d + 1000, status="in_progress", message="x", percent=1, details=None, at=at(1)
        )


def test_times_are_stored_utc(store: Store) -> None:
    plus2 = timezone(timedelta(hours=2))
    d = store.create_deployment(new()).id
    r = store.set_status(d, "in_progress", at=datetime(2026, 11, 26, 12, 0, 0, tzinfo=plus2))
    assert r.started_at == T0
    assert r.started_at is not None and r.started_at.utcoffset() == timedelta(0)
    assert r.to_json()["started_at"] == "2026-11-26T10:00:00Z"


def test_events_logs_and_events_after(store: Store) -> None:
    d = store.create_deployment(new()).id
    store.set_status(d, "in_progress", at=at(1))
    store.add_event(
        d,
        status="in_progress",
        message="canary 10%",
        percent=10,
        details={"step": 1},
        at=at(2),
    )
    store.append_log(
        d,
        [("stdout", "starting", at(1)), ("stderr", "warn: x", at(2)), ("system", "done", at(3))],
    )
    full = store.get_deployment(d, with_progress=True, with_log=True)
    assert full is not None and full.progress is not None and full.log is not None
    assert [e.message for e in full.progress][-1] == "canary 10%"
    assert [(entry.stream, entry.line) for entry in full.log] == [
        ("stdout", "starting"),
        ("stderr", "warn: x"),
        ("system", "done"),
    ]
    first = full.progress[0].id
    after = store.events_after(d, first)
    assert [e.status for e in after] == ["in_progress", "in_progress"]
    assert after[-1].details == {"step": 1} and after[-1].percent == 10
    assert store.events_after(d, after[-1].id) == []
    store.set_status(d, "completed", at=at(5))
    assert [e.status for e in store.events_after(d, after[-1].id)] == ["completed"]


# --------------------------------------------------------------------------- records JSON


SPEC_KEYS = [
    "id",
    "environment",
    "service",
    "version",
    "previous_version",
    "provider",
    "provider_type",
    "strategy",
    "status",
    "error_message",
    "trigger",
    "commit",
    "commit_author",
    "attempt",
    "timeout_seconds",
    "validation",
    "started_at",
    "completed_at",
    "duration_seconds",
]


def test_to_json_keys_order_and_values(store: Store) -> None:
    d = store.create_deployment(new(version="1.4.2", previous_version="1.4.1")).id
    store.set_status(d, "in_progress", at=at(0.25), validation={"ok": True, "checks": []})
    store.set_status(d, "completed", at=at(72.25))
    store.append_log(d, [("stdout", "a", at(1)), ("stdout", "b", at(2))])
    record = store.get_deployment(d)
    assert record is not None
    doc = record.to_json()
    assert list(doc) == SPEC_KEYS
    assert doc["started_at"] == "2026-11-26T10:00:00Z"
    assert doc["completed_at"] == "2026-11-26T10:01:12Z"
    assert doc["duration_seconds"] == 72.0
    assert doc["previous_version"] == "1.4.1"
    assert doc["validation"] == {"ok": True, "checks": []}
    assert doc["strategy"] == {"type": "rolling"}
    assert doc["error_message"] is None

    full = store.get_deployment(d, with_progress=True, with_log=True)
    assert full is not None
    doc = full.to_json()
    assert list(doc) == [*SPEC_KEYS, "progress", "log"]
    assert list(doc["progress"][0]) == ["status", "message", "percent", "details", "at"]
    assert doc["progress"][-1]["status"] == "completed"
    assert doc["progress"][-1]["at"] == "2026-11-26T10:01:12Z"
    assert doc["log"] == "a\nb"


def test_to_json_unfinished(store: Store) -> None:
    d = store.create_deployment(new()).id
    doc = store.set_status(d, "in_progress", at=at(0)).to_json()
    assert doc["completed_at"] is None and doc["duration_seconds"] is None
    assert doc["validation"] is None


# --------------------------------------------------------------------------- service state


def state_of(store: Store, environment: str = "production", service: str = "api") -> Any:
    return store.service_states()[(environment, service)]


def test_streak_semantics(store: Store) -> None:
    # A completed v0 first: the version a rollback goes back to.
    run(store, new(version="0.9.0"), "completed", 0)
    assert state_of(store).streak_count == 0
    assert state_of(store).deployed_version == "0.9.0"

    d1 = run(store, new(version="1.0.0"), "failed", 100, error_message="boom")
    s = state_of(store)
    assert (s.streak_version, s.streak_count, s.streak_last_at) == ("1.0.0", 1, at(110))
    assert s.deployed_version == "0.9.0"
    assert s.last_status == "failed"
    assert_rebuild_matches(store)

    d2 = run(store, new(version="1.0.0", trigger="retry", attempt=2), "failed", 200)
    assert (state_of(store).streak_version, state_of(store).streak_count) == ("1.0.0", 2)

    # Rollback deployment completes in between: deployed changes, the streak does not.
    run(store, new(version="0.9.0", trigger="rollback", rollback_of=d2), "completed", 300)
    store.set_status(d2, "rolled_back", at=at(320))
    s = state_of(store)
    assert s.deployed_version == "0.9.0"
    assert (s.streak_version, s.streak_count, s.streak_last_at) == ("1.0.0", 2, at(210))
    assert_rebuild_matches(store)

    # A cancelled attempt is ignored; an unfinished one does not break the streak either.
    run(store, new(version="1.0.0", trigger="retry", attempt=3), "cancelled", 400)
    assert state_of(store).streak_count == 2
    running = run(store, new(version="1.0.0", trigger="retry", attempt=3), "in_progress", 500)
    s = state_of(store)
    assert s.streak_count == 2 and s.running_deployment_id == running
    assert_rebuild_matches(store)
    store.set_status(running, "timed_out", at=at(600))
    s = state_of(store)
    assert (s.streak_count, s.streak_last_at, s.running_deployment_id) == (3, at(600), None)
    assert_rebuild_matches(store)

    # A different version starts a new count.
    run(store, new(version="1.0.1"), "failed", 700)
    s = state_of(store)
    assert (s.streak_version, s.streak_count) == ("1.0.1", 1)

    # The operator asks for a retry: the count starts again.
    store.reset_streak("production", "api")
    s = state_of(store)
    assert s.streak_count == 0
    assert_rebuild_matches(store)
    assert state_of(store).streak_count == 0, "a rebuild keeps the operator's reset"
    run(store, new(version="1.0.1", trigger="retry"), "failed", 800)
    assert (state_of(store).streak_version, state_of(store).streak_count) == ("1.0.1", 1)
    assert_rebuild_matches(store)

    # A completed deployment resets the streak and sets the deployed version.
    done = run(store, new(version="1.0.1", trigger="retry"), "completed", 900)
    s = state_of(store)
    assert (s.streak_version, s.streak_count, s.streak_last_at) == (None, 0, None)
    assert (s.deployed_version, s.deployed_deployment_id) == ("1.0.1", done)
    assert (s.last_deployment_id, s.last_status, s.last_version) == (done, "completed", "1.0.1")
    assert_rebuild_matches(store)
    assert d1 < d2 < done


def test_completed_rollback_does_not_reset_streak(store: Store) -> None:
    run(store, new(version="2.0.0"), "failed", 0)
    run(store, new(version="1.0.0", trigger="rollback"), "completed", 20)
    s = state_of(store)
    assert (s.streak_version, s.streak_count, s.deployed_version) == ("2.0.0", 1, "1.0.0")
    # A failed rollback deployment does not count as an attempt either.
    run(store, new(version="1.0.0", trigger="rollback"), "failed", 40)
    assert (state_of(store).streak_version, state_of(store).streak_count) == ("2.0.0", 1)
    assert_rebuild_matches(store)


def test_reset_streak_without_deployments_is_harmless(store: Store) -> None:
    store.reset_streak("production", "nothing")
    assert store.service_states() == {}


def test_service_states_filter_and_rebuild(store: Store) -> None:
    for env in ("staging", "production", "qa"):
        for index, service in enumerate(("api", "worker", "web")):
            final = ("completed", "failed", "in_progress")[index]
            run(store, new(environment=env, service=service), final, index)
    states = store.service_states()
    assert len(states) == 9
    only = store.service_states(["staging", "qa"])
    assert set(only) == {(e, s) for e in ("staging", "qa") for s in ("api", "worker", "web")}
    assert store.service_states([]) == {}
    assert states[("qa", "web")].running_deployment_id is not None
    assert states[("qa", "worker")].streak_count == 1
    assert_rebuild_matches(store)


def test_completed_versions(store: Store) -> None:
    run(store, new(environment="staging", version="1.0.0"), "completed", 0)
    run(store, new(environment="staging", version="1.1.0"), "failed", 10)
    run(store, new(environment="staging", service="web", version="1.1.0"), "completed", 20)
    wanted = {
        ("staging", "api", "1.0.0"),
        ("staging", "api", "1.1.0"),
        ("staging", "web", "1.1.0"),
        ("qa", "api", "1.0.0"),
    }
    # Plenty of triples: several IN chunks.
    wanted |= {("staging", f"svc{i}", "1.0.0") for i in range(1000)}
    assert store.completed_versions(wanted) == {
        ("staging", "api", "1.0.0"),
        ("staging", "web", "1.1.0"),
    }
    assert store.completed_versions([]) == set()


def test_previous_completed_version(store: Store) -> None:
    assert store.previous_completed_version("production", "api") is None
    run(store, new(version="1.0.0"), "completed", 0)
    run(store, new(version="1.1.0"), "completed", 10)
    run(store, new(version="1.2.0"), "failed", 20)
    assert store.previous_completed_version("production", "api") == "1.1.0"
    assert store.previous_completed_version("production", "api", before_version="1.1.0") == "1.0.0"
    assert store.previous_completed_version("production", "api", before_version="1.2.0") == "1.1.0"


def test_interrupt_unfinished(store: Store) -> None:
    pending = run(store, new(service="a"), "pending", 0)
    running = run(store, new(service="b"), "in_progress", 0)
    done = run(store, new(service="c"), "completed", 0)
    message = "interrupted: reconciler stopped during the run"
    assert store.interrupt_unfinished(message=message, at=at(100)) == [pending, running]
    for ident in (pending, running):
        record = store.get_deployment(ident, with_progress=True)
        assert record is not None and record.progress is not None
        assert (record.status, record.error_message, record.completed_at) == (
            "failed",
            message,
            at(100),
        )
        assert record.progress[-1].status == "failed"
    completed = store.get_deployment(done)
    assert completed is not None and completed.status == "completed"
    states = store.service_states()
    assert states[("production", "b")].running_deployment_id is None
    assert states[("production", "b")].streak_count == 1
    assert store.interrupt_unfinished(message=message, at=at(200)) == []
    assert_rebuild_matches(store)


# --------------------------------------------------------------------------- history


def test_history_filters_and_order(store: Store) -> None:
    ids = []
    for i, (env, service, final) in enumerate(
        [
            ("staging", "api", "completed"),
            ("staging", "web", "failed"),
            ("production", "api", "completed"),
            ("production", "api", "failed"),
            ("production", "web", "completed"),
        ]
    ):
        ids.append(
            run(store, new(environment=env, service=service, created_at=at(i * 60)), final, 0)
        )
    assert [r.id for r in store.history()] == list(reversed(ids))
    assert [r.id for r in store.history(environment="production")] == [ids[4], ids[3], ids[2]]
    assert [r.id for r in store.history(environment="production", service="api")] == [
        ids[3],
        ids[2],
    ]
    assert [r.id for r in store.history(status="failed")] == [ids[3], ids[1]]
    assert [r.id for r in store.history(service="api", status="completed")] == [ids[2], ids[0]]
    assert [r.id for r in store.history(since=at(120))] == [ids[4], ids[3], ids[2]]
    assert [r.id for r in store.history(limit=2)] == [ids[4], ids[3]]
    assert [r.id for r in store.history(limit=2, before_id=ids[3])] == [ids[2], ids[1]]
    assert store.history(environment="nowhere") == []
    assert all(r.progress is None and r.log is None for r in store.history())


# --------------------------------------------------------------------------- syncs


def test_syncs(store: Store) -> None:
    assert store.last_synced_commit() is None
    commit = CommitMeta(sha="a" * 40, author="Ada <ada@example.com>", time=at(-60), subject="x")
    s1 = store.begin_sync(trigger="startup", seen_at=at(0), commit=commit)
    assert store.last_synced_commit() is None, "an unfinished sync applied nothing"
    store.finish_sync(
        s1,
        result="errors",
        ended_at=at(2),
        environments_changed=["staging"],
        errors=[{"file": "p.yaml", "line": 3, "col": 5, "path": "services.api", "message": "x"}],
        full_load=True,
        note="first load",
    )
    assert store.last_synced_commit() == "a" * 40
    s2 = store.begin_sync(trigger="poll", seen_at=at(30), commit=None)
    store.finish_sync(
        s2,
        result="failed",
        ended_at=at(31),
        environments_changed=[],
        errors=[],
        full_load=False,
        error_message="fetch failed: connection refused",
    )
    assert store.last_synced_commit() == "a" * 40, "a failed fetch applied nothing"
    s3 = store.begin_sync(
        trigger="webhook", seen_at=at(60), commit=CommitMeta("b" * 40, None, None, None)
    )
    store.finish_sync(
        s3, result="unchanged", ended_at=at(61), environments_changed=[], errors=[], full_load=False
    )
    assert store.last_synced_commit() == "b" * 40

    syncs = store.list_syncs()
    assert [s.id for s in syncs] == [s3, s2, s1]
    first = syncs[-1]
    assert first.commit_sha == "a" * 40 and first.commit_time == at(-60)
    assert first.commit_author == "Ada <ada@example.com>" and first.commit_subject == "x"
    assert first.full_load is True and first.note == "first load"
    assert first.environments_changed == ["staging"]
    assert first.errors[0]["line"] == 3
    assert syncs[1].error_message == "fetch failed: connection refused"
    assert syncs[1].commit_sha is None
    assert [s.id for s in store.list_syncs(limit=1)] == [s3]

    d = store.create_deployment(new(sync_id=s3))
    assert d.sync_id == s3
    with pytest.raises(StoreError):
        store.finish_sync(
            9999, result="ok", ended_at=at(1), environments_changed=[], errors=[], full_load=False
        )
    with pytest.raises(StoreError):
        store.begin_sync(trigger="cron", seen_at=at(0), commit=None)


# --------------------------------------------------------------------------- environments


def test_environment_state(store: Store) -> None:
    assert store.environment_states() == {}
    store.save_environment_state(
        "staging",
        spec={"services": {"api": {"version": "1"}}},
        source_path="s.yaml",
        commit="a" * 40,
        at=at(0),
    )
    store.save_environment_state(
        "staging",
        spec={"services": {"api": {"version": "2"}}},
        source_path="envs/s.yaml",
        commit="b" * 40,
        at=at(10),
    )
    states = store.environment_states()
    assert list(states) == ["staging"]
    assert states["staging"].spec == {"services": {"api": {"version": "2"}}}
    assert states["staging"].source_path == "envs/s.yaml"
    assert states["staging"].commit == "b" * 40
    assert states["staging"].updated_at == at(10)


def test_operator_suspend_resume(store: Store) -> None:
    assert store.suspended_environments() == set()
    common: dict[str, Any] = {"service": None, "actor": "ada", "note": None}
    store.record_operator_action(environment="production", action="suspend", at=at(0), **common)
    store.record_operator_action(environment="staging", action="suspend", at=at(1), **common)
    store.record_operator_action(environment="staging", action="suspend", at=at(2), **common)
    assert store.suspended_environments() == {"production", "staging"}
    store.record_operator_action(environment="staging", action="resume", at=at(3), **common)
    assert store.suspended_environments() == {"production"}
    store.record_operator_action(
        environment="production",
        service="api",
        action="retry",
        actor="bob",
        note="go",
        at=at(4),
    )
    assert store.suspended_environments() == {"production"}
    with pytest.raises(StoreError):
        store.record_operator_action(environment="x", action="explode", at=at(5), **common)


def test_environment_states_saved_in_one_batch_insert_and_update(store: Store) -> None:
    store.save_environment_states(
        [("a", {"environment": "a", "v": 1}, "a.yaml"), ("b", {"environment": "b"}, "b.yaml")],
        commit="c1",
        at=T0,
    )
    store.save_environment_states(
        [("a", {"environment": "a", "v": 2}, "x/a.yaml")], commit="c2", at=T0 + timedelta(minutes=1)
    )
    states = store.environment_states()
    assert sorted(states) == ["a", "b"]
    assert (states["a"].spec, states["a"].source_path, states["a"].commit) == (
        {"environment": "a", "v": 2},
        "x/a.yaml",
        "c2",
    )
    assert (states["b"].commit, states["b"].updated_at) == ("c1", T0)
    store.save_environment_states([], commit="c3", at=T0)  # nothing to save: no error


def test_environment_states_are_saved_from_a_generator_in_batches(store: Store) -> None:
    """A fleet's specs are dumped as the store takes them (2.5 batches here), in one call;
    the names read back alone."""
    from reconciler.store.environments import SAVE_BATCH

    total = SAVE_BATCH * 5 // 2

    def states():
        for i in range(total):
            yield (f"e{i}", {"environment": f"e{i}"}, f"e{i}.yaml")

    store.save_environment_states(states(), commit="c1", at=T0)
    assert store.environment_state_names() == {f"e{i}" for i in range(total)}
    assert store.environment_states()["e7"].spec == {"environment": "e7"}
