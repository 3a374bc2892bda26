"""A poll that finds the same head: what it costs, against a bare git look at the ref.

Most polls of a repository find nothing new, so their cost is the daemon's idle cost at
a short ``poll_interval``. A real git repository (20 environments x 5 services), a warm
Engine (synced once), then N ``Engine.sync("poll")`` with the head unchanged:

* local repository (a path; the mirror borrows its objects): the head is read from the
  ref files, no git process. Baseline: one ``git rev-parse refs/heads/main`` (what any
  tool would run to look), per poll.
* remote repository (the same repository, read as if remote: ``git fetch`` into the
  mirror). Baseline: one ``git ls-remote <repo> refs/heads/main``, the least any poller
  asks of a remote.

CPU time is this process's (all threads) plus its waited-for children's (git), divided by
N; wall time per poll beside it. Exits 1 when a printed target is missed.

    .venv/bin/python bench/bench_poll.py            # 200 polls each
    .venv/bin/python bench/bench_poll.py --polls 1000
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    Table,
    commit_all,
    cpu_now,
    exit_status,
    fleet_file,
    machine,
    make_repo,
    ms,
    ratio,
    say,
    write_config,
)

from reconciler.config import load_config
from reconciler.engine import Engine, open_source
from reconciler.providers import build_providers
from reconciler.source import GitSource
from reconciler.store import Store

ENVIRONMENTS, SERVICES = 20, 5
# No git process at all for a local repository: below one bare `git rev-parse`.
TARGET_LOCAL_RATIO = 1.0
# A fetch that brings nothing: at most twice the CPU of the bare ls-remote.
TARGET_REMOTE_RATIO = 2.0


def per_call(n: int, fn: object) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per call of ``fn``, over ``n`` calls."""
    cpu, wall = cpu_now(), time.perf_counter()
    for _ in range(n):
        fn()  # type: ignore[operator]
    return (cpu_now() - cpu) / n, (time.perf_counter() - wall) / n


def engine_for(tmp: Path, name: str, repo: Path) -> Engine:
    base = tmp / name
    base.mkdir()
    config = load_config(write_config(base, ["/bin/true"], repo=str(repo)))
    store = Store.from_url(config.database_url, migrate=True)
    engine = Engine(config, store, open_source(config), build_providers(config))
    engine.wake = lambda environments: None  # type: ignore[method-assign]  # deploy nothing
    return engine


async def polls(engine: Engine, n: int) -> tuple[float, float]:
    first = await engine.sync("poll")
    assert first.result == "ok", first
    await engine.pipeline.kept()
    cpu, wall = cpu_now(), time.perf_counter()
    for _ in range(n):
        outcome = await engine.sync("poll")
        assert outcome.result == "unchanged", outcome.result
    return (cpu_now() - cpu) / n, (time.perf_counter() - wall) / n


def run(n: int) -> Table:
    with tempfile.TemporaryDirectory(prefix="bench-poll-") as name:
        tmp = Path(name)
        repo = make_repo(tmp / "desired")
        for i in range(ENVIRONMENTS):
            repo.joinpath(f"env{i:04d}.yaml").write_text(fleet_file(i, SERVICES))
        commit_all(repo, "fleet")

        local = engine_for(tmp, "local", repo)
        local_cpu, local_wall = asyncio.run(polls(local, n))
        local.source.close()
        local.store.engine.dispose()

        # The same repository, fetched as a remote one is (no borrowed objects).
        remote = engine_for(tmp, "remote", repo)
        remote.source.is_local = lambda: False  # type: ignore[method-assign]
        remote_cpu, remote_wall = asyncio.run(polls(remote, n))
        assert not (remote.source.workdir / "objects" / "info" / "alternates").exists()
        remote.source.close()
        remote.store.engine.dispose()

        def rev_parse() -> None:
            subprocess.run(
                ["git", "--git-dir", str(repo / ".git"), "rev-parse", "refs/heads/main"],
                check=True,
                capture_output=True,
            )

        def ls_remote() -> None:
            subprocess.run(
                ["git", "ls-remote", str(repo), "refs/heads/main"], check=True, capture_output=True
            )

        rp_cpu, rp_wall = per_call(n, rev_parse)
        lr_cpu, lr_wall = per_call(n, ls_remote)

    table = Table(
        f"no-change poll, {n} polls each ({ENVIRONMENTS} x {SERVICES} fleet; {machine()})"
    )
    table.add(
        "local repository: CPU per poll (Engine.sync, same head)",
        ms(local_cpu, 3),
        f"{ms(rp_cpu, 3)} git rev-parse",
        ratio(local_cpu, rp_cpu),
        f"< {TARGET_LOCAL_RATIO:g}x",
        local_cpu < TARGET_LOCAL_RATIO * rp_cpu,
    )
    table.add("  wall per poll", ms(local_wall, 3), ms(rp_wall, 3), ratio(local_wall, rp_wall))
    table.add(
        "remote repository: CPU per poll (git fetch, nothing new)",
        ms(remote_cpu, 3),
        f"{ms(lr_cpu, 3)} git ls-remote",
        ratio(remote_cpu, lr_cpu),
        f"< {TARGET_REMOTE_RATIO:g}x",
        remote_cpu < TARGET_REMOTE_RATIO * lr_cpu,
    )
    table.add("  wall per poll", ms(remote_wall, 3), ms(lr_wall, 3), ratio(remote_wall, lr_wall))
    table.note("CPU = this process (all threads) + its git children, per poll; medians not needed:")
    table.note(f"each figure is a total over {n} polls divided by {n}.")
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", type=int, default=200)
    args = parser.parse_args()
    say(f"bench_poll: {args.polls} polls each; {machine()}")
    _ = GitSource  # the class whose fetch is measured (see reconciler.source.mirror)
    table = run(args.polls)
    table.print()
    return exit_status(table)


if __name__ == "__main__":
    sys.exit(main())
