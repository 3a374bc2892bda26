"""The tamper-evident audit ledger: chaining, `verify`, the published head, retention.

Rows are altered, deleted and inserted directly in the database (SQLite and PostgreSQL,
via the `store` fixture) and `verify` must name each; the daemon test runs the real
daemon and CLI: operator actions carry the OS user from the socket's peer credentials.
"""

from __future__ import annotations

import json
import os
import pwd
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Insert, insert, select, text

from reconciler import chain_head
from reconciler.store import NewDeployment, Store, verify
from reconciler.store.chain import A, entry_hash, head, iso
from reconciler.store.db import alembic_config, make_engine, upgrade, write_engine
from tests.support import World, wait_for
from tests.test_daemon import DaemonProcess, history, store_for

ME = pwd.getpwuid(os.getuid()).pw_name
T0 = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)


def deployment(store: Store, version: str, status: str, at: datetime, **extra: object) -> int:
    new = NewDeployment(
        environment="production",
        service="api",
        version=version,
        previous_version=None,
        provider="local",
        provider_type="command",
        strategy={"type": "rolling"},
        trigger="git",
        commit="c0ffee",
        commit_author="Ada <ada@example.com>",
        attempt=1,
        timeout_seconds=60,
        params={"replicas": 3},
        sync_id=extra.get("sync_id"),  # type: ignore[arg-type]
        rollback_of=None,
        created_at=at,
    )
    dep = store.create_deployment(new)
    store.set_status(dep.id, "in_progress", at=at + timedelta(seconds=1))
    store.add_event(
        dep.id, status="in_progress", message="half", percent=50, details={"step": 1}, at=at
    )
    store.append_log(dep.id, [("stdout", f"deploying {version}", at), ("stderr", "warn", at)])
    store.set_status(dep.id, status, at=at + timedelta(seconds=2), error_message=None)
    return dep.id


def populate(store: Store, at: datetime = T0) -> dict[str, int]:
    sync_id = store.begin_sync(trigger="poll", seen_at=at, commit=None)
    store.finish_sync(
        sync_id,
        result="ok",
        ended_at=at,
        environments_changed=["production"],
        errors=[],
        full_load=True,
    )
    ok = deployment(store, "1.0", "completed", at, sync_id=sync_id)
    bad = deployment(store, "1.1", "failed", at + timedelta(minutes=1))
    store.set_status(bad, "rolled_back", at=at + timedelta(minutes=2))
    store.record_operator_action(
        environment="production",
        service=None,
        action="suspend",
        actor="ada",
        note="incident 42",
        at=at + timedelta(minutes=3),
        origin="control socket, pid 1",
    )
    return {"sync": sync_id, "ok": ok, "bad": bad}


def sql(store: Store, statement: str, **params: object) -> None:
    with store._writer.begin() as conn:
        conn.execute(text(statement), params)


def lines(store: Store, **kwargs: object) -> list[str]:
    return [f.line() for f in verify(store, **kwargs).findings]  # type: ignore[arg-type]


def entry_of(store: Store, kind: str, ref: int) -> int:
    with store.engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT max(seq) FROM audit_ledger WHERE kind = :k AND ref = :r"),
                {"k": kind, "r": ref},
            ).scalar_one()
        )


def test_every_fact_is_chained_and_verifies(store: Store):
    populate(store)
    report = verify(store)
    assert report.ok, [f.line() for f in report.findings]
    # genesis, 1 sync, 2 terminal statuses + failed -> rolled_back, 1 operator action
    assert report.counts == {"genesis": 1, "sync": 1, "deployment": 3, "operator_action": 1}
    assert report.entries == 6
    assert store.head() is not None and store.head().seq == 6  # type: ignore[union-attr]


def test_altered_deployment_row_is_named(store: Store):
    ids = populate(store)
    sql(store, "UPDATE deployments SET version = '9.9' WHERE id = :i", i=ids["ok"])
    seq = entry_of(store, "deployment", ids["ok"])
    assert lines(store) == [f"deployment {ids['ok']}: differs from its entry {seq} — altered"]


def test_altered_progress_event_and_log_line_are_named(store: Store):
    ids = populate(store)
    sql(
        store, "UPDATE deployment_events SET message = 'fine' WHERE deployment_id = :i", i=ids["ok"]
    )
    sql(
        store,
        "DELETE FROM deployment_logs WHERE deployment_id = :i AND stream = 'stderr'",
        i=ids["bad"],
    )
    found = lines(store)
    assert len(found) == 2
    assert found[0].startswith(f"deployment {ids['ok']}: differs from its entry")
    assert found[1].startswith(f"deployment {ids['bad']}: differs from its entry")


