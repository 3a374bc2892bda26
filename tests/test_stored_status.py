"""Stored decisions (reconciler/stored_status.py): what `status` serves equals a fresh plan.

A real engine (real repository, deploy script, database) runs random operations: commits
whose versions deploy or fail (and wait for a retry), a dependency between environments,
an environment with a deploy window, operator retries and suspensions, drift readings,
and a clock that moves past the windows' edges. The decisions are stored at random
moments (as a standalone sync and the daemon do), so that some are current, some stale,
some expired. After every step, `saved_status` (through the `Store`, and on SQLite
through the sqlite3 reader) equals the full plan of every saved environment, order
included; right after storing, nothing is planned again unless the clock says so.
"""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from desired_state import EnvironmentSpec
from reconciler.config import load_config
from reconciler.engine import Engine
from reconciler.operations import _suspend
from reconciler.plan import Decision
from reconciler.planning import Planner, plan_settings
from reconciler.status import SavedDesired, saved_status
from reconciler.store import Store
from reconciler.store.records import LiveObservation
from reconciler.store.sqlite_read import SQLiteReader
from reconciler.stored_status import decode, encode, refresh, serve
from tests import support
from tests.support import World, env_yaml

pytestmark = pytest.mark.timeout(300)

ENVIRONMENTS = {"alpha": ["api", "worker"], "beta": ["api", "web"], "gamma": ["api", "db"]}
EXTRA = {
    "beta": {"depends_on": "[alpha]"},
    # open one hour in two (UTC): the clock below moves across its edges
    "gamma": {"windows": '[{cron: "0 */2 * * *", duration: 1h}]'},
}


def fresh_plan(store: Store, world: World, now: datetime) -> list[Decision]:
    """What `status` answered before decisions were stored: plan every saved environment."""
    config = load_config(world.config)
    saved = store.environment_states()
    refused = store.refusal_in_force()
    desired = SavedDesired(
        {name: EnvironmentSpec.model_validate(state.spec) for name, state in saved.items()},
        refusal=refused.error_message if refused is not None and refused.error_message else None,
    )
    return Planner(store, plan_settings(config), lambda: now).decide_now(desired, None, now)


def sqlite_file(world: World) -> Path | None:
    url = load_config(world.config).database_url
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def test_encode_decode_round_trip() -> None:
    at = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
    decisions = [
        Decision("e", "a", "2", "1", "out_of_sync", "out_of_sync", True, "git", 1, None, 7),
        Decision("e", "b", "2", None, "waiting", "waiting: window opens 11:00", not_before=at),
        Decision("e", "c", "1", "1", "synced", "", last_deployment_id=3),
    ]
    assert decode("e", encode(decisions)) == decisions
    same = [
        Decision("e", s, "1", "1", "synced", "", last_deployment_id=i) for i, s in enumerate("xyz")
    ]
    assert decode("e", encode(same)) == same
    assert decode("e", encode([])) == []


