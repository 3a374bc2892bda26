"""Printing for the command line: tables for people, JSON and CSV for scripts."""

from __future__ import annotations

import io
import json
import os
import sys
import textwrap
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO

from desired_state import one_line

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
    import csv  # csv and shutil are imported where used: start-up of every command

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


class Column(NamedTuple):
    """A table column. `keep` columns are always printed whole (ids, names, versions,
    statuses); the others are dropped, lowest `rank` first, until the table fits the
    width. A `wrap` column takes what width is left and wraps its text onto more lines."""

    name: str
    keep: bool = False
    rank: int = 0
    wrap: bool = False


#: A wrapped column narrower than this is dropped instead (a word per line helps no one).
MIN_WRAP = 16


def output_width() -> int | None:
    """The width to fit: $COLUMNS when set, else the terminal's; None (no limit) when
    stdout is not a terminal, so that piped output keeps every column for grep and awk."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if sys.stdout.isatty():
        import shutil

        return shutil.get_terminal_size().columns
    return None


def table(
    title: str | None,
    columns: Sequence[Column | str],
    rows: Sequence[Sequence[Any]],
    *,
    width: int | None = None,
    wide: bool = False,
) -> None:
    """Aligned plain columns, two spaces apart, fitted to `width` (default:
    `output_width()`) unless `wide`: never a value cut in the middle."""
    cols = [c if isinstance(c, Column) else Column(c, keep=True) for c in columns]
    texts = [[one_line("" if v is None else str(v)) for v in row] for row in rows]
    shown = list(range(len(cols)))
    natural = [max([len(c.name)] + [len(r[i]) for r in texts]) for i, c in enumerate(cols)]
    limit = None if wide else (width if width is not None else output_width())
    wrap_width: dict[int, int] = {}
    kept = [i for i, c in enumerate(cols) if c.keep]
    if limit is not None and sum(natural[i] for i in kept) + 2 * (len(kept) - 1) > limit:
        _records(cols, texts, limit)
        return
    if limit is not None:

        def needed() -> int:
            return sum(
                min(natural[i], MIN_WRAP) if cols[i].wrap else natural[i] for i in shown
            ) + 2 * (len(shown) - 1)

        for i in sorted((i for i, c in enumerate(cols) if not c.keep), key=lambda i: cols[i].rank):
            if needed() <= limit:
                break
            shown.remove(i)
        spare = limit - needed()
        for i in shown:
            if cols[i].wrap and natural[i] > MIN_WRAP:
                wrap_width[i] = min(natural[i], MIN_WRAP + max(spare, 0))
                spare -= wrap_width[i] - MIN_WRAP
    widths = {i: wrap_width.get(i, natural[i]) for i in shown}

    def lines_of(cells: Sequence[str]) -> list[str]:
        parts = {
            i: textwrap.wrap(cells[i], widths[i], break_on_hyphens=False) or [""]
            if i in wrap_width
            else [cells[i]]
            for i in shown
        }
        height = max(len(p) for p in parts.values())
        out = []
        for n in range(height):
            line = "  ".join(
                (parts[i][n] if n < len(parts[i]) else "").ljust(widths[i]) for i in shown
            )
            out.append(line.rstrip())
        return out

    lines = [f"{title}:"] if title and sys.stdout.isatty() else []
    lines += lines_of([c.name for c in cols])
    for r in texts:
        lines += lines_of(r)
    sys.stdout.write("\n".join(lines) + "\n")


def _records(cols: Sequence[Column], texts: Sequence[Sequence[str]], width: int) -> None:
    """The rows as blocks of `NAME  value` lines, for names too long for columns: every
    value whole on a line of its own (text of a `wrap` column wrapped)."""
    label = max(len(c.name) for c in cols) + 2
    lines: list[str] = []
    for n, row in enumerate(texts):
        if n:
            lines.append("")
        for c, value in zip(cols, row, strict=True):
            if not value:
                continue
            parts = textwrap.wrap(value, max(width - label, MIN_WRAP)) if c.wrap else [value]
            lines.append(c.name.ljust(label) + parts[0])
            lines += [" " * label + part for part in parts[1:]]
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


def deployments_table(
    records: Sequence[DeploymentRecord],
    subjects: Mapping[int, str] | None = None,
    *,
    wide: bool = False,
) -> None:
    """Deployments, one a line; `subjects`: the commit subject by sync id (a column of
    its own, wrapped). What does not fit the width is dropped, least useful first."""
    subjects = subjects or {}
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
                subjects.get(r.sync_id, "") if r.sync_id is not None else "",
            ]
        )
    columns = [
        Column("ID", keep=True),
        Column("ENVIRONMENT", keep=True),
        Column("SERVICE", keep=True),
        Column("VERSION", keep=True),
        Column("PREVIOUS", rank=4),
        Column("STATUS", keep=True),
        Column("TRIGGER", rank=3),
        Column("COMMIT", rank=2),
        Column("STARTED (UTC)", rank=5),
        Column("DURATION", rank=1),
        Column("SUBJECT", rank=0, wrap=True),
    ]
    if not subjects:
        columns.pop()
        rows = [row[:-1] for row in rows]
    table(None, columns, rows, wide=wide)


def plain_message(
    d: Decision, reasons: Mapping[str, str | None] | None = None, refusal: str | None = None
) -> str:
    """The message without what the STATE column says already (`out_of_sync`,
    `waiting: ...`, `deployment running`) nor the refused head's reason (said once above
    the table); an operator's suspension gives its reason."""
    message = d.message
    if refusal:
        message = message.removesuffix(refusal).removesuffix("; ")
    for said in (d.state, d.state.replace("_", " "), "deployment running"):
        if message == said:
            message = ""
        elif message.startswith(said + ": "):
            message = message[len(said) + 2 :]
    if reasons and d.state in ("suspended", "drifted") and d.environment in reasons:
        reason = reasons[d.environment]
        if reason and "suspended by operator" in message:
            message = message.replace(
                "suspended by operator", f"suspended by operator: {reason}", 1
            )
    return message


