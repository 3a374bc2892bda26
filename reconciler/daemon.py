"""The long-running process: start, watch, poll, sync, serve, stop, reload.

Everything runs on one asyncio loop. Sync requests (a watched commit, a poll tick, a
webhook, an operator's SIGUSR1 or API call) only set a flag; one sync task drains it, so a
storm of requests becomes one fetch of the newest head. systemd hears about it all through
the notify protocol: READY once migrations ran and the first fetch worked, STATUS lines,
WATCHDOG pings that stop when the reconcile loop is stuck, STOPPING and RELOADING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import signal
import socket
import struct
import sys
import time
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any, cast

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from pydantic import BaseModel

from reconciler import chain_head, channel, stored_status
from reconciler.bus import Bus, open_bus
from reconciler.config import Config, ConfigError, load_config
from reconciler.engine import Engine, SyncOutcome, open_source, open_verifier
from reconciler.events import Event, EventHub
from reconciler.executor import DeploymentEvent, durable, utcnow
from reconciler.fleet import FleetSummary
from reconciler.fleet_status import FleetStatus
from reconciler.http import HttpServer, start_http
from reconciler.lock import StateLock
from reconciler.notify import Notifier
from reconciler.operations import AnyAction, handle, perform
from reconciler.plan import Decision
from reconciler.providers import build_providers
from reconciler.replicas import Replica, new_identity
from reconciler.source import poll_delay, watch_refs
from reconciler.store import DeploymentRecord, LedgerCheck, Store, schema_current, verify
from reconciler.store.holder import DatabaseHeld, DatabaseLock
from reconciler.systemd import SystemdNotifier

log = logging.getLogger(__name__)

HTTP_WIRED = True  # tests/test_http_daemon.py runs against the real daemon

# Time systemd grants for start-up work that may be long (migrations on a big database).
STARTUP_EXTEND_SECONDS = 600.0
# A sync running longer than this means the loop is stuck: stop the watchdog pings so
# systemd restarts the service (git commands time out well before).
STUCK_SYNC_SECONDS = 300.0
# The hub wakes the notifier at once; this poll only finds what other processes recorded
# (a standalone `reconciler sync`), so it can be slow and keep the idle daemon asleep.
NOTIFY_POLL_SECONDS = 30.0
# How often the daemon checks that its SQLite file is still the database (one stat) and
# that its PostgreSQL session still holds the database lock (one SELECT 1).
DATABASE_CHECK_SECONDS = 5.0
# How soon a watch that could not start (no repository yet, a vanished folder) tries again.
WATCH_RETRY_SECONDS = 2.0
#: The notice listener's reconnect backoff and idle check (reconciler.bus.PostgresBus);
#: tests shorten them.
BUS_OPTIONS: dict[str, float] = {"retry_min": 0.5, "retry_max": 30.0, "check_interval": 30.0}
#: How often retention (`[audit] keep`) looks for old runs' detail to prune, at most.
PRUNE_EVERY_SECONDS = 3600.0
#: After a sync or deployment event, how long to gather more before storing decisions.
DECISIONS_DELAY = 2.0


class Daemon:
    def __init__(self, config: Config, config_path: str | os.PathLike[str] | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.engine: Engine | None = None
        self.hub = EventHub()
        self.sd = SystemdNotifier()
        self.ready = asyncio.Event()
        self._sync_requested = asyncio.Event()
        self._decisions_due = asyncio.Event()  # environments changed: store decisions
        self._triggers: set[str] = set()  # every reason asked for since the last sync began
        self._stop = asyncio.Event()
        self._sync_started: float | None = None
        self._syncs_begun = 0  # whether any sync has read the head yet (the watch's catch-up)
        self._last_fetch_error: str | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._http: HttpServer | None = None
        self._control: asyncio.Server | None = None
        self._notifier: Notifier | None = None
        self._held: DatabaseLock | None = None
        # On PostgreSQL: this daemon as one of the replicas sharing the database's work.
        self.replica: Replica | None = None
        self._leases_stop = asyncio.Event()
        self._fatal: Exception | None = None  # raised by run() once stopped
        self.fleet: FleetSummary | None = None  # every service's state, kept in memory
        self.fleet_status: FleetStatus | None = None  # the fleet's decisions, kept likewise
        self._next_prune = 0.0  # monotonic time retention may prune again
        self._ledger_check: LedgerCheck | None = None  # the last walk of the audit ledger
        self.bus: Bus | None = None  # notices from and to the other replicas

    # ---- what the HTTP API and signals call (reconciler.http.control.Control) -----------

    @property
    def store(self) -> Store:
        assert self.engine is not None
        return self.engine.store

    def is_ready(self) -> bool:
        return self.ready.is_set()

    def last_fetch_error(self) -> str | None:
        return self._last_fetch_error

    async def status(self, environment: str | None) -> tuple[str | None, list[Decision]]:
        assert self.engine is not None
        engine = self.engine
        commit = engine.commit.sha if engine.commit else None
        if environment or self.fleet_status is None:
            return commit, await engine.decisions([environment] if environment else None)
        planner = engine.planner
        decisions = await asyncio.to_thread(
            self.fleet_status.decisions, engine.snapshot, planner.clock()
        )
        return commit, decisions

    async def status_report(self, environment: str | None) -> channel.StatusReport | channel.Failed:
        """`reconciler status` answered from the fleet summary (the control channel).
        Failed with code 1 while the daemon cannot answer yet: the CLI reads the store."""
        engine = self.engine
        if engine is None or not self.ready.is_set():
            return channel.Failed(message="the daemon is starting")
        if (
            environment is not None
            and engine.commit is not None
            and environment not in engine.effective
            and environment not in engine.invalid
        ):
            return channel.Failed(message=f"unknown environment '{environment}'", code=2)
        commit, decisions = await self.status(environment)
        reasons = await durable(engine.store.suspension_reasons)
        return channel.StatusReport.model_construct(  # the daemon's own data: the CLI validates
            commit=commit,
            refusal=engine.snapshot.refusal,
            reasons=reasons,
            services=cast(list[channel.StatusEntry], [d.status_json(commit) for d in decisions]),
        )

    def _gained(self, environments: list[str]) -> None:
        """Environments this replica has just claimed: their rows were written by another."""
        if self.fleet is not None:
            for env in environments:
                self.fleet.mark(env)

    def service_state_changed(self, environment: str) -> None:
        """A reset streak publishes no deployment event: the fleet summary is told here."""
        if self.fleet is not None:
            self.fleet.mark(environment)
        self._decisions_due.set()

    def request_sync(self, trigger: str) -> None:
        # Requests coalesce into one sync, but none is forgotten: the set of reasons is
        # kept, the sync records the strongest, and an operator's (or a reload's) wakes
        # every environment even when a commit's request came in after it.
        self._triggers.add(trigger)
        self._sync_requested.set()

    async def retry(self, environment: str, service: str, origin: str | None = None) -> None:
        """An operator asks to try a version that gave up again (SPEC §4 rule 4)."""
        engine = self.engine
        assert engine is not None
        spec = engine.effective.get(environment)
        if spec is None or service not in spec.services:
            raise KeyError(f"{environment}/{service}")
        await durable(engine.store.reset_streak, environment, service)
        self.service_state_changed(environment)
        await durable(
            engine.store.record_operator_action,
            environment=environment,
            service=service,
            action="retry",
            actor=self.config.server.token_holder,
            note=None,
            at=utcnow(),
            origin=origin,
        )
        engine.wake([environment])

    async def act(
        self, action: AnyAction, actor: str, origin: str | None = None
    ) -> channel.Accepted:
        """An operator action asked over HTTP: carried out as over the control socket."""
        return (await perform(self, action, actor, origin)).accepted

    def start(
        self, work: Coroutine[Any, Any, list[DeploymentRecord]], name: str
    ) -> asyncio.Task[list[DeploymentRecord]]:
        """Run an operator's deployments as the daemon's own task (stopped with it)."""
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def queue_depth(self) -> int:
        return self.engine.queue_depth() if self.engine else 0

    def lease_counts(self) -> tuple[int, int]:
        replica = self.replica
        if replica is None:
            return 1, 0
        return len(replica.live), len(replica.held)

    def notification_stats(self) -> dict[str, dict[str, int]]:
        return self._notifier.stats() if self._notifier else {}

    def drifted_services(self) -> dict[str, int]:
        return self.engine.drift.drifted_by_environment() if self.engine else {}

    def ledger_check(self) -> LedgerCheck | None:
        return self._ledger_check

    def stop(self) -> None:
        self._stop.set()

    # ---- life cycle --------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.config
        providers = build_providers(cfg)
        lock = StateLock(cfg.state_dir)
        lock.acquire()
        try:
            self.sd.status("migrating the database")
            self.sd.extend_timeout(STARTUP_EXTEND_SECONDS)
            store = await asyncio.to_thread(Store.from_url, cfg.database_url, migrate=False)
            if not await asyncio.to_thread(schema_current, store.engine):
                applied = await migrate_in_child(cfg.database_url)
                log.info("event=migrated revisions=%s", ",".join(applied) or "-")
            # SQLite: one daemon per database, before recovery, which would fail another's
            # runs. PostgreSQL: replicas share it (leases); no standalone command beside them.
            held = DatabaseLock(store.engine)
            replicated = store.engine.dialect.name == "postgresql"
            await asyncio.to_thread(
                held.acquire,
                role="daemon",
                state_dir=str(cfg.state_dir),
                at=utcnow(),
                shared=replicated,
            )
            self._held = held
            await self._open_bus(store)
            source = open_source(cfg)
            engine = self.engine = Engine(
                cfg, store, source, providers, listener=self.hub.deployment
            )
            engine.on_sync = self.hub.sync
            await engine.check_signers()  # a key file that cannot be used: exit 2
            self.hub.on_event(self._on_event)
            if replicated:
                # Each environment's recovery waits for its lease (reconciler/replicas.py).
                replica = self.replica = Replica(
                    engine,
                    ttl=cfg.daemon.lease_ttl,
                    environments=lambda: list(engine.effective),
                    identity=new_identity(str(cfg.state_dir)),
                )
                engine.runners.fence_for = replica.fence
                engine.drift.specs = lambda: {
                    env: spec for env, spec in engine.effective.items() if replica.holds(env)
                }
            else:
                await engine.recover()
            # Status reads the fleet from memory: every deployment event marks its
            # environment, whose rows the next read takes from the store.
            self.fleet = FleetSummary(store)
            self.hub.on_event(self.fleet.on_event)
            if self.replica is not None:
                self.replica.on_gained = self._gained
                self.replica.on_change = self._announce_replicas
                # Renewed until the runners ended, through the stop's grace period too.
                self._spawn(
                    self.replica.run(cfg.daemon.lease_renew_seconds, self._leases_stop),
                    "replica-leases",
                )
            engine.planner.states_reader = self.fleet.service_states
            # ... and plans again only the environments changed since the last request.
            drift = engine.drift
            self.fleet_status = FleetStatus(engine.planner, self.fleet, lambda: drift.readings)
            scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop())
            engine.scheduler = scheduler
            scheduler.start()
            engine.drift.start()  # live versions, off the deployment path
            loop = asyncio.get_running_loop()
            for sig, handler in (
                (signal.SIGTERM, self.stop),
                (signal.SIGINT, self.stop),
                (signal.SIGHUP, lambda: self._spawn(self.reload(), "reload")),
                (signal.SIGUSR1, lambda: self.request_sync("manual")),
            ):
                loop.add_signal_handler(sig, handler)
            await self._open_control()
            self._spawn(self._sync_loop(), "sync-loop")
            self._spawn(self._watchdog_loop(), "watchdog")
            self._spawn(self._database_check_loop(), "database-check")
            self._spawn(self._decisions_loop(), "stored-decisions")
            if cfg.audit.verify_interval > 0:
                self._spawn(self._verify_loop(cfg.audit.verify_interval), "audit-verify")
            self._start_polling()
            watching = cfg.repository.watch and source.is_local()
            if watching:
                self._spawn(self._watch_loop(), "watch")
            await self._start_services()
            log.info(
                "event=started pid=%d repository=%s branch=%s database=%s watch=%s poll=%ss",
                os.getpid(),
                cfg.repository_url,
                cfg.repository.branch,
                _safe_url(cfg.database_url),
                watching,
                cfg.repository.poll_interval,
            )
            self.sd.status("fetching the repository")
            self.request_sync("startup")
            await self._stop.wait()
            await self._close_control()  # no new operator actions while stopping
            grace = self.config.daemon.shutdown_grace
            self.sd.stopping(extend_seconds=grace + self.config.daemon.kill_grace + 30)
            self.sd.status(f"stopping: {len(engine.deploying)} deploying, grace {grace:g}s")
            log.info("event=stopping grace=%ss deploying=%d", grace, len(engine.deploying))
            cancelled = await engine.stop(grace)
            if self.replica is not None:
                self._leases_stop.set()
                await self.replica.leave()
            await self._audit()  # the head after the last runs ended
            await self._stop_services()
            tasks = [*self._tasks, *([self._poll_task] if self._poll_task else [])]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if cancelled:
                log.warning("event=cancelled_at_stop ids=%s", ",".join(map(str, cancelled)))
            source.close()
            log.info("event=stopped")
            if self._fatal is not None:
                raise self._fatal
        finally:
            if self.bus is not None:
                await self.bus.stop()
            if self._held is not None:
                await asyncio.to_thread(self._held.release)
            lock.release()
            self.sd.close()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event=task_failed task=%s error=%r", task.get_name(), str(task.exception()))

    async def _start_services(self) -> None:
        """The notifier and the HTTP server (when `server.listen` is set)."""
        assert self.engine is not None
        self._notifier = Notifier(
            self.config, self.engine.store, self.hub, poll_interval=NOTIFY_POLL_SECONDS
        )
        self._spawn(self._notifier.run(), "notify")
        if self.config.server.listen:
            # Other processes' deployments only on a shared database (on SQLite every
            # deployment is this process's: the hub carries its progress).
            shared = self.bus if self.bus is not None and self.bus.shared else None
            self._http = await start_http(self, bus=shared)

    # ---- the control channel (reconciler.channel) --------------------------------------

    async def _open_control(self) -> None:
        """The unix socket the CLI asks through: mode 0600 in the 0700 state directory
        (the daemon holds the state lock, so a socket file left there is a dead one's)."""
        state_dir = self.config.state_dir
        os.chmod(state_dir, 0o700)
        path = channel.socket_path(state_dir)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        old = os.umask(0o177)
        try:
            self._control = await asyncio.start_unix_server(
                self._converse, channel.reachable(path), limit=channel.LINE_LIMIT
            )
        finally:
            os.umask(old)
        os.chmod(path, 0o600)

    async def _close_control(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
            with contextlib.suppress(FileNotFoundError):
                channel.socket_path(self.config.state_dir).unlink()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request, its answers. A client that leaves mid-way stops only the following:
        what the daemon set going goes on."""
        try:
            pid, uid = _peer(writer)
            if uid not in (os.getuid(), 0):
                await _send(writer, channel.Failed(message="not the daemon's user", code=2))
                return
            line = await reader.readline()
            try:
                action = channel.parse(line, channel.ACTION)
            except ValueError as exc:
                await _send(writer, channel.Failed(message=f"bad request: {exc}", code=2))
                return
            if isinstance(action, channel.StatusQuery):  # a read: nothing recorded
                await _send(writer, await self.status_report(action.environment))
                return
            events = self.hub.subscribe()
            try:
                origin = f"control socket, pid {pid}"
                async for answer in handle(self, action, _user_name(uid), events, origin):
                    await _send(writer, answer)
            finally:
                events.close()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass  # the client went away (or sent a line longer than LINE_LIMIT)
        except Exception:
            log.exception("event=control_error")
        finally:
            writer.close()

    async def _stop_services(self) -> None:
        await self._close_control()
        if self._http is not None:
            await self._http.stop()
            self._http = None

    def _start_polling(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
            self._poll_task = None
        if self.config.repository.poll_interval > 0:
            self._poll_task = asyncio.create_task(self._poll_loop(), name="poll")

    async def reload(self) -> None:
        """SIGHUP: read the configuration again; keep the old one if the new one is bad."""
        assert self.engine is not None
        self.sd.reloading()
        try:
            try:
                new = await asyncio.to_thread(load_config, self.config_path)
                providers = build_providers(new)
                _check_reloadable(self.config, new)
                verifier = open_verifier(new)
                if verifier is not None:  # the new keys must be usable before they replace
                    await asyncio.to_thread(verifier.prepare)
                if self._notifier is not None:
                    self._notifier.reload(new)  # checks the targets; keeps the old on error
            except ConfigError as exc:
                log.error("event=reload_refused error=%r", str(exc))
                return
            self.config = new
            self.engine.reload(new, providers)
            self._start_polling()
            log.info("event=reloaded providers=%s", ",".join(sorted(providers)) or "-")
            self.request_sync("reload")
        finally:
            self.sd.ready()

    # ---- loops -------------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        assert self.engine is not None
        retry = 1.0
        while True:
            await self._sync_requested.wait()
            self._sync_requested.clear()
            triggers, self._triggers = self._triggers, set()
            trigger = strongest(triggers)
            self._sync_started = time.monotonic()
            self._syncs_begun += 1
            before = self.engine.commit.sha if self.engine.commit else None
            try:
                outcome = await self.engine.sync(trigger)
            except Exception as exc:  # the database is away, say: try the same sync again soon
                log.error(
                    "event=sync_error error=%r", f"{type(exc).__name__}: {exc}".splitlines()[0]
                )
                await asyncio.sleep(retry)
                retry = min(retry * 2, 60.0)
                for again in triggers:
                    self.request_sync(again)
                continue
            finally:
                self._sync_started = None
            await self._audit()
            if self.replica is not None and outcome.result not in ("failed", "unchanged"):
                # new environments, say; a poll that found the same head changes nothing
                # (with a 1 s poll that was a lease pass a second), the timer covers the rest
                self._spawn(self.replica.rebalance(), "rebalance")
            after = self.engine.commit.sha if self.engine.commit else None
            if after is not None and after != before and trigger != "notice":
                self._announce_head(after)  # a head applied here, not one refused
            if outcome.result != "failed":
                retry = 1.0
                if not self.ready.is_set():
                    self.ready.set()
                    self.sd.ready(self._status_line())
                    log.info("event=ready commit=%s", (outcome.commit or "")[:12])
                if triggers & WAKE_ALL:
                    self.engine.wake(self.engine.effective)
            elif not self.ready.is_set():
                # Until the first fetch works there is nothing to reconcile: keep trying.
                await asyncio.sleep(retry)
                retry = min(retry * 2, max(self.config.repository.poll_interval, 5.0))
                self.request_sync("startup")

    async def _audit(self) -> None:
        """After each sync and at stop: prune what retention lets go (at most every
        PRUNE_EVERY_SECONDS), then publish the ledger head. A failure is logged: the ledger
        itself is in the database already, and the next sync publishes again."""
        audit = self.config.audit
        if audit.keep is None and audit.head is None:
            return
        try:
            store = self.store
            now = time.monotonic()
            if audit.keep is not None and now >= self._next_prune:
                self._next_prune = now + PRUNE_EVERY_SECONDS
                cutoff = utcnow() - timedelta(seconds=audit.keep)
                pruned = await durable(store.prune_history, cutoff)
                if pruned.deployments:
                    log.info(
                        "event=audit_pruned deployments=%d events=%d log_lines=%d before=%s",
                        pruned.deployments,
                        pruned.events,
                        pruned.log_lines,
                        cutoff.isoformat(),
                    )
            target = self.config.audit_head
            if target is not None:
                head = await durable(store.head)
                if head is not None:
                    await chain_head.publish(target, head.to_json())
        except Exception as exc:
            log.error("event=audit_error error=%r", f"{type(exc).__name__}: {exc}".splitlines()[0])

    async def _verify_loop(self, interval: float) -> None:
        """Walk the whole audit ledger now and every ``interval`` (`[audit] verify_interval`):
        the dashboard's badge, and a log line an alert can watch. It runs in a worker thread
        and gives up at the next page once the daemon stops."""

        def stopping(_phase: str, _done: int, _total: int) -> None:
            if self._stop.is_set():
                raise asyncio.CancelledError

        while not self._stop.is_set():
            try:
                published = await self._published_head()
                report = await asyncio.to_thread(
                    verify, self.store, published=published, progress=stopping
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away, say: the next walk tells
                log.error(
                    "event=audit_verify_error error=%r",
                    f"{type(exc).__name__}: {exc}".splitlines()[0],
                )
            else:
                self._ledger_check = LedgerCheck(utcnow(), report)
                if report.ok:
                    log.info("event=audit_verified entries=%d", report.entries)
                else:
                    first = report.findings[0].line()
                    log.error(
                        "event=audit_broken findings=%d first=%r",
                        len(report.findings) + report.more,
                        first,
                    )
            await asyncio.sleep(interval)

    async def _published_head(self) -> dict[str, Any] | None:
        """The head as last published (`[audit] head`), None when none is configured or it
        cannot be read yet (before the first sync publishes it: logged, `audit verify`
        still reports it)."""
        target = self.config.audit_head
        if target is None:
            return None
        try:
            return await asyncio.to_thread(chain_head.read, target)
        except chain_head.HeadError as exc:
            log.warning("event=audit_head_unreadable error=%r", str(exc))
            return None

    async def _decisions_loop(self) -> None:
        """Store the decisions of the environments changed since the last pass, for a
        standalone `status` (reconciler/stored_status.py). Off the deployment path: a
        burst of events (a sync, deployments ending) is one pass, ``DECISIONS_DELAY``
        after its first; the pass plans only what changed, in a worker thread."""
        engine = self.engine
        assert engine is not None
        await self.ready.wait()
        self._decisions_due.set()  # once at start: the database may hold none yet
        while True:
            await self._decisions_due.wait()
            await asyncio.sleep(DECISIONS_DELAY)
            self._decisions_due.clear()
            try:
                await asyncio.to_thread(
                    stored_status.refresh, engine.store, engine.settings, engine.clock()
                )
            except Exception as exc:  # the database is away, say: the next change retries
                log.warning(
                    "event=decisions_error error=%r",
                    f"{type(exc).__name__}: {exc}".splitlines()[0],
                )

    async def _watchdog_loop(self) -> None:
        """WATCHDOG=1 at half the interval, only while the reconcile loop is healthy: a
        blocked event loop or a sync stuck for STUCK_SYNC_SECONDS gets the service restarted."""
        interval = self.sd.watchdog_seconds
        if interval is None:
            return
        while True:
            started = self._sync_started
            if started is not None and time.monotonic() - started > STUCK_SYNC_SECONDS:
                log.error("event=watchdog_withheld reason=%r", "sync stuck")
            else:
                self.sd.watchdog()
            await asyncio.sleep(interval / 2)

    async def _database_check_loop(self) -> None:
        """What no query notices: a SQLite file deleted or replaced underneath (queries
        write into the unlinked file; the store logs `event=database_lost` once, shown in
        the status line, /readyz and metrics), and a PostgreSQL session that ended and took
        the database lock with it (taken again if free; if another daemon has it, stop)."""
        said = False
        while True:
            if not said and self.store.file_problem() is not None:
                said = True
                self.sd.status(self._status_line())
            if self._held is not None:
                try:
                    await asyncio.to_thread(self._held.check, at=utcnow())
                except DatabaseHeld as exc:
                    log.error("event=database_lock_lost error=%r", str(exc))
                    self._fatal = exc
                    self.stop()
                    return
            await asyncio.sleep(DATABASE_CHECK_SECONDS)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(poll_delay(self.config.repository.poll_interval))
            self.request_sync("poll")

    async def _watch_loop(self) -> None:
        assert self.engine is not None
        while True:
            # Asked again each time: the repository may appear (or move) after start-up.
            git_dir = await asyncio.to_thread(self.engine.source.local_git_dir)
            if git_dir is None or not (git_dir / "HEAD").exists():
                await asyncio.sleep(WATCH_RETRY_SECONDS)
                continue
            ready = asyncio.Event()
            # A commit that landed before the watch was in place is caught by one more look.
            catch_up = asyncio.create_task(self._catch_up(ready))
            try:
                async for _ in watch_refs(
                    git_dir, self.config.repository.branch, stop=self._stop, ready=ready
                ):
                    self.request_sync("watch")
                return
            except Exception as exc:  # the folder vanished, say: try again in a while
                log.warning("event=watch_failed error=%r", str(exc))
                await asyncio.sleep(WATCH_RETRY_SECONDS)
            finally:
                catch_up.cancel()

    async def _catch_up(self, ready: asyncio.Event) -> None:
        """Once the watch is in place, look at the head again if a sync already read it
        (a commit may have come in between). Before the first sync nothing needs it: the
        startup sync, always requested, reads the head after this; so the first sync is
        logged once, as `startup`."""
        await ready.wait()
        if self._syncs_begun:
            self.request_sync("watch")

    # ---- notices between replicas (reconciler.bus) --------------------------------------

    async def _open_bus(self, store: Store) -> None:
        """Listen to the other replicas: a head one of them fetched, a suspension."""
        bus = self.bus = open_bus(self.config.database_url, store.engine, **BUS_OPTIONS)
        bus.subscribe("head", self._heard_head)
        bus.subscribe("env", self._heard_env)
        if bus.shared:  # other processes' deployments and replicas: PostgreSQL only
            bus.subscribe("progress", self._heard_progress)
            bus.subscribe("replicas", self._heard_replicas)
        await bus.start()

    def _announce_head(self, sha: str) -> None:
        """This replica fetched a new head: the others fetch it now, not at their poll."""
        if self.bus is not None:
            self._spawn(self.bus.announce("head", sha), "announce-head")

    def _heard_head(self, sha: str | None) -> None:
        """A head another replica fetched (None: heads may have been missed): fetch it
        unless it is the one applied here already (no fetch per replica per poll). Before
        the startup sync began, that sync reads the newest head anyway."""
        engine = self.engine
        if engine is None or not self._syncs_begun:
            return
        if sha is None or engine.commit is None or engine.commit.sha != sha:
            self.request_sync("notice")

    async def _announce_replicas(self, change: str) -> None:
        """This replica joined, released environments or left: the others rebalance now
        (claim what it let go, or give it its share) instead of at their next pass."""
        if self.bus is not None and self.replica is not None:
            await self.bus.announce("replicas", f"{change} {self.replica.me.id}")

    def _heard_replicas(self, payload: str | None) -> None:
        replica = self.replica
        if replica is None or (payload is not None and payload.endswith(f" {replica.me.id}")):
            return  # not replicated, or our own
        self._spawn(replica.rebalance(), "rebalance")

    def _heard_progress(self, payload: str | None) -> None:
        """A deployment's status changed, maybe on another replica: the fleet summary reads
        that environment again (this process's own deployments reach it through the hub)."""
        fleet, replica = self.fleet, self.replica
        if fleet is None:
            return
        if payload is None:
            fleet.mark_all()
            return
        _, _, environment = payload.partition(" ")
        if environment and (replica is None or not replica.holds(environment)):
            fleet.mark(environment)

    def _heard_env(self, environment: str | None) -> None:
        """An environment was suspended, resumed, retried or synced by an operator, maybe on
        another replica: plan it again (a resumed one deploys what it held back, a retried
        one tries again); None: any may have been."""
        engine = self.engine
        if engine is None or self.fleet is None:
            return
        if environment is None or environment == "*":  # a resync, or a fleet-wide sync
            self.fleet.mark_all()
            engine.wake(engine.effective)
        else:
            self.fleet.mark(environment)
            engine.wake([environment])

    # ---- status line -------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if isinstance(event, SyncOutcome):
            self._last_fetch_error = event.message if event.result == "failed" else None
        if isinstance(event, DeploymentEvent) or (
            isinstance(event, SyncOutcome) and event.result not in ("unchanged", "failed")
        ):
            self._decisions_due.set()  # a poll that found nothing new changes nothing
        if isinstance(event, SyncOutcome | DeploymentEvent) and self.ready.is_set():
            self.sd.status(self._status_line())

    def _status_line(self) -> str:
        engine = self.engine
        if engine is None or engine.commit is None:
            return "waiting for the first fetch"
        text = f"synced {engine.commit.sha[:7]}; {len(engine.deploying)} deploying"
        if engine.invalid:
            text += f"; {len(engine.invalid)} invalid"
        if self._last_fetch_error:
            text += f"; fetch failing: {self._last_fetch_error}"
        if self.store.file_problem() is not None:
            text += "; database file lost: restart"
        return text


#: Which reason a coalesced sync records, strongest first: what someone asked for beats
#: what a commit caused, which beats a routine look.
TRIGGER_STRENGTH = ("manual", "webhook", "watch", "notice", "reload", "startup", "poll")
#: Reasons that wake every environment, not only those whose desired state changed: an
#: operator's sync (a resumed environment, a retry) and a reload (new settings).
WAKE_ALL = frozenset({"manual", "reload"})


def strongest(triggers: set[str]) -> str:
    return min(triggers, key=lambda t: TRIGGER_STRENGTH.index(t) if t in TRIGGER_STRENGTH else 99)


class MigrationFailed(Exception):
    """The database could not be brought to this release's schema (one sentence)."""


async def migrate_in_child(url: str) -> list[str]:
    """Apply migrations in a short-lived child process (see reconciler.store.migrate).

    The URL goes on the child's stdin: a command line is readable by anyone on the host.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "reconciler.store.migrate",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(url.encode() + b"\n")
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise MigrationFailed(lines[-1] if lines else f"migration exited {proc.returncode}")
    return out.decode().split()


def _check_reloadable(old: Config, new: Config) -> None:
    """What a reload cannot change without a restart."""
    fixed = {
        "repository.url": (old.repository_url, new.repository_url),
        "repository.branch": (old.repository.branch, new.repository.branch),
        "repository.path": (old.repository.path, new.repository.path),
        "repository.watch": (old.repository.watch, new.repository.watch),
        "database.url": (old.database_url, new.database_url),
        "daemon.state_dir": (old.state_dir, new.state_dir),
        "server.listen": (old.server.listen, new.server.listen),
        # The HTTP server's connection guard is built at start.
        **{
            f"server.{key}": (getattr(old.server, key), getattr(new.server, key))
            for key in ("max_connections", "header_timeout", "body_timeout", "write_timeout")
        },
    }
    changed = [key for key, (a, b) in fixed.items() if a != b]
    if changed:
        raise ConfigError(f"{', '.join(changed)} cannot change on reload: restart the service")


async def _send(writer: asyncio.StreamWriter, message: BaseModel) -> None:
    writer.write(channel.encode(message))
    await writer.drain()


def _peer(writer: asyncio.StreamWriter) -> tuple[int, int]:
    """The connecting process and its user (pid, uid), as the kernel saw it connect
    (SO_PEERCRED): never what the client says it is."""
    sock: socket.socket = writer.get_extra_info("socket")
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return int(pid), int(uid)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid:{uid}"


def _safe_url(url: str) -> str:
    """A database URL without its password, for logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url


def run_daemon(config: Config, config_path: str | os.PathLike[str] | None = None) -> None:
    daemon = Daemon(config, config_path)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(daemon.run())
