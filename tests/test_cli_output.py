"""What the command line prints for people (issue 10 items 3 and 4): tables that fit an
80-column terminal without cutting a name, a version or an id; the commit subject; the
plan's action; status without repetition and with the operator's reason; a start-up that
imports only what the command needs."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from reconciler.output import Column, table
from tests.support import ROOT, World, cli_env

pytestmark = pytest.mark.timeout(180)

ENV = "production-eu-west"
SERVICE = "payments-gateway"
VERSION = "2026.11.27-rc.1"
NEXT = "2026.11.28-rc.2"
SUBJECT = "Roll the payments gateway forward to the release candidate of Friday"


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def at_80(world: World, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI as an 80-column terminal would size it ($COLUMNS)."""
    env = {**cli_env(), "COLUMNS": "80"}
    out = subprocess.run(
        [sys.executable, "-m", "reconciler", "--config", str(world.config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=world.tmp,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    return out


def fits(text: str, width: int = 80) -> None:
    long = [line for line in text.splitlines() if len(line) > width]
    assert not long, f"lines over {width} columns: {long}"


def deployed(world: World) -> None:
    world.repo.set_env(ENV, {SERVICE: VERSION, "worker": "1.4.2"}, message=SUBJECT)
    out = world.cli("sync")
    assert out.returncode == 0, out.stderr


def test_history_status_and_plan_fit_80_columns_with_names_and_versions_whole(world: World):
    deployed(world)
    history = at_80(world, "history").stdout
    fits(history)
    line = next(line for line in history.splitlines() if SERVICE in line)
    assert line.split()[:4] == ["1", ENV, SERVICE, VERSION] and "completed" in line.split()

    status = at_80(world, "status").stdout
    fits(status)
    line = next(line for line in status.splitlines() if SERVICE in line)
    assert line.split() == [ENV, SERVICE, VERSION, VERSION, "synced"]

    world.repo.set_env(ENV, {SERVICE: NEXT, "worker": "1.4.2"}, message="next")
    plan = at_80(world, "plan").stdout
    fits(plan)
    words = plan.split()  # too wide for columns: a block per service, values whole
    assert {ENV, SERVICE, NEXT, VERSION, "out_of_sync", "deploy"} <= set(words), plan
    assert "ACTION" in words


def test_names_too_long_for_columns_become_blocks(world: World):
    env, service, version = "production-eu-west-1", "payments-gateway-api", "2026.11.27-rc.1+b.4"
    world.repo.set_env(env, {service: version}, message=SUBJECT)
    assert world.cli("sync").returncode == 0
    for command in ("history", "status"):
        out = at_80(world, command).stdout
        fits(out)
        assert {env, service, version} <= set(out.split()), out


def test_wide_keeps_every_column(world: World):
    deployed(world)
    wide = at_80(world, "history", "--wide").stdout
    header = wide.splitlines()[0].split()
    for name in ("PREVIOUS", "TRIGGER", "COMMIT", "STARTED", "DURATION", "SUBJECT"):
        assert name in header, header
    assert SUBJECT in wide  # not wrapped either
    assert max(len(line) for line in wide.splitlines()) > 80


def test_history_and_show_print_the_commit_subject(world: World):
    deployed(world)
    # Piped without $COLUMNS: every column, the subject whole.
    history = world.cli("history", check=True).stdout
    assert "SUBJECT" in history.splitlines()[0] and SUBJECT in history
    shown = world.cli("show", "1", check=True).stdout
    assert f"Subject:    {SUBJECT}" in shown


def test_status_does_not_repeat_the_state_in_the_message(world: World):
    deployed(world)
    world.repo.set_env(ENV, {SERVICE: NEXT, "worker": "1.4.2"}, message="next")
    world.cli("sync", "--json")  # ignore the outcome: it deploys NEXT; status then is synced
    world.repo.set_env(ENV, {SERVICE: NEXT + "-fail", "worker": "1.4.2"}, message="broken")
    plan = world.cli("plan", check=True).stdout
    line = next(line for line in plan.splitlines() if SERVICE in line)
    assert line.split().count("out_of_sync") == 1, line  # the state, not the message too


def test_status_shows_the_reason_of_a_suspension(world: World):
    deployed(world)
    reason = "change freeze until the audit of the payment provider ends"
    out = world.cli("suspend", "--env", ENV, "--reason", reason)
    assert out.returncode == 0, out.stderr
    status = at_80(world, "status").stdout
    fits(status)
    assert " ".join(status.split()).count(f"suspended by operator: {reason}") == 2, status
    piped = world.cli("status", check=True).stdout  # no width: one line each
    line = next(line for line in piped.splitlines() if SERVICE in line)
    assert line.split()[4] == "suspended" and line.endswith(f"suspended by operator: {reason}")


def test_rollback_names_an_unknown_service_or_environment(world: World):
    deployed(world)
    out = world.cli("rollback", "--env", ENV, "--service", "nope")
    assert out.returncode == 2
    assert out.stderr.strip() == f"reconciler: environment '{ENV}' has no service 'nope'"
    out = world.cli("rollback", "--env", "nope", "--service", SERVICE)
    assert out.returncode == 2
    assert out.stderr.strip() == f"reconciler: unknown environment 'nope' (known: {ENV})"
    out = world.cli("rollback", "--env", ENV, "--service", SERVICE)
    assert out.returncode == 1 and "no earlier completed version" in out.stderr


def render(columns: list[Column], rows: list[list[str]], width: int | None) -> list[str]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        table(None, columns, rows, width=width)
    return buf.getvalue().splitlines()


def test_table_drops_lowest_ranks_first_and_wraps_the_wrap_column():
    columns = [
        Column("NAME", keep=True),
        Column("A", rank=2),
        Column("B", rank=1),
        Column("NOTE", rank=3, wrap=True),
    ]
    rows = [["a-rather-long-name", "aaaaaaaaaa", "bbbbbbbbbb", "one two three four five six"]]
    assert render(columns, rows, None)[1].split() == rows[0][:3] + rows[0][3].split()
    lines = render(columns, rows, 50)
    assert lines[0].split() == ["NAME", "A", "NOTE"]  # B (rank 1) went first
    assert all(len(line) <= 50 for line in lines) and len(lines) == 3  # NOTE wrapped
    assert " ".join(" ".join(lines[1:]).split()) == (
        "a-rather-long-name aaaaaaaaaa one two three four five six"
    )
    # Kept columns are never cut: too wide for columns, each row becomes a block.
    assert render(columns, rows, 10)[:2] == ["NAME  a-rather-long-name", "A     aaaaaaaaaa"]


def run_listing_modules(*args: str) -> set[str]:
    """The modules a CLI invocation imported (in a fresh interpreter)."""
    code = (
        "import sys\n"
        "from reconciler.cli import main\n"
        f"sys.argv = ['reconciler', *{list(args)!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "sys.stderr.write('\\nMODULES ' + ' '.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**cli_env(), "PYTHONPATH": os.pathsep.join([str(ROOT)])},
    )
    return set(out.stderr.rsplit("MODULES ", 1)[1].split())


HEAVY = ("sqlalchemy", "pydantic", "alembic", "git", "yaml", "croniter", "rich", "asyncio")


def test_help_imports_nothing_heavy():
    modules = run_listing_modules("--help")
    assert not {m for m in modules if m.split(".")[0] in HEAVY}
    assert "reconciler.engine" not in modules and "reconciler.config" not in modules


def test_history_reads_without_alembic_git_or_the_engine(world: World):
    deployed(world)
    modules = run_listing_modules("--config", str(world.config), "history")
    assert "sqlite3" in modules  # it did read the database, without SQLAlchemy
    for heavy in ("sqlalchemy", "alembic", "git", "reconciler.engine", "croniter"):
        assert heavy not in modules, heavy


def test_validate_without_configuration_loads_no_provider_or_database():
    modules = run_listing_modules("validate", str(ROOT / "examples" / "desired-state"))
    for heavy in ("sqlalchemy", "reconciler.providers", "reconciler.config", "git"):
        assert heavy not in modules, heavy