def action(d: Decision) -> str:
    """What a sync would do about this service now (`plan`)."""
    if not d.deploy:
        return "none"
    return "deploy" if d.trigger in (None, "git") else f"deploy ({d.trigger})"


def say_refusal(refusal: str, *, wide: bool = False) -> None:
    """The refused head, and why, in lines that fit the terminal (ids are never cut)."""
    line = f"head {refusal}"
    width = None if wide else output_width()
    if width is not None:
        line = textwrap.fill(line, width, break_long_words=False, break_on_hyphens=False)
    sys.stdout.write(line + "\n")


def decisions_table(
    decisions: Sequence[Decision],
    commit: str | None,
    *,
    reasons: Mapping[str, str | None] | None = None,
    with_action: bool = False,
    wide: bool = False,
    refusal: str | None = None,
) -> None:
    """`status` (and `plan`, `with_action`): one service a line; the message wraps.

    `refusal`: the branch head is refused (the state shown is the last applied one): said
    in one line above the table rather than in every row."""
    columns = [
        Column("ENVIRONMENT", keep=True),
        Column("SERVICE", keep=True),
        Column("DESIRED", keep=True),
        Column("DEPLOYED", keep=True),
        Column("STATE", keep=True),
    ]
    if with_action:
        columns.append(Column("ACTION", keep=True))
    columns.append(Column("MESSAGE", wrap=True))
    rows = [
        [d.environment, d.service, d.desired or "-", d.deployed or "-", d.state]
        + ([action(d)] if with_action else [])
        + [plain_message(d, reasons, refusal)]
        for d in decisions
    ]
    if refusal:
        say_refusal(refusal, wide=wide)
    table(f"at commit {short_sha(commit)}" if commit else None, columns, rows, wide=wide)


def show_deployment(record: DeploymentRecord, subject: str | None = None) -> None:
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
        ("Subject", subject),
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
    for late in j.get("unconfirmed") or []:
        out.write(
            f"\nUnconfirmed: {late['status']} at {short_time(late['at'])} from replica "
            f"{late['replica']} (lease generation {late['generation']}), recorded after it "
            f"had lost the lease: {late['error_message'] or late['message'] or ''}\n"
        )
    log = j.get("log") or ""
    out.write(
        "\nLog:\n" + ("".join(f"  {line}\n" for line in log.splitlines()) if log else "  (empty)\n")
    )


def replicas_table(report: Mapping[str, Any], *, wide: bool = False) -> None:
    """`reconciler status --replicas`: who is alive, how many environments each holds."""
    if not report["replicated"]:
        sys.stdout.write("SQLite database: single-replica (PostgreSQL runs several)\n")
        return
    rows = [
        [
            r["id"],
            "live" if r["live"] else "gone",
            r["leases"],
            f"{r['heartbeat_age_seconds']:.1f}s ago",
            r["version"],
            short_time(r["started_at"]),
            r["state_dir"],
        ]
        for r in report["replicas"]
    ]
    columns = [
        Column("REPLICA", keep=True),
        Column("STATE", keep=True),
        Column("LEASES", keep=True),
        Column("HEARTBEAT", keep=True),
        Column("VERSION", rank=2),
        Column("STARTED", rank=1),
        Column("STATE DIR", rank=0),
    ]
    table(None, columns, rows, wide=wide)
    free = sum(1 for lease in report["leases"] if lease["holder"] is None or lease["expired"])
    sys.stdout.write(f"\n{len(report['leases'])} environment leases, {free} free or expired\n")


def show_blame(j: Mapping[str, Any]) -> None:
    """`blame`'s answer for people (`Blame.to_json`, read back)."""
    seen = j["first_seen"]
    dep = j["deployment"]
    if j["applied"]:
        outcome = f"deployment {dep['id']} completed {short_time(dep['completed_at'])}"
        outcome += f" ({j['reason']})" if j["reason"] else ""
    else:
        outcome = f"not applied: {j['reason']}"
    fields = [
        ("Commit", j["commit"]),
        ("Author", j["author"]),
        ("Subject", j["subject"]),
        ("Committed", short_time(j["committed_at"])),
        ("File", j["file"]),
        (
            "First seen",
            f"sync {seen['sync_id']} at {short_time(seen['seen_at'])}" if seen else None,
        ),
        ("Applied", outcome),
        ("Deployed", j["deployed_version"] or "(none)"),
    ]
    out = sys.stdout
    out.write(f"{j['environment']}/{j['service']} {j['version']}\n")
    for name, value in fields:
        if value is not None:
            out.write(f"  {name + ':':<12}{one_line(str(value))}\n")
