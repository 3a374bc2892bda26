"""Notifications out: `[[notifications]]` targets fed from a durable outbox.

The ledger is the source, never the in-process events::

    deployment_events, syncs ──(cursor)──► notification_outbox ──(one lane per target)──► HTTP
                          derive: one transaction          deliver: no transaction held

- **Derive.** Woken by the `EventHub` (or every `poll_interval` seconds), the notifier
  reads the ledger after its cursor (table ``notification_cursor``), maps what it finds
  to notices, and in ONE transaction inserts an outbox row per matching target and moves
  the cursor. A crash before that commit derives the same rows again; after it, nothing
  is lost. On a first start the cursor begins at the current end (no flood of history).

  ========================================  =============
  ledger                                    notice
  ========================================  =============
  deployment event, status ``validating``   ``started``
  ``completed`` / ``failed`` /               same name
  ``timed_out`` / ``rolled_back``
  a sync with result errors/failed/refused  ``sync_error``
  ========================================  =============

  Only status changes carry these statuses (`Store.set_status`); progress reports
  (`Store.add_event`) are ``in_progress`` and never notify. A ``sync_error`` has no
  environment and goes to every target that asks for ``sync_error``.

  PostgreSQL hands out ids before commit, so a row with a lower id can become visible
  after a higher one: the cursor stops before a gap in the event ids and waits up to
  `GAP_GRACE` seconds for it to fill (a rolled-back insert leaves a gap forever).

- **Suppress.** A failure notice (failed, timed_out, rolled_back, sync_error) whose
  fingerprint (target, event, environment, service, version, error text) equals one
  pending or delivered less than the target's ``suppress_repeats`` before is stored
  ``suppressed``: kept for audit, never sent.

- **Deliver.** One lane (an asyncio task) per target sends that target's due rows one at
  a time, oldest first, with the target's ``timeout``. A 2xx marks the row delivered in
  a transaction right away. A failure records ``attempts``, ``last_error`` and
  ``next_attempt_at`` (``retry_backoff`` doubled per attempt, at most ``max_backoff``;
  a ``Retry-After`` answer is honoured within that cap) and pauses the lane until then, so
  a target that is down gets one probe per backoff, not a storm; a 4xx refusal (not
  408/409/425/429) is final at once; after ``max_attempts``
  the row is ``dead``. Lanes are independent: a target that hangs delays only itself,
  and nothing here runs on a deployment's path (deployments only write the ledger).

  Delivery is exactly once in the normal case, at least once at the edge: if the process
  dies after the target answered 2xx but before the row is marked, the row's lease
  expires and it is sent again. Receivers that must not see a duplicate dedupe on the
  ``X-Reconciler-Delivery`` header (the outbox id, stable across retries).

Generic webhooks get ``{"event", "environment", "service", "deployment", "sync",
"message", "at"}`` (``deployment`` is the SPEC §5 record as of the event), with
``X-Reconciler-Event``, ``X-Reconciler-Delivery`` and, when ``secret_file`` is set,
``X-Reconciler-Signature-256: sha256=<hex HMAC-SHA256 of the body>``. Slack targets get an
incoming-webhook message: a ``text`` fallback and ``blocks`` (mrkdwn section + context).

The modules, each importing only those below it:

==============  ===========================================================================
``notifier``    `Notifier`: the derive loop, the hub listener, reload, statistics
``derive``      `Deriver`: ledger and drift events after their cursors → outbox rows
``delivery``    `Delivery`: the lanes, one attempt per row, backoff, ``Retry-After``
``payloads``    what a notice says: the generic webhook body, the Slack message
``targets``     `Target`: the configured targets, checked and named
==============  ===========================================================================
"""

from reconciler.notify.delivery import (
    LEASE_MARGIN,
    MAX_ERROR,
    Delivery,
    backoff,
    retry_after_seconds,
    signature,
)
from reconciler.notify.derive import (
    BATCH,
    CURSOR_NAME,
    DRIFT_CURSOR,
    EVENT_OF_STATUS,
    GAP_GRACE,
    SYNC_ERROR_RESULTS,
    Deriver,
    fingerprint,
)
from reconciler.notify.notifier import Notifier
from reconciler.notify.payloads import (
    FAILURE_EVENTS,
    as_of_event,
    deployment_summary,
    drift_summary,
    render,
    slack_message,
    sync_error_text,
    sync_json,
    sync_summary,
)
from reconciler.notify.targets import Target, build_targets, default_target_name

__all__ = [
    "BATCH",
    "CURSOR_NAME",
    "DRIFT_CURSOR",
    "EVENT_OF_STATUS",
    "FAILURE_EVENTS",
    "GAP_GRACE",
    "LEASE_MARGIN",
    "MAX_ERROR",
    "SYNC_ERROR_RESULTS",
    "Delivery",
    "Deriver",
    "Notifier",
    "Target",
    "as_of_event",
    "backoff",
    "build_targets",
    "default_target_name",
    "deployment_summary",
    "drift_summary",
    "fingerprint",
    "render",
    "retry_after_seconds",
    "signature",
    "slack_message",
    "sync_error_text",
    "sync_json",
    "sync_summary",
]
