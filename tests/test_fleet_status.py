"""The daemon's kept whole-fleet status (reconciler/fleet_status.py) equals a fresh plan.

A real engine (real repository, deploy script, SQLite) runs random commits (versions
that deploy, versions that fail and wait for a retry, a dependency between environments),
operator retries and suspensions, wired as the daemon wires it. After every step the kept
answer equals the planner's fresh one from the store, order included, at a clock that
moves; and unchanged environments were not planned again.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reconciler.engine import Engine
from reconciler.events import EventHub
from reconciler.fleet import FleetSummary
from reconciler.fleet_status import FleetStatus
from reconciler.operations import _suspend
from reconciler.planning import Planner
from reconciler.store import NewDeployment
from tests import support
from tests.support import World, env_yaml

pytestmark = pytest.mark.timeout(120)

ENVIRONMENTS = {"alpha": ["api", "worker"], "beta": ["api", "web"], "gamma": ["api"]}
DEPENDS = {"beta": ["alpha"]}


def new_deployment(environment: str, service: str, version: str) -> NewDeployment:
    return NewDeployment(
        environment=environment,
        service=service,
        version=version,
        previous_version=None,
        provider="local",
        provider_type="command",
        strategy={"type": "rolling"},
        trigger="manual",
        commit="f" * 40,
        commit_author=None,
        attempt=1,
        timeout_seconds=60,
        params={},
    )


def test_the_kept_status_equals_a_fresh_plan_after_random_operations(tmp_path: Path) -> None:
    world = World(tmp_path, retries=2)
    rng = random.Random(7)
    for env, services in ENVIRONMENTS.items():
        world.repo.write(
            f"{env}.yaml",
            env_yaml(env, {s: "1.0" for s in services}, depends_on=DEPENDS.get(env, [])),
        )
    world.repo.commit("start")
    hub = EventHub()

    async def body(engine: Engine) -> None:
        store = engine.store
        summary = FleetSummary(store)
        hub.on_event(summary.on_event)
        engine.planner.states_reader = summary.service_states
        readings = [0]
        kept = FleetStatus(engine.planner, summary, lambda: readings[0])
        fresh = Planner(store, engine.planner.settings, engine.planner.clock)
        now = datetime.now(UTC)

        def check(step: str) -> None:
            expected = fresh.decide_now(engine.snapshot, None, now)
            assert kept.decisions(engine.snapshot, now) == expected, step
            planned = kept.planned
            assert kept.decisions(engine.snapshot, now) == expected, step  # kept: same
            waiting = {d.environment for d in expected if d.not_before or d.deploy}
            assert kept.planned - planned == len(waiting), step  # only those re-planned

        await engine.sync("startup")
        await engine.idle()
        check("startup")
        # beta waits for alpha to complete 2.0; alpha's completion changes beta's decision.
        world.repo.write(
            "beta.yaml", env_yaml("beta", {"api": "2.0", "web": "1.0"}, depends_on=["alpha"])
        )
        world.repo.commit("beta 2.0")
        await engine.sync("watch")
        await engine.idle()
        check("beta waits")
        assert kept.decisions(engine.snapshot, now)[2].state == "waiting"
        record = store.create_deployment(new_deployment("alpha", "api", "2.0"))
        store.set_status(record.id, "in_progress", at=now)
        store.set_status(record.id, "completed", at=now)
        summary.mark("alpha")  # as its deployment events would
        check("alpha completed 2.0")
        suspended: set[str] = set()
        for step in range(16):
            env = rng.choice(sorted(ENVIRONMENTS))
            roll = rng.random()
            now += timedelta(seconds=rng.choice([0, 5, 40]))
            if roll < 0.15:  # an operator's retry: no deployment event, the daemon marks
                store.reset_streak(env, rng.choice(ENVIRONMENTS[env]))
                summary.mark(env)
            elif roll < 0.3:  # suspend or resume, marked as `perform` does
                _suspend(store, env, env not in suspended, "me", None)
                suspended ^= {env}
                summary.mark(env)
            elif roll < 0.35:  # a drift reading saved
                readings[0] += 1
            else:
                versions = {
                    s: f"{step}.{i}" + ("-fail" if rng.random() < 0.4 else "")
                    for i, s in enumerate(ENVIRONMENTS[env])
                }
                world.repo.write(
                    f"{env}.yaml", env_yaml(env, versions, depends_on=DEPENDS.get(env, []))
                )
                world.repo.commit(f"step {step}")
                await engine.sync("watch")
                await engine.idle()
            check(f"step {step}")
        states = {d.state for d in fresh.decide_now(engine.snapshot, None, now)}
        assert len(states) >= 2, states

    support.run_engine(world.config, body, listener=hub.deployment)
