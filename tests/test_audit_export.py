"""`reconciler audit export`: the deployments of a real repository and engine, as JSON
lines and CSV, filtered, and in flat memory over a large ledger."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from tests.ledger_fill import fill_ledger, measured_run
from tests.support import RECONCILER, World, cli_env

pytestmark = pytest.mark.timeout(300)


def export(world: World, *args: str) -> str:
    return world.cli("audit", "export", *args, check=True).stdout


def jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> World:
    """Two environments: git deployments (one failed), an operator's deploy with a reason."""
    world = World(tmp_path_factory.mktemp("export"))
    repo = world.repo
    repo.set_env("staging", {"api": "1.0"}, "staging: api 1.0")
    repo.set_env("production", {"api": "1.0"}, "production: api 1.0")
    world.cli("sync", check=True)
    repo.set_env("production", {"api": "1.1-fail"}, "production: try api 1.1")
    assert world.cli("sync").returncode == 1
    world.cli(
        "deploy", "--env", "production", "--service", "api", "--version", "1.0.1",
        "--reason", "hotfix for INC-7", check=True,
    )  # fmt: skip
    return world


def test_jsonl_carries_commit_subject_timeline_outcome_and_the_operator(ledger: World):
    rows = jsonl(export(ledger))
    history = json.loads(ledger.cli("history", "--json", check=True).stdout)
    assert [r["id"] for r in rows] == sorted(h["id"] for h in history)  # oldest first
    by_version = {(r["environment"], r["version"]): r for r in rows}

    first = by_version[("production", "1.0")]
    assert first["status"] == "completed" and first["trigger"] == "git"
    assert first["commit_subject"] == "production: api 1.0"
    assert first["commit_author"] == "Ada <ada@example.com>"
    assert first["previous_version"] is None
    assert first["operator_action"] is None
    assert first["sync_id"] is not None and first["sync_seen_at"].endswith("Z")
    assert first["progress"][0]["status"] == "pending"
    assert first["progress"][-1]["status"] == "completed"
    assert "preparing" in [e["message"] for e in first["progress"]]
    assert first["validation"]["ok"] is True

    failed = by_version[("production", "1.1-fail")]
    assert failed["status"] == "failed" and "health check failed" in failed["error_message"]
    assert failed["commit_subject"] == "production: try api 1.1"
    assert failed["previous_version"] == "1.0"
    assert failed["progress"][-1]["status"] == "failed"

    manual = by_version[("production", "1.0.1")]
    assert manual["trigger"] == "manual" and manual["status"] == "completed"
    action = manual["operator_action"]
    assert action["action"] == "deploy"
    assert action["note"] == "to 1.0.1: hotfix for INC-7"
    assert action["actor"] and action["at"] <= manual["created_at"]
    assert action["origin"].startswith("local command, pid ")
    assert list(rows[0]) == [
        "id", "environment", "service", "version", "previous_version", "status",
        "error_message", "trigger", "attempt", "commit", "commit_author", "commit_subject",
        "sync_id", "sync_seen_at", "operator_action", "rollback_of", "provider",
        "provider_type", "strategy", "params", "timeout_seconds", "validation", "created_at",
        "started_at", "completed_at", "duration_seconds", "progress",
    ]  # fmt: skip


def test_csv_is_one_row_per_deployment_with_json_cells(ledger: World):
    rows = list(csv.DictReader(io.StringIO(export(ledger, "--format", "csv"))))
    assert len(rows) == len(jsonl(export(ledger)))
    manual = next(r for r in rows if r["trigger"] == "manual")
    assert json.loads(manual["operator_action"])["note"] == "to 1.0.1: hotfix for INC-7"
    timeline = json.loads(manual["progress"])
    assert timeline[0]["status"] == "pending" and timeline[-1]["status"] == "completed"
    git_row = next(r for r in rows if r["version"] == "1.1-fail")
    assert git_row["operator_action"] == "" and git_row["commit_subject"].startswith("production")
    assert json.loads(git_row["strategy"]) == {"type": "rolling"}


def test_filters_and_output_file(ledger: World):
    everything = jsonl(export(ledger))
    staging = jsonl(export(ledger, "--env", "staging"))
    assert staging == [r for r in everything if r["environment"] == "staging"] and staging
    assert export(ledger, "--since", "2999-01-01") == ""
    assert jsonl(export(ledger, "--since", "1h")) == everything
    last = everything[-1]["created_at"]  # seconds: the rows of that second are kept too
    since_last = jsonl(export(ledger, "--since", last))
    assert since_last == [r for r in everything if r["created_at"] >= last]
    assert since_last[-1]["trigger"] == "manual" and everything[0] not in since_last

    target = ledger.tmp / "out" / "audit.csv"
    target.parent.mkdir()
    assert export(ledger, "--format", "csv", "--output", str(target)) == ""
    assert target.read_text() == export(ledger, "--format", "csv")

    bad = ledger.cli("audit", "export", "--since", "yesterday")
    assert bad.returncode == 2 and "--since" in bad.stderr and len(bad.stderr.splitlines()) == 1
    unwritable = ledger.cli("audit", "export", "--output", str(ledger.tmp / "no" / "x.jsonl"))
    assert unwritable.returncode in (1, 2) and unwritable.stderr.startswith("reconciler: ")