def test_deleted_deployment_row_is_named(store: Store):
    ids = populate(store)
    for table in ("deployment_events", "deployment_logs"):
        sql(store, f"DELETE FROM {table} WHERE deployment_id = :i", i=ids["ok"])
    sql(store, "DELETE FROM deployments WHERE id = :i", i=ids["ok"])
    seq = entry_of(store, "deployment", ids["ok"])
    assert lines(store) == [
        f"entry {seq} (deployment {ids['ok']}): no deployment row {ids['ok']}"
        " — the row was deleted, or the entry inserted"
    ]


def test_inserted_deployment_row_is_named(store: Store):
    populate(store)
    sql(
        store,
        "INSERT INTO deployments (id, environment, service, version, provider, provider_type,"
        " strategy, status, trigger, attempt, timeout_seconds, params, created_at)"
        " VALUES (77, 'production', 'api', '6.6.6', 'local', 'command', '{}', 'completed',"
        " 'manual', 1, 60, '{}', :at)",
        at=T0,
    )
    assert lines(store) == ["deployment 77: has no ledger entry — inserted outside the reconciler"]


def test_altered_sync_and_operator_action_rows_are_named(store: Store):
    ids = populate(store)
    sql(store, "UPDATE syncs SET result = 'failed' WHERE id = :i", i=ids["sync"])
    sql(store, "UPDATE operator_actions SET actor = 'mallory'")
    found = lines(store)
    assert found[0].startswith(f"sync {ids['sync']}: differs from its entry")
    assert found[1].startswith("operator_action 1: differs from its entry")


def test_altered_ledger_entry_is_named_first(store: Store):
    populate(store)
    sql(store, "UPDATE audit_ledger SET payload = replace(payload, 'ada', 'eve') WHERE seq = 6")
    found = lines(store)
    assert found[0] == "entry 6 (operator_action 1): hash mismatch — altered"


def test_altered_entry_with_its_hash_recomputed_breaks_the_next_link(store: Store):
    populate(store)
    with store.engine.connect() as conn:
        kind, ref, when, payload, prev = conn.execute(
            select(A.c.kind, A.c.ref, A.c.at, A.c.payload, A.c.prev_hash).where(A.c.seq == 3)
        ).one()
    forged = payload.replace('"1.0"', '"6.6.6"')
    digest = entry_hash(3, kind, ref, iso(when) or "", forged, prev)
    sql(store, "UPDATE audit_ledger SET payload = :p, hash = :h WHERE seq = 3", p=forged, h=digest)
    found = lines(store)
    assert found[0].startswith("entry 4 (deployment")
    assert "does not follow entry 3" in found[0]


def test_deleted_ledger_entry_is_named(store: Store):
    ids = populate(store)
    sql(store, "DELETE FROM audit_ledger WHERE seq = 2")
    found = lines(store)
    assert found[0] == f"entry 3 (deployment {ids['ok']}): entry 2 missing before it — deleted"
    assert f"sync {ids['sync']}: has no ledger entry — inserted outside the reconciler" in found


def forged_entry(seq: int, payload: str, prev: str, digest: str) -> Insert:
    """An entry written as the store writes them (typed columns), by someone else."""
    return insert(A).values(
        seq=seq,
        kind="operator_action",
        ref=999,
        at=T0,
        payload=payload,
        prev_hash=prev,
        hash=digest,
    )


def test_inserted_ledger_entry_is_named(store: Store):
    populate(store)
    # A well-formed entry appended at the tail, for an operator action that never was.
    with store._writer.begin() as conn:
        last = head(conn)
        assert last is not None
        payload = '{"action":"deploy","actor":"ada","id":999}'
        digest = entry_hash(last.seq + 1, "operator_action", 999, iso(T0) or "", payload, last.hash)
        conn.execute(forged_entry(last.seq + 1, payload, last.hash, digest))
    assert lines(store) == [
        "entry 7 (operator_action 999): no operator_action row 999"
        " — the row was deleted, or the entry inserted"
    ]
    # Inserted in the middle: every later entry's number and link shift.
    sql(store, "DELETE FROM audit_ledger WHERE seq = 7")
    sql(store, "UPDATE audit_ledger SET seq = seq + 1000 WHERE seq > 3")
    sql(store, "UPDATE audit_ledger SET seq = seq - 999 WHERE seq > 1000")
    with store._writer.begin() as conn:
        prev = conn.execute(text("SELECT hash FROM audit_ledger WHERE seq = 3")).scalar_one()
        digest = entry_hash(4, "operator_action", 999, iso(T0) or "", payload, prev)
        conn.execute(forged_entry(4, payload, prev, digest))
    found = lines(store)
    assert found[0].startswith("entry 5 (deployment") and "does not follow entry 4" in found[0]
    assert any(
        line.startswith("entry 4 (operator_action 999): no operator_action row") for line in found
    )


