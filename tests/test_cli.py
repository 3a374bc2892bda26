"""The command line as users and their scripts run it: a real process, exit codes, output."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from tests.support import World, env_yaml

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_sync_history_show_and_status(world: World):
    sha = world.repo.set_env("staging", {"api": "1.0", "worker": "2"})
    out = world.cli("sync")
    assert out.returncode == 0, out.stderr
    assert (
        "#1 staging/api 1.0 in_progress:  10% preparing" in out.stderr
    )  # live progress while it waits

    records = json.loads(world.cli("history", "--json", check=True).stdout)
    assert [(r["service"], r["version"], r["status"]) for r in records] == [
        ("worker", "2", "completed"),
        ("api", "1.0", "completed"),
    ]
    assert list(records[0]) == [
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
    assert records[0]["commit"] == sha and records[0]["started_at"].endswith("Z")

    rows = list(csv.DictReader(io.StringIO(world.cli("history", "--csv", check=True).stdout)))
    assert [r["version"] for r in rows] == ["2", "1.0"] and rows[0][
        "strategy"
    ] == '{"type": "rolling"}'

    table = world.cli("history", "--env", "staging", "--service", "api", check=True).stdout
    assert "ID" in table.splitlines()[0] and " 1.0 " in table and " 2 " not in table

    shown = json.loads(world.cli("show", str(records[1]["id"]), "--json", check=True).stdout)
    assert next(p["status"] for p in shown["progress"]) == "pending"
    assert "token is ***" in shown["log"]
    human = world.cli("show", str(records[1]["id"]), check=True).stdout
    assert "Progress:" in human and "preparing" in human and "Log:" in human

    status = json.loads(world.cli("status", "--json", check=True).stdout)
    assert status == [
        {
            "environment": "staging",
            "service": "api",
            "desired": "1.0",
            "deployed": "1.0",
            "state": "synced",
            "commit": sha,
            "last_deployment_id": records[1]["id"],
            "message": None,
        },
        {
            "environment": "staging",
            "service": "worker",
            "desired": "2",
            "deployed": "2",
            "state": "synced",
            "commit": sha,
            "last_deployment_id": records[0]["id"],
            "message": None,
        },
    ]
    # Re-syncing does nothing and says so.
    again = world.cli("sync", check=True)
    assert "nothing to deploy" in again.stdout


def test_plan_shows_what_a_sync_would_do_and_does_nothing(world: World):
    world.repo.set_env("staging", {"api": "1.0"})
    world.cli("sync", check=True)
    world.repo.set_env("staging", {"api": "1.1"})
    plan = json.loads(world.cli("plan", "--json", check=True).stdout)
    assert [(p["service"], p["desired"], p["deployed"], p["action"]) for p in plan] == [
        ("api", "1.1", "1.0", "deploy")
    ]
    assert len(json.loads(world.cli("history", "--json").stdout)) == 1
    assert "1.1" in world.cli("plan", check=True).stdout


def test_failed_sync_exits_1_and_names_the_error(world: World):
    world.repo.set_env("staging", {"api": "1.0-fail"})
    out = world.cli("sync")
    assert out.returncode == 1
    assert "failed" in out.stdout
    [record] = json.loads(world.cli("history", "--json", "--status", "failed").stdout)
    assert "exit status 3" in record["error_message"]


def test_operator_retry_after_giving_up(tmp_path: Path):
    world = World(tmp_path, retries=1)
    world.repo.set_env("staging", {"api": "1.0-fail"})
    assert world.cli("sync").returncode == 1
    status = json.loads(world.cli("status", "--json").stdout)[0]
    assert status["state"] == "failed" and "gave up after 1 attempt" in status["message"]
    assert world.cli("sync").returncode == 0  # nothing due: it gave up
    assert len(world.started()) == 1
    out = world.cli("sync", "--env", "staging", "--service", "api")
    assert out.returncode == 1 and len(world.started()) == 2


def test_validate_directory_as_a_pre_commit_hook(tmp_path: Path):
    d = tmp_path / "envs"
    d.mkdir()
    (d / "good.yaml").write_text(env_yaml("good", {"api": "1"}))
    (d / "bad.yaml").write_text(
        "environment: bad\nprovider: local\nservices:\n  api:\n    version: 1.4 2\n"
    )
    (d / ".hidden").mkdir()
    (d / ".hidden" / "x.yaml").write_text("nonsense: [")
    world = World(tmp_path / "w")
    out = world.cli("validate", str(d))
    assert out.returncode == 1
    assert f"{d}/bad.yaml:5:14: services.api.version:" in out.stderr
    assert "2 files, 1 valid environment, 1 error" in out.stdout
    (d / "bad.yaml").unlink()
    assert world.cli("validate", str(d)).returncode == 0
    # Unknown provider, checked against the configuration.
    (d / "other.yaml").write_text(
        env_yaml("other", {"api": "1"}).replace("provider: local", "provider: nope")
    )
    out = world.cli("validate", str(d))
    assert out.returncode == 1 and "unknown provider 'nope'" in out.stderr


def test_schema_is_json_schema(world: World):
    schema = json.loads(world.cli("schema", check=True).stdout)
    assert schema["type"] == "object" and "environment" in schema["properties"]


def test_deploy_rollback_suspend_resume(world: World):
    world.repo.set_env("staging", {"api": "1.0"})
    world.cli("sync", check=True)
    world.repo.set_env("staging", {"api": "1.1"})
    world.cli("sync", check=True)

    out = world.cli("deploy", "--env", "staging", "--version", "7.0", "--service", "api")
    assert out.returncode == 0, out.stderr
    assert "git wins at the next sync" in out.stderr
    rollback = world.cli("rollback", "--env", "staging", "--service", "api", "--json")
    assert rollback.returncode == 0, rollback.stderr
    [rb] = json.loads(rollback.stdout)
    assert (rb["version"], rb["previous_version"], rb["trigger"]) == ("1.1", "7.0", "rollback")

    assert world.cli("suspend", "--env", "staging", check=True).returncode == 0
    world.repo.set_env("staging", {"api": "1.2"})
    assert world.cli("sync", check=True).returncode == 0
    status = json.loads(world.cli("status", "--json").stdout)[0]
    assert (
        status["state"] == "suspended"
        and status["desired"] == "1.2"
        and status["deployed"] == "1.1"
    )
    quiet = world.cli("deploy", "--env", "staging", "--version", "7.1", "--service", "api")
    assert "git wins" not in quiet.stderr
    world.cli("resume", "--env", "staging", check=True)
    world.cli("sync", check=True)
    assert json.loads(world.cli("status", "--json").stdout)[0]["deployed"] == "1.2"
    manual = [
        r for r in json.loads(world.cli("history", "--json").stdout) if r["trigger"] == "manual"
    ]
    assert [r["version"] for r in manual] == ["7.1", "7.0"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["show", "999"], 1, "no deployment 999"),
        (["deploy", "--env", "nope", "--version", "1"], 2, "unknown environment 'nope'"),
        (["deploy", "--env", "staging", "--version", "bad version"], 2, "not a valid version"),
        (["history", "--since", "yesterday-ish"], 2, "use a time"),
        (["sync", "--service", "api"], 2, "--service needs --env"),
        (["bogus"], 2, "No such command"),
    ],
)
def test_errors_are_one_line_with_spec_exit_codes(world: World, args, code, message):
    world.repo.set_env("staging", {"api": "1.0"})
    out = world.cli(*args)
    assert out.returncode == code, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr


def test_bad_configuration_exits_2(tmp_path: Path):
    world = World(tmp_path)
    world.config.write_text(world.config.read_text() + "\n[surprise]\nx = 1\n")
    out = world.cli("status")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "surprise: unknown key" in out.stderr


def test_unreachable_repository_is_one_line(tmp_path: Path):
    world = World(tmp_path)
    out = world.cli("sync")
    assert out.returncode == 1 and "cannot fetch" in out.stderr and "Traceback" not in out.stderr


def test_manual_deploy_rolls_back_on_failure_and_rollback_checks_its_target(world: World):
    world.repo.set_env("staging", {"api": "1.0"}, on_failure="rollback")
    world.cli("sync", check=True)
    out = world.cli("deploy", "--env", "staging", "--version", "9-fail", "--json")
    assert out.returncode == 1
    records = json.loads(out.stdout)
    assert [(r["version"], r["trigger"], r["status"]) for r in records] == [
        ("9-fail", "manual", "rolled_back"),
        ("1.0", "rollback", "completed"),
    ]
    bad = world.cli("rollback", "--env", "staging", "--service", "api", "--to", "0.1")
    assert bad.returncode == 1 and "never completed version 0.1" in bad.stderr
    unknown = world.cli("suspend", "--env", "nowhere")
    assert unknown.returncode == 2 and "unknown environment 'nowhere'" in unknown.stderr


def test_a_database_from_a_newer_release_is_named_not_crashed_on(world: World):
    import sqlite3

    world.repo.set_env("staging", {"api": "1.0"})
    world.cli("sync", check=True)
    db = sqlite3.connect(world.tmp / "state" / "reconciler.db")
    db.execute("UPDATE alembic_version SET version_num = '9999'")
    db.commit()
    db.close()
    for args in (["db", "upgrade"], ["status"], ["history"], ["run"]):
        out = world.cli(*args)
        assert out.returncode == 1, (args, out.stderr)
        assert "schema revision 9999, newer than this release" in out.stderr
        assert "Traceback" not in out.stderr
