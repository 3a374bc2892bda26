"""Shared helpers of the benchmarks (not a test module, not part of the package).

Real git repositories, a real daemon configuration with a `command` provider (the format
of tests/support.py), process probes from /proc, and the result table every benchmark
prints: ``metric | reconciler | baseline | ratio | target``.
"""

from __future__ import annotations

import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PYTHON = sys.executable
RECONCILER = [PYTHON, "-m", "reconciler"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------- figures


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100), linear interpolation between closest ranks."""
    data = sorted(values)
    if not data:
        return float("nan")
    if len(data) == 1:
        return data[0]
    k = (len(data) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def timed(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> tuple[list[float], Any]:
    """Run ``fn`` ``warmup`` + ``repeat`` times; the ``repeat`` durations (s) and last result."""
    result: Any = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return times, result


def cpu_now() -> float:
    """CPU seconds of this process (all threads) and of its waited-for children (git)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def ms(seconds: float | None, digits: int = 1) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:,.{digits}f} ms"


def sec(seconds: float | None, digits: int = 2) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:,.{digits}f} s"


def mb(nbytes: float | None) -> str:
    if nbytes is None:
        return "-"
    return f"{nbytes / 2**20:,.1f} MB"


@dataclass
class Row:
    metric: str
    reconciler: str
    baseline: str = "-"
    ratio: str = "-"
    target: str = "-"
    met: bool | None = None


class Table:
    """The result table: ``metric | reconciler | baseline | ratio | target``."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.rows: list[Row] = []
        self.notes: list[str] = []

    def add(
        self,
        metric: str,
        reconciler: str,
        baseline: str = "-",
        ratio: float | str | None = None,
        target: str = "-",
        met: bool | None = None,
    ) -> None:
        if isinstance(ratio, float):
            ratio_text = f"{ratio:,.2f}x" if ratio == ratio else "-"  # NaN -> "-"
        else:
            ratio_text = ratio or "-"
        self.rows.append(Row(metric, reconciler, baseline, ratio_text, target, met))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def render(self) -> str:
        header = ("metric", "reconciler", "baseline", "ratio", "target")
        cells = [
            (
                r.metric,
                r.reconciler,
                r.baseline,
                r.ratio,
                r.target + ("" if r.met is None else (" (met)" if r.met else " (MISSED)")),
            )
            for r in self.rows
        ]
        widths = [
            max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
            for i, h in enumerate(header)
        ]

        def line(values: Sequence[str]) -> str:
            parts = []
            for i, v in enumerate(values):
                parts.append(v.ljust(widths[i]) if i == 0 else v.rjust(widths[i]))
            return "| " + " | ".join(parts) + " |"

        out = [self.title, line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line(c) for c in cells]
        out += [f"  {n}" for n in self.notes]
        return "\n".join(out)

    def print(self) -> None:
        print()
        print(self.render(), flush=True)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def machine() -> str:
    load = os.getloadavg()
    return (
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- git


def git_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        GIT_AUTHOR_NAME="Bench",
        GIT_AUTHOR_EMAIL="bench@example.com",
        GIT_COMMITTER_NAME="Bench",
        GIT_COMMITTER_EMAIL="bench@example.com",
    )
    return env


_GIT_ENV = git_env()


def git(cwd: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", *args], cwd=cwd, env=_GIT_ENV, check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


def env_name(i: int) -> str:
    return f"env{i:04d}"


def service_name(j: int) -> str:
    return f"svc{j:02d}"


def env_yaml(
    name: str,
    services: Iterable[tuple[str, str]],
    *,
    provider: str = "local",
    depends_on: Sequence[str] = (),
    extra: bool = True,
) -> str:
    """An environment file like a real one: versions, params, a timeout, a strategy."""
    lines = [f"environment: {name}", f"provider: {provider}", "services:"]
    for svc, version in services:
        lines += [f"  {svc}:", f'    version: "{version}"']
        if extra:
            lines += ["    params:", f"      deployment: {svc}", "      replicas: 3"]
    if extra:
        lines += ["timeout: 30m", "strategy:", "  type: rolling", "on_failure: stop"]
    if depends_on:
        lines.append(f"depends_on: [{', '.join(depends_on)}]")
    return "\n".join(lines) + "\n"


def fleet_file(i: int, services: int, version: str = "1.49.0", depends: bool = True) -> str:
    """Environment ``i`` of a fleet: odd environments depend on the even one before them
    (staging -> production pairs), so `depends_on` checks have work to do."""
    deps = [env_name(i - 1)] if depends and i % 2 == 1 else []
    return env_yaml(
        env_name(i), ((service_name(j), version) for j in range(services)), depends_on=deps
    )


def make_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "-q", "--initial-branch=main")
    git(path, "config", "gc.auto", "0")
    return path


def commit_all(path: Path, message: str = "change") -> str:
    git(path, "add", "-A")
    git(path, "commit", "-q", "--allow-empty", "-m", message)
    return git(path, "rev-parse", "HEAD")


def write_config(
    tmp: Path,
    command: Sequence[str],
    *,
    repo: str = "desired",
    poll_interval: str = "0",
    watch: bool = True,
    env: dict[str, str] | None = None,
    database_url: str | None = None,
    **daemon: Any,
) -> Path:
    """A reconciler.toml in ``tmp`` with one `command` provider named ``local``."""
    settings: dict[str, Any] = {
        "timezone": "UTC",
        "retries": 3,
        "retry_backoff": "1s",
        "shutdown_grace": "10s",
        "kill_grace": "1s",
        "max_parallel": 4,
        **daemon,
    }
    daemon_toml = "\n".join(
        f"{k} = " + (f'"{v}"' if isinstance(v, str) else str(v)) for k, v in settings.items()
    )
    cmd = ", ".join(f'"{c}"' for c in command)
    env_toml = ", ".join(f'{k} = "{v}"' for k, v in (env or {}).items())
    database = f'\n[database]\nurl = "{database_url}"\n' if database_url else ""
    config = tmp / "reconciler.toml"
    config.write_text(
        f"""
