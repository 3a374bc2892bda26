"""`reconciler audit export` over a large ledger: throughput and peak memory.

One SQLite ledger holds ``--baseline`` deployments in environment `base` and the rest in
`rest` (3 progress events each, with syncs). The whole export (``--deployments``) and the
export of `base` alone run side by side as real CLI processes writing to /dev/null; each
one's peak RSS and CPU time come from its rusage. The export pages through the ledger, so
its peak RSS must not grow with the rows: target, growth over the baseline's peak < 50 MB.
Exits 1 when the target is missed.

    .venv/bin/python bench/bench_export.py [--deployments 1000000] [--baseline 100000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _common import Table, cli_env, machine, say, write_config

from reconciler.store import Store
from tests.ledger_fill import fill_ledger, measured_run

TARGET_MB = 50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deployments", type=int, default=1_000_000)
    parser.add_argument("--baseline", type=int, default=100_000)
    parser.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as name:
        tmp = Path(name)
        config = write_config(tmp, ["/bin/true"])
        store = Store.from_url(f"sqlite:///{tmp / 'state' / 'reconciler.db'}")
        say(f"filling {args.deployments:,} deployments ({args.baseline:,} in `base`)")
        fill_ledger(store.engine, args.baseline, environments=("base",))
        fill_ledger(store.engine, args.deployments - args.baseline, environments=("rest",))
        store.engine.dispose()
        command = [sys.executable, "-m", "reconciler", "--config", str(config), "audit", "export"]
        command += ["--format", args.format]
        env = cli_env()
        say(f"exporting {args.baseline:,} (--env base)")
        base_rss, base_cpu, base_wall = measured_run([*command, "--env", "base"], cwd=tmp, env=env)
        say(f"exporting {args.deployments:,}")
        rss, cpu, wall = measured_run(command, cwd=tmp, env=env)
    growth_mb = (rss - base_rss) / 1024
    table = Table(f"audit export --format {args.format} ({machine()})")
    table.add("deployments", f"{args.deployments:,}", f"{args.baseline:,}")
    table.add(
        "rows/s (CPU time)",
        f"{args.deployments / cpu:,.0f}",
        f"{args.baseline / base_cpu:,.0f}",
        (args.deployments / cpu) / (args.baseline / base_cpu),
    )
    table.add(
        "rows/s (wall)",
        f"{args.deployments / wall:,.0f}",
        f"{args.baseline / base_wall:,.0f}",
        (args.deployments / wall) / (args.baseline / base_wall),
    )
    table.add("peak RSS", f"{rss / 1024:,.1f} MB", f"{base_rss / 1024:,.1f} MB", rss / base_rss)
    met = growth_mb < TARGET_MB
    table.add("peak RSS growth", f"{growth_mb:+,.1f} MB", "-", None, f"< {TARGET_MB} MB", met)
    table.note("baseline: the same export limited to its first environment, same ledger")
    table.print()
    sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
