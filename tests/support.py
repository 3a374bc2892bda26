"""Test building blocks: real git repositories, a real deploy script, a real configuration."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RECONCILER = [sys.executable, "-m", "reconciler"]

# The deploy script every test uses. It appends "start env service version" and
# "end ..." lines to $DEPLOY_LOG, prints SPEC §6 progress, and behaves by version suffix:
#   *-fail   exits 3 after a line on stderr
#   *-hang   sleeps (with a child, in the same process group) until killed; writes its pids
#   *-gate   blocks until a line can be read from the FIFO $DEPLOY_GATE
#   *-trap   ignores SIGTERM (the deadline must SIGKILL it)
DEPLOY_SCRIPT = r"""#!/usr/bin/env bash
set -u
env="$1"; service="$2"; version="$3"
echo "start $env $service $version ${RECONCILER_PREVIOUS_VERSION:-} ${RECONCILER_COMMIT:-}" >> "$DEPLOY_LOG"
echo '{"progress": 10, "message": "preparing", "step": "prepare"}'
echo "token is $SECRET_TOKEN"
case "$version" in
  *-fail) echo "token $SECRET_TOKEN rejected" >&2; echo "health check failed" >&2; echo "end $env $service $version fail" >> "$DEPLOY_LOG"; exit 3 ;;
  *-hang) sleep 300 & echo "$$ $!" > "$DEPLOY_PIDS"; wait ;;
  *-trap) trap '' TERM; sleep 300 & echo "$$ $!" > "$DEPLOY_PIDS"; wait; wait ;;
  *-gate) until read -r _ < "$DEPLOY_GATE"; do :; done ;;  # a line, not the last writer's EOF
esac
echo '{"progress": 100, "message": "done"}'
echo "end $env $service $version ok" >> "$DEPLOY_LOG"
"""


# SPEC §2's example file, verbatim: the format tests check every value of it.
SPEC_EXAMPLE = """\
environment: production          # required; ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$; unique in the repo
provider: k8s-prod               # required; a provider name from the daemon configuration
services:                        # required; at least one; deployed in the order written
  api:
    version: "1.4.2"             # required; ^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$
    params:                      # optional; provider-specific, checked by the provider
      deployment: api
  worker:
    version: 1.10                # read as the text "1.10": a version is never a number
timeout: 30m                     # optional; seconds (int) or 90s / 30m / 2h; default 1800 s
strategy:                        # optional; default {type: rolling}
  type: canary                   # rolling | blue_green | canary; provider may refuse
  steps: [10, 50, 100]           # strategy parameters, checked by the provider
on_failure: rollback             # optional; stop (default) | rollback
depends_on: [staging]            # optional; a version reaches this environment only after
                                 # the same version of the same service completed in each
                                 # listed environment
windows:                         # optional; deployments start only inside a window
  - cron: "0 9 * * mon-fri"      #   a window opens at each cron time (daemon's timezone
    duration: 8h                 #   unless `timezone:` is given) and stays open `duration`
