"""Notification payloads: what a notice says, as a generic webhook body or a Slack message.

Pure: records in, JSON-ready dicts out (see the package docstring for the fields).
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from reconciler.notify.targets import Target
from reconciler.store import DeploymentRecord, DriftEvent, SyncRecord, format_time

#: Notices subject to suppression of identical repeats.
FAILURE_EVENTS = frozenset({"failed", "timed_out", "rolled_back", "sync_error"})

_EMOJI = {
    "started": "🚀",
    "completed": "✅",
    "failed": "❌",
    "timed_out": "⏱️",
    "rolled_back": "↩️",
    "sync_error": "⚠️",
    "drifted": "🔀",
}


def _short_author(author: str | None) -> str | None:
    if not author:
        return None
    name = author.split("<", 1)[0].strip()
    return name or author.strip("<> ")


def clip(text: str, limit: int) -> str:
    """``text`` stripped and cut to at most ``limit`` characters (an ellipsis marks a cut)."""
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def as_of_event(deployment: DeploymentRecord, status: str) -> DeploymentRecord:
    """The deployment record as it was when it took ``status`` (the ledger row may have
    moved on by the time the notice is derived, e.g. a ``started`` read after the end)."""
    rec = dataclasses.replace(deployment, status=status, progress=None, log=None)
    if status not in ("completed", "failed", "timed_out", "rolled_back", "cancelled"):
        rec = dataclasses.replace(rec, completed_at=None, error_message=None)
    return rec


def _verb(event: str) -> str:
    return event.replace("_", " ")


def deployment_summary(event: str, dep: DeploymentRecord) -> tuple[str, str | None, str]:
    """``(headline, error, footer)`` of a deployment notice, plain text."""
    head = f"{dep.environment}/{dep.service} {dep.version} {_verb(event)}"
    if dep.previous_version and dep.previous_version != dep.version:
        head += f" (was {dep.previous_version})"
    error = dep.error_message if event in FAILURE_EVENTS else None
    footer = []
    if dep.commit:
        by = _short_author(dep.commit_author)
        footer.append(f"commit {dep.commit[:7]}" + (f" by {by}" if by else ""))
    footer.append(f"trigger {dep.trigger}")
    if dep.attempt > 1:
        footer.append(f"attempt {dep.attempt}")
    footer.append(f"deployment #{dep.id}")
    if dep.duration_seconds is not None and event != "started":
        footer.append(f"{dep.duration_seconds:g}s")
    return head, error, " · ".join(footer)


def sync_error_text(sync: SyncRecord) -> str:
    if sync.error_message:
        return sync.error_message
    lines = [
        f"{e.get('file')}:{e.get('line')}:{e.get('col')}: {e.get('path')}: {e.get('message')}"
        for e in sync.errors
    ]
    return "\n".join(lines) or f"sync {sync.result}"


def sync_summary(sync: SyncRecord) -> tuple[str, str, str]:
    commit = f" of {sync.commit_sha[:7]}" if sync.commit_sha else ""
    if sync.result == "errors":
        count = len(sync.errors)
        head = f"sync{commit}: {count} invalid file{'s' if count != 1 else ''}"
    else:
        head = f"sync{commit} {sync.result}"
    footer = [f"trigger {sync.trigger}", f"sync #{sync.id}"]
    by = _short_author(sync.commit_author)
    if by:
        footer.insert(0, f"by {by}")
    return head, sync_error_text(sync), " · ".join(footer)


def sync_json(sync: SyncRecord) -> dict[str, Any]:
    return {
        "id": sync.id,
        "trigger": sync.trigger,
        "result": sync.result,
        "commit": sync.commit_sha,
        "commit_author": sync.commit_author,
        "commit_subject": sync.commit_subject,
        "seen_at": format_time(sync.seen_at),
        "ended_at": format_time(sync.ended_at),
        "environments_changed": list(sync.environments_changed),
        "errors": list(sync.errors),
        "error_message": sync.error_message,
        "signer": sync.signer,
    }


def drift_summary(drift: DriftEvent) -> tuple[str, None, str]:
    head = (
        f"{drift.environment}/{drift.service} drifted: live version is {drift.live_version},"
        f" deployed {drift.deployed_version}"
    )
    return head, None, "found by the drift monitor"


def render(
    target: Target,
    event: str,
    *,
    environment: str | None,
    service: str | None,
    deployment: DeploymentRecord | None,
    sync: SyncRecord | None,
    at: datetime,
    drift: DriftEvent | None = None,
) -> dict[str, Any]:
    """The JSON body sent to ``target`` for one notice."""
    if deployment is not None:
        head, error, footer = deployment_summary(event, deployment)
    elif sync is not None:
        head, error, footer = sync_summary(sync)
    elif drift is not None:
        head, error, footer = drift_summary(drift)
    else:  # pragma: no cover - a notice is about a deployment or a sync
        raise ValueError("a notice needs a deployment or a sync")
    plain = head + (f": {clip(error, 300)}" if error else "")
    if target.config.type == "slack":
        return slack_message(event, head, error, footer, plain)
    body = {
        "event": event,
        "environment": environment,
        "service": service,
        "deployment": deployment.to_json() if deployment is not None else None,
        "sync": sync_json(sync) if sync is not None else None,
        "message": plain + (f" — {footer}" if footer else ""),
        "at": format_time(at),
    }
    if drift is not None:
        body["drift"] = {
            "live_version": drift.live_version,
            "deployed_version": drift.deployed_version,
        }
    return body


def slack_message(
    event: str, head: str, error: str | None, footer: str, plain: str
) -> dict[str, Any]:
    """A Slack incoming-webhook message: ``text`` (the notification fallback) and blocks."""
    emoji = _EMOJI.get(event, "")
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"{emoji} *{_slack_escape(head)}*"}}
    ]
    if error:
        code = _slack_escape(clip(error, 2500)).replace("```", "'''")
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"```{code}```"}})
    blocks.append(
        {"type": "context", "elements": [{"type": "mrkdwn", "text": _slack_escape(footer)}]}
    )
    short_footer = footer.split(" · ", 1)[0] if footer.startswith("commit ") else ""
    text = f"{emoji} {plain}" + (f" — {short_footer}" if short_footer else "")
    return {"text": _slack_escape(text), "blocks": blocks}
