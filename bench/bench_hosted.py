"""Reconciler's own overhead per deployment on the hosted types (vercel, netlify, railway),
side by side with the `command` type.

In process: a real engine, a real git repository and SQLite, the fake platforms of
tests/fakes/hosted.py (real HTTP on 127.0.0.1, every state reached at the first poll).
For each of N commits (one version each) the executor's run is timed (record created ->
terminal status recorded), and so is the time spent waiting for the platform: every HTTP
call (ApiClient.request) for the hosted types, the deploy script's whole run
(CommandProvider.deploy) for `command`. Overhead = run - platform time: records, progress,
log batches, validation bookkeeping, the providers' own code.

    .venv/bin/python bench/bench_hosted.py            # 20 deployments per type
    .venv/bin/python bench/bench_hosted.py --full     # 60
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import Table, machine, median, ms, percentile, ratio, say

from reconciler.executor import Executor
from reconciler.providers.command import CommandProvider
from reconciler.providers.http_api import ApiClient
from tests.conformance import Harness
from tests.fakes.backends import TOKEN, CommandBackend, HostedBackend
from tests.fakes.hosted import FakeNetlify, FakeRailway, FakeServer, FakeVercel

FAKES: dict[str, Callable[[], FakeServer]] = {
    "vercel": lambda: FakeVercel(TOKEN, step=1e-6),
    "netlify": lambda: FakeNetlify(TOKEN, step=1e-6),
    "railway": lambda: FakeRailway(TOKEN, step=1e-6),
}


class Timer:
    """Wraps a coroutine method to add up the time spent inside it."""

    def __init__(self, owner: Any, name: str) -> None:
        self.owner, self.name, self.total = owner, name, 0.0
        self.original = getattr(owner, name)
        timer = self

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await timer.original(*args, **kwargs)
            finally:
                timer.total += time.perf_counter() - started

        setattr(owner, name, timed)

    def restore(self) -> None:
        setattr(self.owner, self.name, self.original)


def measure(kind: str, n: int, tmp: Path) -> tuple[list[float], list[float]]:
    fake: FakeServer | None = None
    if kind == "command":
        backend: Any = CommandBackend(tmp / "backend")
    else:
        fake = FAKES[kind]()
        fake.start()
        backend = HostedBackend(kind, fake, tmp / "backend", poll_interval=0.001)
    harness = Harness(tmp / "harness", backend)
    platform = Timer(
        CommandProvider if kind == "command" else ApiClient,
        "deploy" if kind == "command" else "request",
    )
    run = Timer(Executor, "run")
    overheads, waits = [], []
    try:
        harness.deploy("0.0")  # warm-up: imports, first connection, migrations
        for i in range(1, n + 1):
            platform.total = run.total = 0.0
            history = harness.deploy(f"1.{i}")
            assert history[0].status == "completed", history[0].error_message
            overheads.append(run.total - platform.total)
            waits.append(platform.total)
    finally:
        run.restore()
        platform.restore()
        if fake is not None:
            fake.stop()
    return overheads, waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--deployments", type=int, default=None)
    args = parser.parse_args()
    n = args.deployments or (60 if args.full else 20)
    results: dict[str, tuple[list[float], list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-hosted-") as name:
        for kind in ("command", "vercel", "netlify", "railway"):
            say(f"{kind}: {n} deployments")
            results[kind] = measure(kind, n, Path(name) / kind)
    base = results["command"][0]
    table = Table(f"reconciler overhead per deployment, {n} deployments per type ({machine()})")
    for kind in ("vercel", "netlify", "railway"):
        over, wait = results[kind]
        table.add(
            f"{kind} overhead p50 (vs command)",
            ms(median(over)),
            ms(median(base)),
            ratio(median(over), median(base)),
        )
        table.add(
            f"{kind} overhead p95 (vs command)",
            ms(percentile(over, 95)),
            ms(percentile(base, 95)),
            ratio(percentile(over, 95), percentile(base, 95)),
        )
        table.add(
            f"{kind} platform time p50 (HTTP calls)",
            ms(median(wait)),
            ms(median(results["command"][1])),
        )
    table.note(
        "overhead = executor run (record created -> terminal status) - time waiting for the platform"
    )
    table.note(
        "platform: HTTP calls to the local fake (hosted) / the deploy script's run (command)"
    )
    table.print()


if __name__ == "__main__":
    main()
