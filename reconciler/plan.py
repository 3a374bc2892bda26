"""Desired state + recorded state → one decision per service (SPEC §4 rules 1–5).

Pure: no git, no database, no clock of its own. The engine passes values in and acts on the
decisions; `reconciler plan` and `reconciler status` print them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import NamedTuple
from zoneinfo import ZoneInfo

from desired_state import EnvironmentSpec, Window, format_duration


class ServiceRecord(NamedTuple):
    """What the ledger says about one service (a row of the store's service_state).

    A named tuple, as `ServiceState`: a whole-fleet status makes 20,000 of them."""

    deployed_version: str | None = None
    running: bool = False
    last_status: str | None = None
    last_version: str | None = None
    last_deployment_id: int | None = None
    streak_version: str | None = None  # version of the current run of failed attempts
    streak_count: int = 0
    streak_last_at: datetime | None = None


@dataclass(frozen=True)
class LiveVersion:
    """A version read from the target (reconciler/drift.py), and the service's latest
    deployment when it was read: a reading older than the latest deployment says nothing
    about what that deployment left running, so the planner ignores it."""

    version: str
    deployment_id: int | None


@dataclass(frozen=True)
class RecordedState:
    services: Mapping[tuple[str, str], ServiceRecord] = field(default_factory=dict)
    operator_suspended: frozenset[str] = frozenset()
    # (environment, service, version) triples with a completed deployment: for depends_on.
    completed: frozenset[tuple[str, str, str]] = frozenset()
    # Live versions read from the targets (only the known ones): for drift.
    live: Mapping[tuple[str, str], LiveVersion] = field(default_factory=dict)


def drifted_from(rec: ServiceRecord, live: LiveVersion | None) -> str | None:
    """The live version when it differs from the deployed one (and the reading is not older
    than the latest deployment); None when there is no drift to speak of."""
    if (
        live is None
        or rec.running
        or rec.deployed_version is None
        or live.deployment_id != rec.last_deployment_id
        or live.version == rec.deployed_version
    ):
        return None
    return live.version


@dataclass(frozen=True)
class PlanSettings:
    retries: int = 3
    retry_backoff: float = 30.0
    timezone: tzinfo = UTC


class Decision(NamedTuple):
    """What planning says of one service. A named tuple, as `ServiceRecord`: `status`
    builds 20,000 of them from the stored decisions (reconciler/stored_status.py), ~4x
    cheaper than a frozen dataclass."""

    environment: str
    service: str
    desired: str | None
    deployed: str | None
    state: (
        str  # synced | out_of_sync | deploying | failed | waiting | suspended | invalid | drifted
    )
    message: str
    deploy: bool = False  # start a deployment now
    trigger: str | None = None  # git | retry | drift, when deploy
    attempt: int = 0
    not_before: datetime | None = None  # when a waiting decision may change by itself
    last_deployment_id: int | None = None

    def status_json(self, commit: str | None) -> dict[str, object]:
        """One entry of `status --json` and GET /api/v1/status (SPEC §5)."""
        return {
            "environment": self.environment,
            "service": self.service,
            "desired": self.desired,
            "deployed": self.deployed,
            "state": self.state,
            "commit": commit,
            "last_deployment_id": self.last_deployment_id,
            "message": self.message or None,
        }

    def to_json(self) -> dict[str, object]:
        return {
            "environment": self.environment,
            "service": self.service,
            "desired": self.desired,
            "deployed": self.deployed,
            "state": self.state,
            "action": "deploy" if self.deploy else None,
            "trigger": self.trigger,
            "attempt": self.attempt or None,
            "message": self.message,
            "not_before": _iso(self.not_before),
            "last_deployment_id": self.last_deployment_id,
        }


FAILURE_STATUSES = frozenset({"failed", "timed_out", "rolled_back"})


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def dependency_triples(desired: Mapping[str, EnvironmentSpec]) -> set[tuple[str, str, str]]:
    """The (environment, service, version) facts that `depends_on` needs from the ledger."""
    out: set[tuple[str, str, str]] = set()
    for spec in desired.values():
        for dep in spec.depends_on:
            for name, svc in spec.services.items():
                out.add((dep, name, svc.version))
    return out


def window_state(
    windows: Iterable[Window], now: datetime, default_tz: tzinfo
) -> tuple[bool, datetime | None]:
    """(open now, next opening). No windows means always open."""
    windows = list(windows)
    if not windows:
        return True, None
    from croniter import croniter  # only for windows: `status` of most fleets never needs it

    next_open: datetime | None = None
    for w in windows:
        tz = ZoneInfo(w.timezone) if w.timezone else default_tz
        local_now = now.astimezone(tz)
        # The latest opening at or before now is the first cron time after now - duration.
        start = croniter(w.cron, local_now - timedelta(seconds=w.duration)).get_next(datetime)
        if start <= local_now:
            return True, None
        nxt = croniter(w.cron, local_now).get_next(datetime)
        if next_open is None or nxt < next_open:
            next_open = nxt
    return False, next_open


def _when(t: datetime, now: datetime) -> str:
    local = t.astimezone(now.tzinfo) if now.tzinfo else t
    if local.date() == now.date():
        return local.strftime("%H:%M")
    return local.strftime("%a %d %b %H:%M")


def plan_environment(
    spec: EnvironmentSpec,
    recorded: RecordedState,
    now: datetime,
    settings: PlanSettings,
    declared: Mapping[str, Collection[str]] | None = None,
) -> list[Decision]:
    """One decision per service of one environment, in file order.

    `declared` maps each environment to the services it declares: a `depends_on` environment
    only gates the services it has (None: it gates all of them).
    """
    env = spec.environment
    out: list[Decision] = []
    suspended = spec.suspended or env in recorded.operator_suspended
    is_open, next_open = window_state(spec.windows, now, settings.timezone)
    for name, svc in spec.services.items():
        rec = recorded.services.get((env, name), ServiceRecord())
        base = _Base(env, name, svc.version, rec.deployed_version, rec.last_deployment_id)
        if rec.running:
            out.append(base.decide(state="deploying", message="deployment running"))
            continue
        if rec.deployed_version == svc.version:
            live = drifted_from(rec, recorded.live.get((env, name)))
            if live is not None:
                out.append(
                    _drift_decision(
                        base, spec, rec, live, suspended, is_open, next_open, now, settings
                    )
                )
                continue
            if suspended:
                out.append(base.decide(state="suspended", message=_why_suspended(spec)))
            else:
                out.append(base.decide(state="synced", message=""))
            continue
        if suspended:
            msg = f"{_why_suspended(spec)}; wants {svc.version}"
            out.append(base.decide(state="suspended", message=msg))
            continue
        failures = rec.streak_count if rec.streak_version == svc.version else 0
        if failures >= settings.retries:
            msg = (
                f"gave up after {failures} attempt{'s' if failures != 1 else ''}; commit a new "
                f"version or run `reconciler sync --env {env} --service {name}`"
            )
            out.append(base.decide(state="failed", message=msg))
            continue
        if failures and rec.streak_last_at is not None:
            retry_at = rec.streak_last_at + timedelta(
                seconds=settings.retry_backoff * 2 ** (failures - 1)
            )
            if retry_at > now:
                wait = format_duration((retry_at - now).total_seconds())
                msg = f"attempt {failures} failed; retry in {wait}"
                out.append(base.decide(state="failed", message=msg, not_before=retry_at))
                continue
        if not is_open:
            assert next_open is not None
            msg = f"waiting: window opens {_when(next_open, now.astimezone(next_open.tzinfo))}"
            out.append(
                base.decide(state="waiting", message=msg, not_before=next_open.astimezone(UTC))
            )
            continue
        blocked = [
            dep
            for dep in spec.depends_on
            if (dep, name, svc.version) not in recorded.completed
            and (declared is None or name in declared.get(dep, ()))
        ]
        if blocked:
            msg = f"waiting: depends_on {', '.join(blocked)} ({name} {svc.version} not completed there)"
            out.append(base.decide(state="waiting", message=msg))
            continue
        trigger = "retry" if failures else "git"
        msg = "out_of_sync" if not failures else f"retry {failures + 1} of {settings.retries}"
        out.append(
            base.decide(
                state="out_of_sync",
                message=msg,
                deploy=True,
                trigger=trigger,
                attempt=failures + 1,
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class _Base:
    """What every decision about one service shares (built once per service: the planner
    runs over tens of thousands of services)."""

    environment: str
    service: str
    desired: str
    deployed: str | None
    last_deployment_id: int | None

    def decide(
        self,
        state: str,
        message: str,
        *,
        deploy: bool = False,
        trigger: str | None = None,
        attempt: int = 0,
        not_before: datetime | None = None,
    ) -> Decision:
        return Decision(
            self.environment,
            self.service,
            self.desired,
            self.deployed,
            state,
            message,
            deploy,
            trigger,
            attempt,
            not_before,
            self.last_deployment_id,
        )


def _drift_decision(
    base: _Base,
    spec: EnvironmentSpec,
    rec: ServiceRecord,
    live: str,
    suspended: bool,
    is_open: bool,
    next_open: datetime | None,
    now: datetime,
    settings: PlanSettings,
) -> Decision:
    """State `drifted`; with `self_heal` (and not suspended) the deployed version is
    deployed again, trigger `drift`, under the same retry, backoff and window rules."""
    msg = f"live version is {live}, deployed {rec.deployed_version}"
    if suspended:
        return base.decide(state="drifted", message=f"{msg}; {_why_suspended(spec)}")
    if not spec.self_heal:
        return base.decide(state="drifted", message=msg)
    failures = rec.streak_count if rec.streak_version == base.desired else 0
    if failures >= settings.retries:
        return base.decide(
            state="drifted", message=f"{msg}; self-heal gave up after {failures} attempts"
        )
    if failures and rec.streak_last_at is not None:
        retry_at = rec.streak_last_at + timedelta(
            seconds=settings.retry_backoff * 2 ** (failures - 1)
        )
        if retry_at > now:
            wait = format_duration((retry_at - now).total_seconds())
            return base.decide(
                state="drifted", message=f"{msg}; self-heal retry in {wait}", not_before=retry_at
            )
    if not is_open:
        assert next_open is not None
        when = _when(next_open, now.astimezone(next_open.tzinfo))
        return base.decide(
            state="drifted",
            message=f"{msg}; self-heal waits: window opens {when}",
            not_before=next_open.astimezone(UTC),
        )
    return base.decide(
        state="drifted",
        message=f"{msg}; self-heal",
        deploy=True,
        trigger="drift",
        attempt=failures + 1,
    )


def _why_suspended(spec: EnvironmentSpec) -> str:
    return "suspended in git" if spec.suspended else "suspended by operator"


def plan(
    desired: Mapping[str, EnvironmentSpec],
    recorded: RecordedState,
    now: datetime,
    settings: PlanSettings,
    invalid: Mapping[str, str] | None = None,
    declared: Mapping[str, Collection[str]] | None = None,
) -> list[Decision]:
    """Decisions for every service; environments whose file is broken deploy nothing.

    `declared`: the services of every environment, when `desired` is only a part of them.
    """
    out: list[Decision] = []
    invalid = invalid or {}
    if declared is None:
        declared = {env: spec.services.keys() for env, spec in desired.items()}
    for env, message in invalid.items():
        if env not in desired:  # never valid: no services known
            out.append(Decision(env, "*", None, None, state="invalid", message=message))
    for env, spec in desired.items():
        if env in invalid:
            for name, svc in spec.services.items():
                rec = recorded.services.get((env, name), ServiceRecord())
                out.append(
                    Decision(
                        environment=env,
                        service=name,
                        desired=svc.version,
                        deployed=rec.deployed_version,
                        state="invalid",
                        message=invalid[env],
                        last_deployment_id=rec.last_deployment_id,
                    )
                )
            continue
        out.extend(plan_environment(spec, recorded, now, settings, declared))
    return out