def test_cut_tail_is_named_only_with_the_published_head(store: Store, tmp_path: Path):
    populate(store)
    published = tmp_path / "head.json"
    last = store.head()
    assert last is not None
    chain_head.write_file(published, last.to_json())
    assert json.loads(published.read_text())["seq"] == 6
    # The last fact and its entry removed together: the chain alone cannot tell.
    sql(store, "DELETE FROM audit_ledger WHERE seq = 6")
    sql(store, "DELETE FROM operator_actions")
    assert verify(store).ok
    head_read = chain_head.read(str(published))
    assert lines(store, published=head_read) == [
        "entry 6 (head): published as the head, but the ledger ends at entry 5 — its tail was cut"
    ]


def test_rewritten_chain_differs_from_the_published_head(store: Store):
    populate(store)
    published = store.head().to_json()  # type: ignore[union-attr]
    sql(store, "UPDATE audit_ledger SET hash = 'f00' WHERE seq = 6")
    found = lines(store, published=published)
    assert (
        found[-1]
        == "entry 6 (head): hash differs from the published head — the chain was rewritten"
    )


def test_concurrent_appends_do_not_fork(store: Store):
    errors: list[BaseException] = []

    def act(worker: int) -> None:
        try:
            for n in range(15):
                store.record_operator_action(
                    environment=f"env{worker}",
                    service=None,
                    action="resume",
                    actor=f"w{worker}",
                    note=str(n),
                    at=datetime.now(UTC),
                )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=act, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    report = verify(store)
    assert report.ok, [f.line() for f in report.findings]
    assert report.counts["operator_action"] == 60
    with store.engine.connect() as conn:
        links = conn.execute(text("SELECT count(DISTINCT prev_hash) FROM audit_ledger")).scalar()
    assert links == report.entries  # no two entries follow the same one


def test_retention_prunes_detail_and_keeps_verify_green(store: Store):
    old = populate(store, at=T0)
    recent = deployment(store, "2.0", "completed", datetime.now(UTC))
    report = store.prune_history(datetime.now(UTC) - timedelta(days=30))
    assert (report.deployments, report.checkpoints) == (2, 1)
    assert report.events > 0 and report.log_lines == 4
    kept = store.get_deployment(old["ok"], with_progress=True, with_log=True)
    assert kept is not None and kept.status == "completed"
    assert kept.progress == [] and kept.log == []
    fresh = store.get_deployment(recent, with_progress=True, with_log=True)
    assert fresh is not None and fresh.log and fresh.progress
    assert verify(store).ok, lines(store)
    assert store.prune_history(datetime.now(UTC) - timedelta(days=30)).deployments == 0
    # Everything else is still detected after pruning.
    sql(store, "UPDATE deployments SET status = 'failed' WHERE id = :i", i=old["ok"])
    assert lines(store)[0].startswith(f"deployment {old['ok']}: differs from its entry")
    sql(store, "UPDATE deployments SET status = 'completed' WHERE id = :i", i=old["ok"])
    sql(
        store,
        "INSERT INTO deployment_events (deployment_id, status, message, details, at)"
        " VALUES (:i, 'completed', 'forged', '{}', :at)",
        i=old["ok"],
        at=T0,
    )
    assert lines(store)[0].startswith(f"deployment {old['ok']}: differs from its entry")