suspended: false                 # optional; true: record drift, deploy nothing
"""


def git(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "Ada",
        "GIT_AUTHOR_EMAIL": "ada@example.com",
        "GIT_COMMITTER_NAME": "Ada",
        "GIT_COMMITTER_EMAIL": "ada@example.com",
    }
    out = subprocess.run(
        ["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


def env_yaml(name: str, services: dict[str, str], **extra: Any) -> str:
    lines = [f"environment: {name}", "provider: local", "services:"]
    for svc, version in services.items():
        lines += [f"  {svc}:", f'    version: "{version}"']
    for key, value in extra.items():
        lines.append(f"{key}: {value}")
    return "\n".join(lines) + "\n"


class Repo:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True)
        git(path, "init", "-q", "--initial-branch=main")

    def write(self, name: str, text: str) -> None:
        p = self.path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    def commit(self, message: str = "change") -> str:
        git(self.path, "add", "-A")
        git(self.path, "commit", "-q", "--allow-empty", "-m", message)
        return git(self.path, "rev-parse", "HEAD")

    def set_env(
        self, name: str, services: dict[str, str], message: str | None = None, **extra: Any
    ) -> str:
        self.write(f"{name}.yaml", env_yaml(name, services, **extra))
        return self.commit(message or f"{name}: {services}")


class World:
    """A repository, a deploy script and a configuration in one temporary folder."""

    def __init__(self, tmp: Path, **daemon: Any) -> None:
        self.tmp = tmp
        self.repo = Repo(tmp / "desired")
        self.log = tmp / "deploy.log"
        self.log.touch()
        self.pids = tmp / "deploy.pids"
        self.gate = tmp / "gate.fifo"
        os.mkfifo(self.gate)
        script = tmp / "deploy.sh"
        script.write_text(DEPLOY_SCRIPT)
        script.chmod(0o755)
        self.config = tmp / "reconciler.toml"
        settings = {
            "timezone": '"UTC"',
            "retries": 3,
            "retry_backoff": '"1s"',
            "shutdown_grace": '"10s"',
            "kill_grace": '"1s"',
            "max_parallel": 4,
        }
        settings.update({k: (f'"{v}"' if isinstance(v, str) else v) for k, v in daemon.items()})
        daemon_toml = "\n".join(f"{k} = {v}" for k, v in settings.items())
        self.config.write_text(f"""
[repository]
url = "desired"
branch = "main"
poll_interval = "0"
watch = true

[daemon]
state_dir = "state"
{daemon_toml}

[server]
listen = ""

[providers.local]
type = "command"
command = ["{script}", "{{environment}}", "{{service}}", "{{version}}"]
env = {{ DEPLOY_LOG = "{self.log}", DEPLOY_PIDS = "{self.pids}", DEPLOY_GATE = "{self.gate}", SECRET_TOKEN = "hunter2-secret" }}
""")

    def runs(self) -> list[tuple[str, ...]]:
        return [tuple(line.split()) for line in self.log.read_text().splitlines()]

    def started(self) -> list[tuple[str, str, str]]:
        return [(r[1], r[2], r[3]) for r in self.runs() if r[0] == "start"]

    def open_gate(self) -> None:
        with self.gate.open("w") as f:
            f.write("go\n")

    def cli(
        self, *args: str, check: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [*RECONCILER, "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.tmp,
            env=cli_env(),
        )
        if check and out.returncode != 0:
            raise AssertionError(
                f"reconciler {' '.join(args)} exited {out.returncode}: {out.stderr}"
            )
        return out


class DaemonProcess:
    """`reconciler run` as a real process started in ``tmp``, its stderr in a file there."""

    def __init__(self, tmp: Path, config: Path, name: str | None = None) -> None:
        self.stderr = tmp / f"{name or f'daemon-{time.monotonic_ns()}'}.log"
        self.proc = subprocess.Popen(
            [*RECONCILER, "--config", str(config), "run"],
            cwd=tmp,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=self.stderr.open("w"),
        )

    def log(self) -> str:
        return self.stderr.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll a condition that another process makes true (a file, a database row)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def run_engine(
    config_path: Path,
    body: Callable[[Any], Awaitable[Any]],
    *,
    providers: Callable[[dict[str, Any]], dict[str, Any]] = lambda p: p,
    store_class: type | None = None,
    **engine_options: Any,
) -> Any:
    """Run ``body(engine)`` on a real Engine (real store, real mirror, the configured
    providers) in a fresh event loop, and stop and close everything afterwards."""
    import asyncio

    from reconciler.config import load_config
    from reconciler.engine import Engine, open_source
    from reconciler.providers import build_providers
    from reconciler.store import Store

    async def main() -> Any:
        config = load_config(config_path, environ={})
        store = (store_class or Store).from_url(config.database_url, migrate=True)
        source = open_source(config)
        engine = Engine(config, store, source, providers(build_providers(config)), **engine_options)
        try:
            return await body(engine)
        finally:
            await engine.stop(1.0)
            source.close()
            store.engine.dispose()

    return asyncio.run(main())
