"""The idle daemon: CPU seconds per minute, wake-ups and memory while nothing happens.

Starts ``reconciler --config X run`` (a real subprocess) on a small local repository (5
environments x 3 services; watch = true, poll_interval = "30s"), waits until its startup
deployments are recorded, lets it settle (3 s), then samples /proc/<pid>/stat (utime +
stime, all threads) and the context switches of every thread over the window (15 s by
default, 60 s with --full), scaled to one minute, and reads VmRSS and VmHWM from
/proc/<pid>/status (the daemon alone; its children, e.g. GitPython's ``git cat-file``
helpers, are listed on their own row). Each daemon serves its HTTP API on a free port of its
own (the default 127.0.0.1:8080 would let only one of them start); ``--no-http`` turns it
off in both, to tell the server's share.

Baselines, measured at the same time and the same way:
* ``python -c "import time; time.sleep(1e9)"`` (an idle interpreter);
* the same daemon with watch = false (on the same repository, its own state directory),
  to tell the file watcher's share (a row of its own: watch = true minus watch = false);
* ``python -c "import reconciler.cli, time; time.sleep(1e9)"`` (the cost of the imports).

    .venv/bin/python bench/bench_idle.py            # 15 s window (~30 s)
    .venv/bin/python bench/bench_idle.py --full     # 60 s window (~75 s)
    .venv/bin/python bench/bench_idle.py --no-http  # both daemons without the HTTP server
"""

from __future__ import annotations

import argparse
import socket
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

from _common import (
    PYTHON,
    RECONCILER,
    ROOT,
    Table,
    children,
    cli_env,
    commit_all,
    context_switches,
    cpu_seconds,
    env_yaml,
    machine,
    make_repo,
    mb,
    memory,
    ratio,
    say,
    stop_process,
    threads,
    wait_for,
    write_config,
)

ENVIRONMENTS, SERVICES = 5, 3
SETTLE = 3.0
TARGET_CPU = 0.1  # "about zero": under 0.1 CPU second per minute (0.17 % of a core)
TARGET_RSS = 80 * 2**20


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

    def start(self) -> None:
        self.cpu0, self.cs0 = cpu_seconds(self.proc.pid), context_switches(self.proc.pid)

    def stop(self) -> None:
        self.cpu1, self.cs1 = cpu_seconds(self.proc.pid), context_switches(self.proc.pid)
        self.rss, self.hwm = memory(self.proc.pid)
        self.threads = threads(self.proc.pid)
        kids = children(self.proc.pid)
        self.kids = len(kids)
        self.kids_rss = sum(memory(k)[0] for k in kids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="60 s window")
    parser.add_argument("--seconds", type=float, help="window (default 15, --full 60)")
    parser.add_argument(
        "--no-http", action="store_true", help='both daemons with the HTTP server off (listen = "")'
    )
    args = parser.parse_args()
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
        # Both daemons serve HTTP (idle, part of the daemon): each on its own free port.
        for cfg in (config, config2):
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

    per_min = 60.0 / window
    d, s, i = probes["daemon"], probes["sleep"], probes["imports"]
    cpu = {k: (p.cpu1 - p.cpu0) * per_min for k, p in probes.items()}
    cs = {k: (p.cs1 - p.cs0) * per_min for k, p in probes.items()}
    table = Table(f"idle daemon, {window:g} s window after settling ({machine()})")
    table.add(
        "CPU s/min, idle (utime+stime)",
        f"{cpu['daemon']:.3f} s",
        f"{cpu['sleep']:.3f} s",
        f"+{cpu['daemon'] - cpu['sleep']:.3f} s",
        "~0 (< 0.1 s)",
        cpu["daemon"] < TARGET_CPU,
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
    table.add("daemon start -> 15 startup deployments done", f"{ready:.2f} s")
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


if __name__ == "__main__":
    main()
