"""The idle daemon: CPU seconds per minute, wake-ups and memory while nothing happens.

Starts ``reconciler --config X run`` (a real subprocess) on a small local repository (5
environments x 3 services; watch = true, poll_interval = "30s"), waits until its startup
deployments are recorded, lets it settle (3 s), then samples the CPU time of the daemon's
whole process tree over the window (15 s by default, 60 s with --full), scaled to one
minute: /proc/<pid>/stat utime + stime (all threads) + cutime + cstime (children it has
reaped, e.g. a poll's ``git`` runs) + the same of every live descendant (GitPython's
``git cat-file`` helpers); the daemon's own share is a row of its own. Also the context
switches of every thread, and VmRSS and VmHWM from /proc/<pid>/status. Each daemon serves
its HTTP API on a free port of its own; ``--no-http`` turns it off in all of them.

At fleet size too: a third daemon, the same settings, on a repository of 1,000
environments x 20 services (``--fleet E S``; bench/_common.fleet_file) whose ledger is
filled beforehand with each service's completed deployment (bulk SQL, then
``Store.rebuild_service_state``), so it starts in sync: its load and plan of the fleet,
then the idle window beside the others.

Exits 1 when a target it prints is missed.

Baselines, measured at the same time and the same way:
* ``python -c "import time; time.sleep(1e9)"`` (an idle interpreter);
* the same daemon with watch = false (on the same repository, its own state directory),
  to tell the file watcher's share (a row of its own: watch = true minus watch = false);
* ``python -c "import reconciler.cli, time; time.sleep(1e9)"`` (the cost of the imports).

    .venv/bin/python bench/bench_idle.py            # 15 s window (~30 s)
    .venv/bin/python bench/bench_idle.py --full     # 60 s window (~75 s)
    .venv/bin/python bench/bench_idle.py --no-http  # the daemons without the HTTP server
    .venv/bin/python bench/bench_idle.py --fleet 0 0  # without the fleet daemon
"""

from __future__ import annotations

import argparse
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from _common import (
    CLK_TCK,
    PYTHON,
    RECONCILER,
    ROOT,
    Table,
    children,
    cli_env,
    commit_all,
    context_switches,
    cpu_seconds,
    env_name,
    env_yaml,
    fleet_file,
    machine,
    make_repo,
    mb,
    memory,
    ratio,
    say,
    service_name,
    stop_process,
    threads,
    wait_for,
    write_config,
)

ENVIRONMENTS, SERVICES = 5, 3
FLEET = (1000, 20)
FLEET_VERSION = "1.49.0"  # fleet_file's default
SETTLE = 3.0
TARGET_CPU = 0.1  # "about zero": under 0.1 CPU second per minute (0.17 % of a core)
TARGET_RSS = 80 * 2**20


