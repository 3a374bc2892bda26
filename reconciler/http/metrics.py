"""Prometheus metrics, on a registry of their own, fed by the event hub.

Deployment duration is measured from the events themselves: from the first
``validating``/``in_progress`` event of a deployment to its terminal event, the same two
instants the record's ``started_at``/``completed_at`` hold, so the histogram and
``duration_seconds`` agree without a database read on the event path.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from datetime import datetime

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE_LATEST
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from reconciler.engine import SyncOutcome
from reconciler.events import Event
from reconciler.executor import DeploymentEvent
from reconciler.http.control import Control
from reconciler.http.server import ConnectionGuard
from reconciler.http.sse import LiveFeeds
from reconciler.http.webhooks import RESULTS
from reconciler.store import ACTIVE_STATUSES, SYNC_RESULTS

# Deployments run for seconds to hours.
DEPLOYMENT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf"))
SYNC_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, float("inf"))
# Deployments whose start is remembered; more than this running at once is not plausible.
_MAX_TRACKED = 10_000


class Metrics:
    def __init__(self, control: Control) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.deployments = Counter(
            "reconciler_deployments",
            "Deployments that ended, by environment and terminal status.",
            ["environment", "status"],
            registry=registry,
        )
        self.deployment_duration = Histogram(
            "reconciler_deployment_duration_seconds",
            "Run time of deployments, from start to end.",
            ["environment"],
            buckets=DEPLOYMENT_BUCKETS,
            registry=registry,
        )
        self.sync_duration = Histogram(
            "reconciler_sync_duration_seconds",
            "Duration of syncs (fetch, load, plan), by trigger and result.",
            ["trigger", "result"],
            buckets=SYNC_BUCKETS,
            registry=registry,
        )
        self.syncs = Counter("reconciler_syncs", "Syncs, by result.", ["result"], registry=registry)
        self.last_synced_commit = Gauge(
            "reconciler_last_synced_commit",
            "Unix time of the latest sync that applied a commit, labelled by that commit.",
            ["commit"],
            registry=registry,
        )
        self.fetch_errors = Counter(
            "reconciler_fetch_errors",
            "Syncs that could not fetch or read the repository.",
            registry=registry,
        )
        self.queue_depth = Gauge(
            "reconciler_queue_depth",
            "Environments with work due or running.",
            registry=registry,
        )
        self.queue_depth.set_function(lambda: float(control.queue_depth()))
        self.running = Gauge(
            "reconciler_deployments_running",
            "Deployments started and not yet ended.",
            registry=registry,
        )
        self.replicas_live = Gauge(
            "reconciler_replicas_live",
            "Daemons sharing the database with a fresh heartbeat (1 on SQLite).",
            registry=registry,
        )
        self.replicas_live.set_function(lambda: float(control.lease_counts()[0]))
        self.leases_held = Gauge(
            "reconciler_leases_held",
            "Environment leases this replica holds (0 on SQLite: it runs every environment).",
            registry=registry,
        )
        self.leases_held.set_function(lambda: float(control.lease_counts()[1]))
        self.database_ok = Gauge(
            "reconciler_database_ok",
            "0 when the SQLite database file was deleted or replaced under the daemon.",
            registry=registry,
        )
        self.database_ok.set_function(lambda: 0.0 if control.store.file_problem() else 1.0)
        self.webhooks = Counter(
            "reconciler_webhook_requests",
            "Requests to POST /hooks/git, by outcome.",
            ["result"],
            registry=registry,
        )
        self.http_requests = Counter(
            "reconciler_http_requests",
            "HTTP requests served, by method, route template and status code.",
            ["method", "route", "status"],
            registry=registry,
        )
        for webhook_result in RESULTS:
            self.webhooks.labels(webhook_result)
        for sync_result in SYNC_RESULTS:
            self.syncs.labels(sync_result)
        registry.register(_NotificationCollector(control))
        self.connections = _ConnectionCollector()
        registry.register(self.connections)
        registry.register(_DriftCollector(control))
        self._running: set[int] = set()
        self.running.set_function(lambda: float(len(self._running)))
        self._started: OrderedDict[int, datetime] = OrderedDict()

    def on_event(self, event: Event) -> None:
        """The hub's synchronous callback: counters only, never I/O."""
        if isinstance(event, DeploymentEvent):
            self._deployment(event)
        elif isinstance(event, SyncOutcome):
            self._sync(event)

    def _deployment(self, event: DeploymentEvent) -> None:
        dep = event.deployment_id
        if event.status in ACTIVE_STATUSES:
            self._running.add(dep)
            if event.status != "pending" and dep not in self._started and event.at is not None:
                self._started[dep] = event.at
                while len(self._started) > _MAX_TRACKED:
                    self._started.popitem(last=False)
            return
        if not event.terminal:
            return
        self._running.discard(dep)
        self.deployments.labels(event.environment, event.status).inc()
        started = self._started.pop(dep, None)
        if started is not None and event.at is not None:
            seconds = (event.at - started).total_seconds()
            self.deployment_duration.labels(event.environment).observe(max(seconds, 0.0))

    def _sync(self, outcome: SyncOutcome) -> None:
        self.syncs.labels(outcome.result).inc()
        self.sync_duration.labels(outcome.trigger or "unknown", outcome.result).observe(
            max(outcome.duration_seconds, 0.0)
        )
        if outcome.result == "failed":
            self.fetch_errors.inc()
        elif outcome.commit and outcome.result in ("ok", "errors", "unchanged"):
            self.last_synced_commit.clear()
            self.last_synced_commit.labels(outcome.commit).set_to_current_time()

    def webhook(self, result: str) -> None:
        self.webhooks.labels(result).inc()

    def http_request(self, method: str, route: str, status: int) -> None:
        self.http_requests.labels(method, route, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _NotificationCollector(Collector):
    """Deliveries counted by the notifier since start, read when Prometheus scrapes."""

    def __init__(self, control: Control) -> None:
        self.control = control

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "reconciler_notifications",
            "Notification deliveries since start, by target and result.",
            labels=["target", "result"],
        )
        for target, counts in sorted(self.control.notification_stats().items()):
            for result, value in sorted(counts.items()):
                family.add_metric([target, result], value)
        yield family


