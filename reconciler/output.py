"""Printing for the command line: tables for people, JSON and CSV for scripts."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # every command imports this module: it must stay light
    from reconciler.plan import Decision
    from reconciler.store import DeploymentRecord

DEPLOYMENT_COLUMNS = [
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


def print_json(value: Any, out: TextIO | None = None) -> None:
    # One write: json.dump streams thousands of small writes (3x slower for big listings).
    (out or sys.stdout).write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def print_csv(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], out: TextIO | None = None
) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in columns})
    (out or sys.stdout).write(buf.getvalue())


def _cell(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return "" if value is None else value


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A rich table on a terminal; plain aligned columns when piped (stable for grep/awk)."""
    texts = [["" if v is None else str(v) for v in row] for row in rows]
    if sys.stdout.isatty():
        from rich.console import Console  # only on a terminal: rich is a heavy import
        from rich.table import Table

        t = Table(title=title, show_edge=False, header_style="bold")
        for c in columns:
            t.add_column(c)
        for row in texts:
            t.add_row(*row)
        Console().print(t)
        return
    widths = [max([len(c)] + [len(r[i]) for r in texts]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    for r in texts:
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    sys.stdout.write("\n".join(lines) + "\n")


def short_time(value: str | None) -> str:
    if not value:
        return "-"
    t = datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
    return t.strftime("%Y-%m-%d %H:%M:%S")


def short_sha(sha: str | None) -> str:
    return sha[:9] if sha else "-"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def deployments_table(records: Sequence[DeploymentRecord]) -> None:
    rows = []
    for r in records:
        j = r.to_json()
        rows.append(
            [
                j["id"],
                j["environment"],
                j["service"],
                j["version"],
                j["previous_version"] or "-",
                j["status"],
                j["trigger"],
                short_sha(j["commit"]),
                short_time(j["started_at"]),
                duration(j["duration_seconds"]),
            ]
        )
    table(
        None,
        [
            "ID",
            "ENVIRONMENT",
            "SERVICE",
            "VERSION",
            "PREVIOUS",
            "STATUS",
            "TRIGGER",
            "COMMIT",
            "STARTED (UTC)",
            "DURATION",
        ],
        rows,
    )


def decisions_table(decisions: Sequence[Decision], commit: str | None) -> None:
    rows = [
        [d.environment, d.service, d.desired or "-", d.deployed or "-", d.state, d.message]
        for d in decisions
    ]
    table(
        f"at commit {short_sha(commit)}" if commit else None,
        ["ENVIRONMENT", "SERVICE", "DESIRED", "DEPLOYED", "STATE", "MESSAGE"],
        rows,
    )


def show_deployment(record: DeploymentRecord) -> None:
    j = record.to_json()
    out = sys.stdout
    out.write(
        f"Deployment {j['id']}: {j['environment']}/{j['service']} "
        f"{j['previous_version'] or '(none)'} -> {j['version']}\n"
    )
    fields = [
        ("Status", j["status"]),
        ("Error", j["error_message"]),
        ("Trigger", j["trigger"]),
        ("Attempt", j["attempt"]),
        ("Provider", f"{j['provider']} ({j['provider_type']})"),
        ("Strategy", json.dumps(j["strategy"])),
        ("Commit", j["commit"]),
        ("Author", j["commit_author"]),
        ("Timeout", f"{j['timeout_seconds']}s"),
        ("Started", short_time(j["started_at"])),
        ("Completed", short_time(j["completed_at"])),
        ("Duration", duration(j["duration_seconds"])),
    ]
    validation = j.get("validation")
    if validation:
        checks = ", ".join(
            f"{c['name']}={'ok' if c['ok'] else 'FAILED'}" for c in validation.get("checks", [])
        )
        fields.append(
            (
                "Validation",
                ("ok" if validation.get("ok") else "FAILED") + (f" ({checks})" if checks else ""),
            )
        )
    for name, value in fields:
        if value is not None:
            out.write(f"  {name + ':':<12}{value}\n")
    out.write("\nProgress:\n")
    for ev in j.get("progress") or []:
        pct = f"{ev['percent']:>3}%" if ev["percent"] is not None else "    "
        out.write(f"  {short_time(ev['at'])}  {pct}  {ev['status']:<11}  {ev['message']}\n")
    log = j.get("log") or ""
    out.write(
        "\nLog:\n" + ("".join(f"  {line}\n" for line in log.splitlines()) if log else "  (empty)\n")
    )