[repository]
url = "{repo}"
branch = "main"
poll_interval = "{poll_interval}"
watch = {"true" if watch else "false"}
{database}
[daemon]
state_dir = "state"
{daemon_toml}

[providers.local]
type = "command"
command = [{cmd}]
env = {{ {env_toml} }}
"""
    )
    return config


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


# ---------------------------------------------------------------------------- processes


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    # fields[0] is state (field 3); utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes."""
    st = proc_status(pid)
    return int(st["VmRSS"].split()[0]) * 1024, int(st["VmHWM"].split()[0]) * 1024


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches summed over every thread (= wake-ups)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            st = proc_status_path(task / "status")
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(st.get("voluntary_ctxt_switches", 0)) + int(
            st.get("nonvoluntary_ctxt_switches", 0)
        )
    return total


def proc_status_path(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (all threads)."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "children").read_text()
        except FileNotFoundError:
            continue
        kids += [int(x) for x in text.split()]
    return kids


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (the OS picks it), for a daemon to listen on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DaemonDied(RuntimeError):
    """The daemon a benchmark started exited; the message ends with its log's last lines."""


def check_alive(proc: subprocess.Popen[Any], log: Path, lines: int = 15) -> None:
    """Raise DaemonDied (with the tail of ``log``) if ``proc`` has exited."""
    if proc.poll() is None:
        return
    tail = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else []
    text = "\n".join(f"    {line}" for line in tail) or "    (empty log)"
    raise DaemonDied(f"the daemon exited with status {proc.returncode}; its log ends:\n{text}")


def exit_status(*tables: Table) -> int:
    """1 when any printed target was missed, else 0 (what every benchmark exits with)."""
    return 1 if any(r.met is False for t in tables for r in t.rows) else 0


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15.0) -> int | None:
    """SIGTERM, wait, SIGKILL if needed (only the process this benchmark started)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)