class _ConnectionCollector(Collector):
    """The HTTP server's connections and live viewers, read when Prometheus scrapes (the
    server and the feeds are attached once they exist)."""

    def __init__(self) -> None:
        self.guard: ConnectionGuard | None = None
        self.feeds: LiveFeeds | None = None

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        if self.guard is not None:
            g = self.guard
            yield GaugeMetricFamily(
                "reconciler_http_connections", "Open HTTP connections.", value=g.open
            )
            yield GaugeMetricFamily(
                "reconciler_http_max_connections",
                "Open HTTP connections allowed (server.max_connections, or fewer when the "
                "descriptor limit is low).",
                value=g.max_connections,
            )
            closed = CounterMetricFamily(
                "reconciler_http_connections_closed",
                "HTTP connections closed by the server, by reason.",
                labels=["reason"],
            )
            for reason, value in (
                ("refused", g.refused),
                ("evicted", g.evicted),
                ("request_timeout", g.timed_out),
                ("write_timeout", g.write_timeouts),
            ):
                closed.add_metric([reason], value)
            yield closed
        if self.feeds is not None:
            yield GaugeMetricFamily(
                "reconciler_sse_viewers",
                "Open event streams of deployments' progress.",
                value=self.feeds.viewers(),
            )


class _DriftCollector(Collector):
    """Drifted services per environment, as of the drift monitor's last reading."""

    def __init__(self, control: Control) -> None:
        self.control = control

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "reconciler_services_drifted",
            "Services whose live version differs from the deployed one, by environment.",
            labels=["environment"],
        )
        for environment, count in sorted(self.control.drifted_services().items()):
            family.add_metric([environment], count)
        yield family
