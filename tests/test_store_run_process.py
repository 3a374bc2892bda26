"""The run's process group in the ledger: what crash recovery reads (both databases)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import delete

from reconciler.store import Store
from reconciler.store.models import audit_ledger
from reconciler.store.verification import verify
from tests.test_store import at, new, run


def test_unfinished_processes_are_those_of_open_records(store: Store) -> None:
    running = run(store, new(service="a"), "in_progress", 0)
    done = run(store, new(service="b"), "in_progress", 0)
    never_started = run(store, new(service="c"), "validating", 0)
    store.set_run_process(running, 4242, "boot-id:123456")
    store.set_run_process(done, 4343, "boot-id:123457")
    store.set_status(done, "completed", at=at(10))
    assert store.unfinished_processes() == [(running, 4242, "boot-id:123456")]
    store.interrupt_unfinished(message="interrupted", at=at(20))
    assert store.unfinished_processes() == []
    assert never_started


def test_unfinished_runs_include_those_whose_group_was_never_recorded(store: Store) -> None:
    recorded = run(store, new(service="a"), "in_progress", 0)
    spawned = run(store, new(service="b"), "validating", 0)  # killed before the record
    done = run(store, new(service="c"), "in_progress", 0)
    store.set_run_process(recorded, 4242, "boot-id:123456")
    store.set_status(done, "completed", at=at(10))
    assert store.unfinished_runs() == [(recorded, 4242, "boot-id:123456"), (spawned, None, None)]
    assert store.unfinished_runs(environments=["elsewhere"]) == []
    store.interrupt_unfinished(message="interrupted", at=at(20))
    assert store.unfinished_runs() == []


def test_the_ledger_id_is_the_genesis_hash_and_begins_an_empty_chain(
    store: Store, tmp_path: Path
) -> None:
    genesis = store.head()  # written by the migration that created the ledger
    assert genesis is not None and genesis.seq == 1
    ledger = store.ledger_id()
    assert len(ledger) == 32 and genesis.hash.startswith(ledger)
    other = Store.from_url(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        assert other.ledger_id() != ledger  # deployment ids repeat; this does not
    finally:
        other.engine.dispose()
    # An offline-migrated database's chain is empty until its first append: asking for
    # the identity writes the genesis entry that append would, and facts chain after it.
    with store._writer.begin() as conn:
        conn.execute(delete(audit_ledger))
    assert store.head() is None
    begun = store.ledger_id()
    head = store.head()
    assert head is not None and head.seq == 1 and head.hash.startswith(begun) and begun != ledger
    run(store, new(service="a"), "completed", 0)
    after = store.head()
    assert after is not None and after.seq == 2
    assert store.ledger_id() == begun
    assert verify(store).ok