def test_upgrade_backfills_existing_rows_after_a_genesis_entry(db_url: str):
    from alembic import command

    engine = make_engine(db_url)
    try:
        upgrade(engine)
        with write_engine(engine).begin() as conn:
            command.downgrade(alembic_config(conn), "0006")
        with write_engine(engine).begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO syncs (id, trigger, seen_at, ended_at, result, full_load,"
                    " environments_changed, errors) VALUES (1, 'poll', :at, :at, 'ok', false,"
                    " '[]', '[]')"
                ),
                {"at": T0},
            )
            conn.execute(
                text(
                    "INSERT INTO operator_actions (id, at, environment, action, actor)"
                    " VALUES (1, :at, 'production', 'suspend', 'ada')"
                ),
                {"at": T0},
            )
        upgrade(engine)
        store = Store(engine)
        report = verify(store)
        assert report.ok, [f.line() for f in report.findings]
        assert report.counts == {"genesis": 1, "sync": 1, "operator_action": 1}
        with engine.connect() as conn:
            genesis = conn.execute(text("SELECT payload FROM audit_ledger WHERE seq = 1")).scalar()
        assert json.loads(genesis)["backfilled"] == {
            "syncs": 1,
            "deployments": 0,
            "operator_actions": 1,
        }
    finally:
        engine.dispose()


# ---- the daemon and the CLI ------------------------------------------------------------


@pytest.mark.timeout(120)
def test_daemon_chains_operator_actions_with_the_os_user_and_publishes_the_head(tmp_path: Path):
    world = World(tmp_path)
    world.config.write_text(world.config.read_text() + '\n[audit]\nhead = "published/head.json"\n')
    world.repo.set_env("staging", {"api": "1.0"})
    published = tmp_path / "published" / "head.json"
    daemon = DaemonProcess(world)
    try:
        wait_for(
            lambda: any(d["status"] == "completed" for d in history(world)), what="1.0 deployed"
        )
        out = world.cli("suspend", "--env", "staging", "--reason", "incident 42")
        assert out.returncode == 0, out.stderr
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
    store = store_for(world)
    try:
        with store.engine.connect() as conn:
            payload = conn.execute(
                text("SELECT payload FROM audit_ledger WHERE kind = 'operator_action'")
            ).scalar_one()
        action = json.loads(payload)
        assert (action["action"], action["actor"], action["note"]) == ("suspend", ME, "incident 42")
        assert action["origin"].startswith("control socket, pid ")
        last = store.head()
        assert last is not None
        assert json.loads(published.read_text()) == last.to_json()  # published at stop
    finally:
        store.close()

    ok = world.cli("audit", "verify")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("audit ledger intact: ")
    assert f"matches the published head (entry {last.seq})" in ok.stdout
    as_json = json.loads(world.cli("audit", "verify", "--json", check=True).stdout)
    assert as_json["ok"] is True and as_json["entries"] == last.seq

    store = store_for(world)
    try:
        sql(store, "DELETE FROM audit_ledger WHERE seq = :s", s=last.seq)
    finally:
        store.close()
    cut = world.cli("audit", "verify")
    assert cut.returncode == 1
    assert (
        f"entry {last.seq} (head): published as the head, but the ledger ends at entry"
        in cut.stdout
    )
    assert cut.stderr.startswith("reconciler: the audit ledger does not verify: ")
    missing = world.cli("audit", "verify", "--head", str(tmp_path / "nowhere.json"))
    assert missing.returncode == 1 and missing.stderr.startswith(
        "reconciler: cannot read the chain head"
    )


@pytest.mark.timeout(120)
def test_the_daemon_walks_the_ledger_every_verify_interval_and_logs_a_break(tmp_path: Path):
    world = World(tmp_path)
    world.config.write_text(world.config.read_text() + '\n[audit]\nverify_interval = "1s"\n')
    world.repo.set_env("staging", {"api": "1.0"})
    daemon = DaemonProcess(world)
    try:
        wait_for(
            lambda: any(d["status"] == "completed" for d in history(world)), what="1.0 deployed"
        )
        [deployment] = history(world)
        wait_for(lambda: "event=audit_verified" in daemon.log(), what="a walk that verifies")
        assert "event=audit_broken" not in daemon.log()
        store = store_for(world)
        try:  # an edit behind the ledger's back
            sql(store, "UPDATE deployments SET version = '0.9' WHERE id = :i", i=deployment["id"])
        finally:
            store.close()
        wait_for(lambda: "event=audit_broken" in daemon.log(), what="the next walk's finding")
        broken = next(ln for ln in daemon.log().splitlines() if "event=audit_broken" in ln)
        assert f"first='deployment {deployment['id']}: differs from its entry" in broken
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()