def _export_peak_rss_kib(config: Path, *args: str) -> int:
    command = [*RECONCILER, "--config", str(config), "audit", "export", *args]
    return measured_run(command, cwd=config.parent, env=cli_env())[0]


@pytest.mark.timeout(900)  # 200,000 rows written and 220,000 exported, on a loaded machine
def test_export_memory_does_not_grow_with_the_rows(tmp_path: Path):
    from reconciler.store import Store

    world = World(tmp_path)
    store = Store.from_url(f"sqlite:///{tmp_path / 'state' / 'reconciler.db'}")
    # 20,000 deployments in "small", 180,000 more in "big": the export of all 200,000 must
    # peak no higher than the export of 20,000, give or take 8 MB (holding the rows would
    # take ~1 GB). One format: CSV goes through the same pages.
    fill_ledger(store.engine, 20_000, environments=("small",))
    fill_ledger(store.engine, 180_000, environments=("big",))
    store.engine.dispose()
    small = _export_peak_rss_kib(world.config, "--env", "small")
    full = _export_peak_rss_kib(world.config)
    assert full - small < 8 * 1024, (small, full)


def test_store_pages_link_operator_actions_on_both_databases(store: Any):
    """Through the real store (SQLite and PostgreSQL), pages of 2: each operator action is
    tied to the one deployment it caused, and to none other."""
    from datetime import UTC, datetime, timedelta

    from reconciler.store import NewDeployment

    t0 = datetime(2026, 11, 1, tzinfo=UTC)

    def deploy(version: str, trigger: str, minute: int, **kw: Any) -> int:
        new = NewDeployment(
            environment="production", service="api", version=version, previous_version=None,
            provider="local", provider_type="command", strategy={"type": "rolling"},
            trigger=trigger, commit=None, commit_author=None, attempt=1, timeout_seconds=60,
            params={}, created_at=t0 + timedelta(minutes=minute), **kw,
        )  # fmt: skip
        rec = store.create_deployment(new)
        store.set_status(rec.id, "failed", at=t0 + timedelta(minutes=minute, seconds=30))
        return int(rec.id)

    def act(action: str, minute: int, note: str | None = None) -> None:
        store.record_operator_action(
            environment="production", service="api", action=action, actor="bob", note=note,
            at=t0 + timedelta(minutes=minute),
        )  # fmt: skip

    git1 = deploy("1.0", "git", 0)
    act("deploy", 1, "to 2.0: hotfix")
    manual = deploy("2.0", "manual", 2)
    auto = deploy("1.0", "rollback", 3, rollback_of=manual)
    manual_again = deploy("2.1", "manual", 4)  # no action of its own: not bob's deploy
    act("retry", 5)
    retried = deploy("1.0", "git", 6)
    git2 = deploy("1.0", "retry", 7)
    rows = list(store.export_deployments(page=2))
    assert [r.deployment.id for r in rows] == [git1, manual, auto, manual_again, retried, git2]
    caused = {r.deployment.id: r.operator_action for r in rows}
    assert caused[manual] is not None and caused[manual].note == "to 2.0: hotfix"
    assert caused[retried] is not None and caused[retried].action == "retry"
    assert [i for i, a in caused.items() if a is not None] == [manual, retried]
    assert [e.status for e in rows[0].deployment.progress or []] == ["pending", "failed"]
    assert store.count_deployments(since=t0 + timedelta(minutes=4)) == 3
    later = list(store.export_deployments(since=t0 + timedelta(minutes=4), page=1))
    assert [r.deployment.id for r in later] == [manual_again, retried, git2]
    assert later[1].operator_action is not None  # the action is older than --since


def test_progress_on_a_terminal_only(ledger: World):
    import os
    import subprocess

    total = len(jsonl(export(ledger)))
    leader, follower = os.openpty()
    try:
        out = subprocess.run(
            [*RECONCILER, "--config", str(ledger.config), "audit", "export"],
            stdout=subprocess.PIPE,
            stderr=follower,
            cwd=ledger.tmp,
            env=cli_env(),
            timeout=60,
            check=True,
        )
        os.close(follower)
        follower = -1
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert len(out.stdout.splitlines()) == total
    assert f"{total:,} of ~{total:,} deployments written" in shown.decode()
    # Not a terminal: nothing on stderr.
    assert ledger.cli("audit", "export", check=True).stderr == ""