@pytest.mark.parametrize(
    "database", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_served_status_equals_a_fresh_plan_after_random_operations(
    tmp_path: Path, database: str, request: pytest.FixtureRequest
) -> None:
    world = World(tmp_path, retries=2)
    if database == "postgres":
        url = request.getfixturevalue("pg_url")
        world.config.write_text(world.config.read_text() + f'\n[database]\nurl = "{url}"\n')
    rng = random.Random(11)
    for env, services in ENVIRONMENTS.items():
        world.repo.write(
            f"{env}.yaml", env_yaml(env, {s: "1.0" for s in services}, **EXTRA.get(env, {}))
        )
    world.repo.commit("start")
    config = load_config(world.config)
    settings = plan_settings(config)
    file = sqlite_file(world)

    async def body(engine: Engine) -> None:
        store = engine.store
        now = datetime(2026, 11, 29, 9, 30, tzinfo=UTC)  # gamma's window: closed until 10:00
        planned: list[int] = []

        def check(step: str) -> None:
            expected = fresh_plan(store, world, now)
            status = saved_status(config, store, None, now)
            assert status is not None and status.decisions == expected, step
            if file is not None:
                reader = SQLiteReader.open(file)
                assert reader is not None
                try:
                    served = saved_status(config, reader, None, now)
                    assert served is not None and served.decisions == expected, step
                finally:
                    reader.close()
            for env in ENVIRONMENTS:  # one environment alone: its part of the whole
                one = saved_status(config, store, env, now)
                assert one is not None
                assert one.decisions == [d for d in expected if d.environment == env], step

        def stored_now() -> None:
            refresh(store, settings, now)
            names = store.environment_names()
            serve(store, settings, now, names, None, planned.append)
            counting = {
                d.environment
                for d in fresh_plan(store, world, now)
                if d.not_before and d.state != "waiting"
            }
            assert planned[-1] == len(counting), "only countdowns are planned right after storing"

        await engine.sync("startup")
        await engine.idle()
        check("startup: nothing stored yet")
        stored_now()
        check("startup: stored")
        suspended: set[str] = set()
        for step in range(30):
            env = rng.choice(sorted(ENVIRONMENTS))
            roll = rng.random()
            now += timedelta(seconds=rng.choice([0, 5, 40, 1200, 3600]))
            if roll < 0.1:  # an operator's retry
                store.reset_streak(env, rng.choice(ENVIRONMENTS[env]))
            elif roll < 0.22:
                _suspend(store, env, env not in suspended, "me", None)
                suspended ^= {env}
            elif roll < 0.32:  # a drift reading: another version live than deployed
                states = store.service_states([env])
                observations = [
                    LiveObservation(
                        e,
                        s,
                        rng.choice([st.deployed_version, "9.9"]),
                        st.last_deployment_id,
                        st.deployed_version,
                        now,
                    )
                    for (e, s), st in states.items()
                ]
                store.save_live_versions(observations)
            elif roll < 0.4:  # the clock alone: windows open and close
                now += timedelta(minutes=rng.choice([30, 61, 125]))
            else:
                versions = {
                    s: f"{step}.{i}" + ("-fail" if rng.random() < 0.4 else "")
                    for i, s in enumerate(ENVIRONMENTS[env])
                }
                world.repo.write(f"{env}.yaml", env_yaml(env, versions, **EXTRA.get(env, {})))
                world.repo.commit(f"step {step}")
                await engine.sync("watch")
                await engine.idle()
            check(f"step {step}")
            if rng.random() < 0.5:
                stored_now()
                check(f"step {step}: stored")
        states = {d.state for d in fresh_plan(store, world, now)}
        assert len(states) >= 3, states

    support.run_engine(world.config, body)


def test_expired_decisions_are_planned_again(tmp_path: Path) -> None:
    """A window that opens makes waiting decisions stale by the clock alone."""
    world = World(tmp_path)
    world.repo.write(
        "gamma.yaml",
        env_yaml("gamma", {"api": "1.0"}, windows='[{cron: "0 10 * * *", duration: 1h}]'),
    )
    world.repo.commit("start")
    config = load_config(world.config)
    settings = plan_settings(config)

    async def body(engine: Engine) -> None:
        store = engine.store
        engine.wake = lambda environments: None  # record only: nothing deploys
        await engine.sync("startup")
        before = datetime(2026, 11, 29, 9, 59, tzinfo=UTC)
        assert refresh(store, settings, before) == 1
        planned: list[int] = []
        waiting = serve(store, settings, before, ["gamma"], None, planned.append)
        assert [d.state for d in waiting] == ["waiting"] and planned == [0]
        assert store.stored_decisions()["gamma"].valid_until == before.replace(minute=0, hour=10)
        opened = before + timedelta(minutes=1)
        served = serve(store, settings, opened, ["gamma"], None, planned.append)
        assert [d.state for d in served] == ["out_of_sync"] and planned == [0, 1]
        assert refresh(store, settings, opened) == 1  # stored again, until it closes
        assert store.stored_decisions()["gamma"].valid_until == opened + timedelta(hours=1)

    support.run_engine(world.config, body)


def test_the_daemon_stores_decisions_after_syncs_and_deployments(tmp_path: Path) -> None:
    """`reconciler run` stores them off the deployment path: once its deployments ended,
    the standalone status plans nothing (and still equals a full plan)."""
    from tests.test_daemon_control import completed
    from tests.test_http_daemon import Served

    world = World(tmp_path, retries=1)
    world.repo.set_env("staging", {"api": "1.0", "web": "2.0"})
    world.repo.set_env("production", {"api": "1.0"}, depends_on=["staging"])
    config = load_config(world.config, environ={})
    settings = plan_settings(config)
    served = Served(world)
    try:
        store = Store.for_reading(config.database_url)

        def planned_now() -> int:
            planned: list[int] = []
            serve(
                store, settings, datetime.now(UTC), store.environment_names(), None, planned.append
            )
            return planned[0]

        try:
            support.wait_for(lambda: len(completed(world, "1.0")) == 2, what="api 1.0 deployed")
            support.wait_for(lambda: planned_now() == 0, what="decisions stored")
            world.repo.set_env("staging", {"api": "1.1", "web": "2.0"})
            support.wait_for(lambda: len(completed(world, "1.1")) == 1, what="api 1.1 deployed")
            support.wait_for(lambda: planned_now() == 0, what="decisions stored again")
            now = datetime.now(UTC)
            status = saved_status(config, store, None, now)
            assert status is not None and status.decisions == fresh_plan(store, world, now)
            assert {d.desired for d in status.decisions if d.environment == "staging"} >= {"1.1"}
        finally:
            store.close()
    finally:
        served.close()
    assert "event=decisions_error" not in served.stderr.read_text()


def test_a_standalone_sync_stores_decisions(tmp_path: Path) -> None:
    world = World(tmp_path, retries=1)
    world.repo.set_env("staging", {"api": "1.0", "web": "2.0-fail"})
    world.repo.set_env("production", {"api": "1.0"}, depends_on=["staging"])
    out = world.cli("sync")
    assert "staging" in out.stdout, out.stderr
    config = load_config(world.config, environ={})
    store = Store.for_reading(config.database_url)
    try:
        assert set(store.stored_decisions()) == {"staging", "production"}
        now = datetime.now(UTC)
        planned: list[int] = []
        served = serve(
            store, plan_settings(config), now, store.environment_names(), None, planned.append
        )
        assert served == fresh_plan(store, world, now) and planned == [0]
        assert {d.state for d in served} >= {"synced", "failed"}
    finally:
        store.close()


def test_the_triggers_count_what_planning_reads_and_nothing_else(store: Store) -> None:
    """Each table planning reads raises its environment's counter (on both databases);
    a drift reading that only moves `observed_at` does not."""
    from tests.test_fleet_status import new_deployment

    now = datetime.now(UTC)

    def count(env: str = "alpha") -> int:
        return store.environment_changes().get(env, 0)

    assert count() == 0
    spec = {"environment": "alpha", "provider": "local", "services": {"api": {"version": "1"}}}
    store.save_environment_states([("alpha", spec, "alpha.yaml")], commit="a" * 40, at=now)
    assert count() == 1
    store.save_environment_states([("alpha", spec, "alpha.yaml")], commit="b" * 40, at=now)
    assert count() == 1  # the same spec saved again
    record = store.create_deployment(new_deployment("alpha", "api", "1"))
    after_create = count()
    assert after_create > 1
    store.set_status(record.id, "in_progress", at=now)
    store.set_status(record.id, "completed", at=now)
    assert count() > after_create
    before = count()
    reading = LiveObservation("alpha", "api", "1", record.id, "1", now)
    store.save_live_versions([reading])
    assert count() == before + 1
    store.save_live_versions([replace(reading, observed_at=now + timedelta(seconds=30))])
    assert count() == before + 1  # the same reading, later
    store.save_live_versions([replace(reading, version="2")])
    assert count() == before + 2
    store.record_operator_action(
        environment="alpha", service=None, action="suspend", actor="me", note=None, at=now
    )
    assert count() == before + 3
    store.reset_streak("alpha", "api")  # nothing to reset: the row is unchanged
    store.forget_environment_states(["alpha"])
    assert count() == before + 4
    assert count("beta") == 0