@pytest.mark.timeout(120)
def test_daemon_prunes_old_run_detail_with_a_checkpoint(tmp_path: Path):
    world = World(tmp_path)
    world.config.write_text(world.config.read_text() + '\n[audit]\nkeep = "30d"\n')
    world.repo.set_env("staging", {"api": "1.0"})
    from reconciler.config import load_config

    store = Store.from_url(load_config(world.config, environ={}).database_url)
    try:
        old = populate(store, at=T0)  # runs that ended long before the 30 days
    finally:
        store.close()
    daemon = DaemonProcess(world)
    try:
        wait_for(lambda: "event=audit_pruned deployments=2" in daemon.log(), what="pruning")
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
    store = store_for(world)
    try:
        kept = store.get_deployment(old["ok"], with_progress=True, with_log=True)
        assert kept is not None and kept.status == "completed"
        assert kept.progress == [] and kept.log == []
        assert verify(store).counts["checkpoint"] == 1
    finally:
        store.close()
    ok = world.cli("audit", "verify")
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_audit_configuration_is_checked(tmp_path: Path):
    from reconciler.config import ConfigError, load_config

    def load(section: str) -> object:
        path = tmp_path / "reconciler.toml"
        path.write_text(f'[repository]\nurl = "desired"\n\n[audit]\n{section}\n')
        return load_config(path, environ={})

    config = load('keep = "400d"\nhead = "heads/head.json"')
    assert config.audit.keep == 400 * 86400  # type: ignore[attr-defined]
    assert config.audit_head == str(tmp_path / "heads" / "head.json")  # type: ignore[attr-defined]
    assert load('head = "https://audit.example.com/h"').audit_head == (  # type: ignore[attr-defined]
        "https://audit.example.com/h"
    )
    for bad, message in (
        ('keep = "0s"', "audit.keep: keep must be longer than 0s"),
        ('keep = "soon"', "audit.keep: "),
        ("keep = 5", 'audit.keep: expected a duration such as "400d"'),
        ('head = "ftp://x/y"', "audit.head: 'ftp://x/y': publish the head to a file path"),
        ('kept = "1d"', "audit.kept: unknown key"),
    ):
        with pytest.raises(ConfigError) as err:
            load(bad)
        assert message in str(err.value), str(err.value)


def test_head_published_to_a_url_is_read_back(store: Store):
    import asyncio
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    kept: list[bytes] = []

    class Keeper(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            kept.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(204 if self.path == "/head" else 500)
            self.end_headers()

        def do_GET(self) -> None:
            body = kept[-1] if kept else b""
            self.send_response(200 if kept else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Keeper)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/head"
        with pytest.raises(chain_head.HeadError, match="answered 404"):
            chain_head.read(url)
        populate(store)
        last = store.head()
        assert last is not None
        asyncio.run(chain_head.publish(url, last.to_json()))
        assert chain_head.read(url) == last.to_json()
        assert verify(store, published=chain_head.read(url)).ok
        with pytest.raises(chain_head.HeadError, match="answered 500"):
            asyncio.run(chain_head.publish(url + "/elsewhere", last.to_json()))
    finally:
        server.shutdown()
        server.server_close()


def test_verify_while_the_store_appends_sees_one_consistent_state(store: Store):
    populate(store)
    done = threading.Event()

    def write() -> None:
        try:
            for n in range(40):
                deployment(store, f"3.{n}", "completed", datetime.now(UTC))
                store.record_operator_action(
                    environment="production",
                    service="api",
                    action="retry",
                    actor="ada",
                    note=None,
                    at=datetime.now(UTC),
                )
        finally:
            done.set()

    writer = threading.Thread(target=write)
    writer.start()
    runs = 0
    while not done.is_set() or runs == 0:
        report = verify(store)
        assert report.ok, [f.line() for f in report.findings]
        runs += 1
    writer.join()
    assert verify(store).counts["operator_action"] == 41


def test_a_column_added_later_changes_no_existing_payload():
    from reconciler.store.chain import SYNC_BASE, row_json

    row = {name: None for name in SYNC_BASE} | {"id": 1, "signer": None}
    names = (*sorted(SYNC_BASE), "signer")
    assert row_json(row, names, SYNC_BASE) == {**{n: None for n in SYNC_BASE}, "id": 1}
    assert row_json(row | {"signer": "ada"}, names, SYNC_BASE)["signer"] == "ada"
