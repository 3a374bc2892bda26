"""How long planning a large fleet blocks the daemon's event loop.

`Engine.decisions()` reads the recorded state and runs the pure planner over every service
(what `status`, the HTTP status endpoint and every runner wake-up ask for). The planner is
seconds of pure Python for tens of thousands of services with windows; run on the event
loop, it stalls deployments' progress, HTTP requests, SSE streams and the watchdog for that
long. The reconciler runs it in a worker thread; the baseline is the previous code path,
the same planner called on the loop after the recorded state was read in a thread.

A ticker task sleeps `--tick` ms in a loop while `decisions()` runs; its lag (how late it
wakes) is how long the loop could not run anything else. Each side runs `--repeat` times,
alternating, on the same engine, store and desired state.

    .venv/bin/python bench/bench_plan.py [--full]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from _common import (
    Table,
    env_name,
    fleet_file,
    machine,
    median,
    ms,
    ratio,
    say,
    write_config,
)

from desired_state import load_files
from reconciler.config import load_config
from reconciler.engine import Engine, open_source
from reconciler.providers import build_providers
from reconciler.store import Store

WINDOWS = """windows:
  - cron: "0 9 * * mon-fri"
    duration: 8h
    timezone: Europe/Paris
  - cron: "30 22 * * sat"
    duration: 2h
"""


async def ticker(tick: float, lags: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        before = time.perf_counter()
        await asyncio.sleep(tick)
        lags.append(time.perf_counter() - before - tick)


async def measure(engine: Engine, on_loop: bool, tick: float) -> tuple[float, float, int]:
    """(max loop lag, wall time of decisions(), decisions) for one run."""
    lags: list[float] = []
    stop = asyncio.Event()
    task = asyncio.create_task(ticker(tick, lags, stop))
    await asyncio.sleep(tick * 2)  # the ticker is running
    lags.clear()
    started = time.perf_counter()
    if on_loop:  # the baseline: the ledger read in a thread, the planner on the loop
        snapshot = engine.snapshot
        recorded = await asyncio.to_thread(engine.planner.recorded, snapshot, None)
        decisions = engine.planner.plan(snapshot, None, recorded, engine.clock())
    else:
        decisions = await engine.decisions()
    wall = time.perf_counter() - started
    await asyncio.sleep(tick * 2)
    stop.set()
    await task
    return max(lags, default=0.0), wall, len(decisions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="20,000 services, 5 runs")
    parser.add_argument("--environments", type=int, default=None)
    parser.add_argument("--services", type=int, default=20, help="per environment")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--tick", type=float, default=5.0, help="ticker period, ms")
    args = parser.parse_args()
    envs = args.environments or (1000 if args.full else 250)
    repeat = args.repeat or (5 if args.full else 3)
    tick = args.tick / 1000

    with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp_name:
        tmp = Path(tmp_name)
        say(f"building {envs} environments x {args.services} services with windows")
        files = [
            (f"{env_name(i)}.yaml", fleet_file(i, args.services) + WINDOWS) for i in range(envs)
        ]
        state = load_files(files, providers={"local"})
        assert not state.errors, state.errors[:3]
        config = load_config(write_config(tmp, ["/bin/true"], watch=False))
        store = Store.from_url(config.database_url, migrate=True)
        engine = Engine(config, store, open_source(config), build_providers(config))
        engine.effective = dict(state.environments)

        async def run() -> dict[bool, list[tuple[float, float, int]]]:
            out: dict[bool, list[tuple[float, float, int]]] = {True: [], False: []}
            await measure(engine, False, tick)  # warm-up (imports, caches)
            for i in range(repeat):
                for on_loop in (False, True):
                    result = await measure(engine, on_loop, tick)
                    out[on_loop].append(result)
                    say(f"run {i + 1} {'on loop' if on_loop else 'off loop'}: {result}")
            return out

        results = asyncio.run(run())
        store.engine.dispose()

    n = results[False][0][2]
    mine_lag = [r[0] for r in results[False]]
    base_lag = [r[0] for r in results[True]]
    mine_wall = [r[1] for r in results[False]]
    base_wall = [r[1] for r in results[True]]
    table = Table(f"bench_plan: decisions() over {n:,} services with windows; {machine()}")
    table.add(
        "max event-loop lag during decisions() (worst run)",
        ms(max(mine_lag)),
        ms(max(base_lag)) + " on loop",
        ratio(max(mine_lag), max(base_lag)),
    )
    table.add(
        "max event-loop lag during decisions() (median run)",
        ms(median(mine_lag)),
        ms(median(base_lag)) + " on loop",
        ratio(median(mine_lag), median(base_lag)),
        "< 100 ms",
        median(mine_lag) < 0.1,
    )
    table.add(
        "decisions() wall time (median run)",
        ms(median(mine_wall)),
        ms(median(base_wall)) + " on loop",
        ratio(median(mine_wall), median(base_wall)),
    )
    table.note(
        f"ticker every {args.tick:g} ms; {repeat} runs per side, alternating; lag = how late "
        "the ticker woke, i.e. how long nothing else could run on the loop"
    )
    table.print()


if __name__ == "__main__":
    main()
