"""The run's process group in the ledger: what crash recovery reads (both databases)."""

from __future__ import annotations

from reconciler.store import Store
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