def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and everything under it: its utime + stime (all threads),
    cutime + cstime (children it reaped), and the same of each live descendant."""
    try:
        fields = _stat_fields(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # After the state (field 3): utime 14, stime 15, cutime 16, cstime 17.
    own = sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK_TCK
    try:
        kids = children(pid)
    except (FileNotFoundError, ProcessLookupError):
        kids = []
    return own + sum(tree_cpu(kid) for kid in kids)


def seed_fleet(state: Path, environments: int, services: int) -> None:
    """The fleet's ledger: one completed deployment of every service at the file's version,
    so the daemon starts with nothing to deploy (migrations applied here, not timed)."""
    from reconciler.store import Store

    store = Store.from_url(f"sqlite:///{state / 'reconciler.db'}", migrate=True)
    at = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ")
    sql = (
        "INSERT INTO deployments (environment, service, version, provider, provider_type, "
        'strategy, status, "trigger", attempt, timeout_seconds, params, created_at, '
        "started_at, completed_at) VALUES (?, ?, ?, 'local', 'command', '{}', 'completed', "
        "'git', 1, 1800, '{}', ?, ?, ?)"
    )
    rows = [
        (env_name(i), service_name(j), FLEET_VERSION, at, at, at)
        for i in range(environments)
        for j in range(services)
    ]
    with store.engine.begin() as conn:
        conn.exec_driver_sql(sql, rows)
    store.rebuild_service_state()
    store.engine.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def deployments_done(db: Path, expected: int) -> bool:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            done = conn.execute(
                "SELECT count(*) FROM deployments WHERE status = 'completed'"
            ).fetchone()[0]
    except sqlite3.Error:
        return False
    return int(done) >= expected


class Probe:
    def __init__(self, label: str, proc: subprocess.Popen[bytes]) -> None:
        self.label, self.proc = label, proc
        self.cpu0 = self.cpu1 = 0.0
        self.cs0 = self.cs1 = 0

        self.tree0 = self.tree1 = 0.0

    def start(self) -> None:
        self.cpu0, self.cs0 = cpu_seconds(self.proc.pid), context_switches(self.proc.pid)
        self.tree0 = tree_cpu(self.proc.pid)

    def stop(self) -> None:
        self.cpu1, self.cs1 = cpu_seconds(self.proc.pid), context_switches(self.proc.pid)
        self.tree1 = tree_cpu(self.proc.pid)
        self.rss, self.hwm = memory(self.proc.pid)
        self.threads = threads(self.proc.pid)
        kids = children(self.proc.pid)
        self.kids = len(kids)
        self.kids_rss = sum(memory(k)[0] for k in kids)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="60 s window")
    parser.add_argument("--seconds", type=float, help="window (default 15, --full 60)")
    parser.add_argument(
        "--no-http", action="store_true", help='the daemons with the HTTP server off (listen = "")'
    )
    parser.add_argument(
        "--fleet",
        nargs=2,
        type=int,
        default=FLEET,
        metavar=("E", "S"),
        help="the fleet daemon's environments x services (default 1000 20; 0 0: none)",
    )
    args = parser.parse_args()
    fleet_envs, fleet_services = args.fleet
    window = args.seconds or (60.0 if args.full else 15.0)
    say(f"bench_idle: {window:g} s window; {machine()}")

    with tempfile.TemporaryDirectory(prefix="bench-idle-") as name:
        tmp = Path(name)
        repo = make_repo(tmp / "desired")
        for i in range(ENVIRONMENTS):
            repo.joinpath(f"env{i}.yaml").write_text(
                env_yaml(f"env{i}", [(f"svc{j}", "1.0.0") for j in range(SERVICES)])
            )
        commit_all(repo, "initial")
        config = write_config(tmp, ["/bin/true"], poll_interval="30s", watch=True)
        # The same daemon without the file watcher, to attribute the watcher's wake-ups.
        nowatch = tmp / "nowatch"
        nowatch.mkdir()
        config2 = write_config(
            nowatch, ["/bin/true"], repo=str(repo), poll_interval="30s", watch=False
        )
        configs = [config, config2]
        fleet_dir = tmp / "fleet"
        if fleet_envs:
            say(f"  writing and seeding the fleet: {fleet_envs} x {fleet_services}")
            fleet_repo = make_repo(fleet_dir / "desired")
            for i in range(fleet_envs):
                fleet_repo.joinpath(f"{env_name(i)}.yaml").write_text(fleet_file(i, fleet_services))
            commit_all(fleet_repo, "fleet")
            seed_fleet(fleet_dir / "state", fleet_envs, fleet_services)
            configs.append(write_config(fleet_dir, ["/bin/true"], poll_interval="30s", watch=True))
        # Every daemon serves HTTP (idle, part of the daemon): each on its own free port.
        for cfg in configs:
            listen = "" if args.no_http else f"127.0.0.1:{free_port()}"
            cfg.write_text(cfg.read_text() + f'\n[server]\nlisten = "{listen}"\n')
        env = cli_env()
        started = time.monotonic()
        procs = {
            "daemon": subprocess.Popen(
                [*RECONCILER, "--config", str(config), "run"],
                cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=(tmp / "daemon.log").open("w"),
            ),
            "nowatch": subprocess.Popen(
                [*RECONCILER, "--config", str(config2), "run"],
                cwd=nowatch, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=(nowatch / "daemon.log").open("w"),
            ),
            "sleep": subprocess.Popen(
                [PYTHON, "-c", "import time; time.sleep(1e9)"], env=env, cwd=ROOT
            ),
            "imports": subprocess.Popen(
                [PYTHON, "-c", "import reconciler.cli, time; time.sleep(1e9)"], env=env, cwd=ROOT
            ),
        }  # fmt: skip
        if fleet_envs:
            procs["fleet"] = subprocess.Popen(
                [*RECONCILER, "--config", str(configs[2]), "run"],
                cwd=fleet_dir, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=(fleet_dir / "daemon.log").open("w"),
            )  # fmt: skip
        try:
            wait_for(
                lambda: deployments_done(tmp / "state" / "reconciler.db", ENVIRONMENTS * SERVICES),
                60,
                "the startup deployments",
                0.05,
            )
            wait_for(
                lambda: deployments_done(
                    nowatch / "state" / "reconciler.db", ENVIRONMENTS * SERVICES
                ),
                60,
                "the startup deployments (watch = false)",
                0.05,
            )
            ready = time.monotonic() - started
            if fleet_envs:
                wait_for(
                    lambda: (
                        "event=sync trigger=" in (fleet_dir / "daemon.log").read_text()
                        or procs["fleet"].poll() is not None
                    ),
                    300,
                    "the fleet daemon's first sync",
                    0.05,
                )
                # Then its runners plan every environment once: wait until it is quiet.
                wait_for(lambda: quiet(procs["fleet"].pid), 300, "the fleet daemon to settle", 0)
                fleet_ready = time.monotonic() - started
            say(
                f"  daemon pid {procs['daemon'].pid}: startup deployments done in {ready:.1f} s; "
                f"settling {SETTLE:g} s, then measuring {window:g} s"
            )
            time.sleep(SETTLE)
            probes = {k: Probe(k, p) for k, p in procs.items()}
            for p in probes.values():
                p.start()
            time.sleep(window)
            for p in probes.values():
                p.stop()
            for k, p in procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{k} exited early ({p.returncode})")
            daemon_log = (tmp / "daemon.log").read_text()
        finally:
            for p in procs.values():
                stop_process(p)

        if fleet_envs:
            deployed = count_deployments(fleet_dir / "state" / "reconciler.db")
            if deployed != fleet_envs * fleet_services:
                raise RuntimeError(
                    f"the fleet daemon deployed: {deployed} deployments, "
                    f"{fleet_envs * fleet_services} seeded"
                )

    per_min = 60.0 / window
    d, s, i = probes["daemon"], probes["sleep"], probes["imports"]
    cpu = {k: (p.cpu1 - p.cpu0) * per_min for k, p in probes.items()}
    tree = {k: (p.tree1 - p.tree0) * per_min for k, p in probes.items()}
    cs = {k: (p.cs1 - p.cs0) * per_min for k, p in probes.items()}
    table = Table(f"idle daemon, {window:g} s window after settling ({machine()})")
    table.add(
        f"CPU s/min, idle, with children ({ENVIRONMENTS} x {SERVICES})",
        f"{tree['daemon']:.3f} s",
        f"{tree['sleep']:.3f} s",
        f"+{tree['daemon'] - tree['sleep']:.3f} s",
        "~0 (< 0.1 s)",
        tree["daemon"] < TARGET_CPU,
    )
    table.add(
        "  the daemon process alone (utime+stime)",
        f"{cpu['daemon']:.3f} s",
        f"{cpu['sleep']:.3f} s",
        f"+{cpu['daemon'] - cpu['sleep']:.3f} s",
    )
    table.add(
        "  same daemon with watch = false",
        f"{cpu['nowatch']:.3f} s",
        f"{cpu['sleep']:.3f} s",
        f"+{cpu['nowatch'] - cpu['sleep']:.3f} s",
    )
    table.add(
        "  the file watcher's share (watch = true - false)",
        f"{cpu['daemon'] - cpu['nowatch']:+.3f} s",
    )
    table.add(
        "wake-ups/min (context switches, all threads)",
        f"{cs['daemon']:,.0f}",
        f"{cs['sleep']:,.0f}",
        f"+{cs['daemon'] - cs['sleep']:,.0f}",
    )
    table.add(
        "  same daemon with watch = false",
        f"{cs['nowatch']:,.0f}",
        f"{cs['sleep']:,.0f}",
        f"+{cs['nowatch'] - cs['sleep']:,.0f}",
    )
    table.add(
        "  the file watcher's share (watch = true - false)", f"{cs['daemon'] - cs['nowatch']:+,.0f}"
    )
    table.add(
        "VmRSS",
        mb(d.rss),
        f"{mb(s.rss)} sleep / {mb(i.rss)} imports",
        ratio(d.rss, i.rss),
        "< 80 MB",
        d.rss < TARGET_RSS,
    )
    table.add(
        "VmHWM (peak RSS)",
        mb(d.hwm),
        f"{mb(s.hwm)} sleep / {mb(i.hwm)} imports",
        ratio(d.hwm, i.hwm),
        "< 80 MB",
        d.hwm < TARGET_RSS,
    )
    table.add("  same daemon with watch = false", mb(probes["nowatch"].rss))
    table.add("threads", str(d.threads), f"{s.threads} sleep / {i.threads} imports")
    table.add("child processes (RSS)", f"{d.kids} ({mb(d.kids_rss)})", "0")
    table.add(
        f"daemon start -> {ENVIRONMENTS * SERVICES} startup deployments done", f"{ready:.2f} s"
    )
    if fleet_envs:
        f = probes["fleet"]
        table.add(
            f"CPU s/min, idle, with children ({fleet_envs:,} x {fleet_services})",
            f"{tree['fleet']:.3f} s",
            f"{tree['daemon']:.3f} s at {ENVIRONMENTS} x {SERVICES}",
            ratio(tree["fleet"], tree["daemon"]),
            "< 0.1 s",
            tree["fleet"] < TARGET_CPU,
        )
        table.add("  the daemon process alone (utime+stime)", f"{cpu['fleet']:.3f} s")
        table.add(
            "  wake-ups/min (context switches)",
            f"{cs['fleet']:,.0f}",
            f"{cs['daemon']:,.0f} at {ENVIRONMENTS} x {SERVICES}",
        )
        table.add("  VmRSS / VmHWM", f"{mb(f.rss)} / {mb(f.hwm)}", mb(d.rss))
        table.add("  child processes (RSS)", f"{f.kids} ({mb(f.kids_rss)})")
        table.add("  daemon start -> first sync planned and quiet", f"{fleet_ready:.2f} s")
    table.note(
        'reconciler: `reconciler run`, watch = true, poll_interval = "30s", '
        f"{ENVIRONMENTS} environments x {SERVICES} services, deploy command /bin/true"
        + (', HTTP server off (listen = "").' if args.no_http else ".")
    )
    table.note("ratio column for CPU and wake-ups: the difference daemon - idle interpreter.")
    table.note(
        f"CPU is counted in clock ticks of 10 ms: one tick in the window is {0.01 * per_min:.2f} s/min."
    )
    warnings = [
        ln for ln in daemon_log.splitlines() if "level=WARNING" in ln or "level=ERROR" in ln
    ]
    if warnings:
        table.note(f"daemon log had {len(warnings)} warning/error lines, e.g. {warnings[0][:120]}")
    table.print()
    return 1 if any(row.met is False for row in table.rows) else 0


def quiet(pid: int, span: float = 1.0) -> bool:
    """The process tree used under 2 % of a core over ``span`` seconds."""
    before = tree_cpu(pid)
    time.sleep(span)
    return tree_cpu(pid) - before < 0.02 * span


def count_deployments(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        return int(conn.execute("SELECT count(*) FROM deployments").fetchone()[0])


if __name__ == "__main__":
    sys.exit(main())
