"""The executor and the command provider in-process: real commands, real SQLite.

Each test names the defect it guards (issue 6): output of any size and shape, a leader
that exits while a child holds its pipes, a database outage at the very end of a run,
a provider's own TimeoutError, and what a command's environment may hold.
"""

from __future__ import annotations

import asyncio
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

import reconciler.executor as executor_module
from reconciler.engine import Engine
from reconciler.providers import (
    Check,
    CommandProvider,
    DeployContext,
    DeployRequest,
    Provider,
    Validation,
)
from reconciler.store import TERMINAL_STATUSES, DeploymentRecord, StatusStep, Store
from tests.support import World, alive, run_engine

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def script(world: World, text: str) -> None:
    """Replace the world's deploy command (same path, same provider settings)."""
    path = world.tmp / "deploy.sh"
    path.write_text(text)
    path.chmod(0o755)


def engine_run(
    world: World,
    body: Callable[[Engine], Awaitable[Any]],
    *,
    store_class: type[Store] = Store,
    providers: Callable[[dict[str, Provider]], dict[str, Provider]] = lambda p: p,
) -> Any:
    return run_engine(world.config, body, store_class=store_class, providers=providers)


async def deploy_once(engine: Engine) -> DeploymentRecord:
    await engine.sync("startup")
    await engine.idle()
    [first] = engine.store.history()
    rec = engine.store.get_deployment(first.id, with_progress=True, with_log=True)
    assert rec is not None
    return rec


# ---- output: chunks, cut lines, the cap ---------------------------------------------------


def test_line_splitter_cuts_long_lines_and_keeps_the_next_one():
    from reconciler.providers.command import LineSplitter

    s = LineSplitter(8)
    out = s.feed(b"short\n" + b"x" * 20) + s.feed(b"y" * 5 + b"\nnext\nhalf") + s.end()
    assert out == [(b"short", 0), (b"x" * 8, 17), (b"next", 0), (b"half", 0)]


def test_a_line_over_64k_is_cut_at_16k_and_the_progress_after_it_is_kept(world: World):
    # The secret straddles the 16 KiB cut: it is redacted before the line is cut.
    script(
        world,
        f"""#!{sys.executable}
import os
print("x" * (16 * 1024 - 3) + os.environ["SECRET_TOKEN"] + "y" * 100_000)
print('{{"progress": 60, "message": "after the long line"}}')
print("z" * 70_000)
print("the end")
""",
    )
    world.repo.set_env("staging", {"api": "1.0"})
    rec = engine_run(world, deploy_once)
    assert rec.status == "completed", rec.error_message
    assert [p.message for p in rec.progress if p.percent == 60] == ["after the long line"]
    lines = [entry.line for entry in rec.log]
    first, _progress, third, last = lines
    assert first.startswith("x" * (16 * 1024 - 3) + "***")
    assert "hunt" not in first and re.search(r" … \[[\d,]+ bytes cut\]$", first)
    assert len(first.encode()) < 16 * 1024 + 64
    assert third == "z" * (16 * 1024) + f" … [{70_000 - 16 * 1024:,} bytes cut]"
    assert last == "the end"


FLOOD = 100_000


def test_a_flood_of_output_keeps_head_and_tail_within_the_cap_and_every_progress_event(
    tmp_path: Path,
):
    world = World(tmp_path, log_cap="64KiB")
    script(
        world,
        f"""#!{sys.executable}
import sys
w = sys.stdout.write
for i in range({FLOOD}):
    w(f"line {{i}}\\n")
    if i == {FLOOD // 2}:
        w('{{"progress": 50, "message": "half way"}}\\n')
w('{{"progress": 100, "message": "done"}}\\n')
""",
    )
    world.repo.set_env("staging", {"api": "1.0"})
    rec = engine_run(world, deploy_once)
    assert rec.status == "completed", rec.error_message
    assert [p.message for p in rec.progress if p.status == "in_progress"][-2:] == [
        "half way",
        "done",
    ]
    lines = [entry.line for entry in rec.log]
    stored = sum(len(line.encode()) + 1 for line in lines)
    assert stored <= 64 * 1024 + 100
    [marker] = [entry for entry in rec.log if entry.stream == "system"]
    m = re.fullmatch(r"… ([\d,]+) lines \((\d+\.\d) [kM]B\) dropped …", marker.line)
    assert m, marker.line
    dropped = int(m.group(1).replace(",", ""))
    at = lines.index(marker.line)
    head, tail = lines[:at], lines[at + 1 :]
    # Nothing lost in between: the head and the tail join up through the count.
    assert head[0] == "line 0" and tail[-1] == '{"progress": 100, "message": "done"}'
    assert head == [f"line {i}" for i in range(len(head))]
    assert tail[:-1] == [f"line {i}" for i in range(FLOOD - len(tail) + 1, FLOOD)]
    assert len(head) + dropped + len(tail) == FLOOD + 2  # both progress lines included
    # The cap is used, not just respected: these short lines count 32 bytes each (a row).
    assert len(lines) >= 64 * 1024 // 32 - 2


# ---- the end of a run -------------------------------------------------------------------


def test_exit_0_while_a_background_child_holds_stdout_completes_and_ends_the_child(
    world: World,
):
    script(
        world,
        """#!/usr/bin/env bash
sleep 300 &
echo "$$ $!" > "$DEPLOY_PIDS"
echo "leaving a child behind"
exit 0
""",
    )
    world.repo.set_env("staging", {"api": "1.0"}, timeout="20")
    rec = engine_run(world, deploy_once)
    assert rec.status == "completed", rec.error_message
    assert rec.duration_seconds is not None and rec.duration_seconds < 10
    assert [entry.line for entry in rec.log] == ["leaving a child behind"]
    assert not any(alive(int(p)) for p in world.pids.read_text().split())


class _TimingOutProvider(CommandProvider):
    async def deploy(self, ctx: DeployContext) -> None:
        raise TimeoutError("the platform's API did not answer")


def test_a_providers_own_timeout_error_is_a_failure_not_the_deadline(world: World):
    world.repo.set_env("staging", {"api": "1.0"})
    rec = engine_run(
        world,
        deploy_once,
        providers=lambda p: {
            "local": _TimingOutProvider("local", p["local"].config, p["local"].base_dir)
        },
    )
    assert rec.status == "failed"
    assert rec.error_message == "provider error: TimeoutError: the platform's API did not answer"


class _EchoingValidation(CommandProvider):
    """A platform that quotes the credential back in its refusal."""

    async def validate(self, request: DeployRequest) -> Validation:
        return Validation((Check("credentials", False, "token hunter2-secret rejected"),))


def test_validation_messages_are_redacted_like_everything_else(world: World):
    world.repo.set_env("staging", {"api": "1.0"})
    rec = engine_run(
        world,
        deploy_once,
        providers=lambda p: {
            "local": _EchoingValidation("local", p["local"].config, p["local"].base_dir)
        },
    )
    assert rec.status == "failed"
    assert rec.validation == {
        "ok": False,
        "checks": [{"name": "credentials", "ok": False, "message": "token *** rejected"}],
    }
    assert "hunter2" not in (rec.error_message or "")


class _AwayAtTheEnd(Store):
    """A database that refuses terminal status writes until told it is back."""

    back = threading.Event()
    refused = threading.Event()
    refused_late = threading.Event()  # refused again LATE seconds after the first time
    first: float | None = None
    LATE = 0.3

    def set_statuses(
        self, deployment_id: int, steps: Sequence[StatusStep], **kwargs: Any
    ) -> DeploymentRecord:
        if steps[-1].status in TERMINAL_STATUSES and not self.back.is_set():
            now = time.monotonic()
            cls = type(self)
            if cls.first is None:
                cls.first = now
            elif now - cls.first > cls.LATE:
                cls.refused_late.set()
            self.refused.set()
            raise OperationalError(
                "UPDATE deployments", {}, ConnectionResetError("server closed the connection")
            )
        return super().set_statuses(deployment_id, steps, **kwargs)


@pytest.fixture
def away() -> type[_AwayAtTheEnd]:
    _AwayAtTheEnd.back.clear()
    _AwayAtTheEnd.refused.clear()
    _AwayAtTheEnd.refused_late.clear()
    _AwayAtTheEnd.first = None
    return _AwayAtTheEnd


def test_a_stop_during_the_final_write_still_records_the_outcome(world: World, away, monkeypatch):
    monkeypatch.setattr(executor_module, "STORE_RETRY_WAIT", 0.01, raising=False)
    monkeypatch.setattr(executor_module, "STORE_RETRY_WAIT_MAX", 0.02, raising=False)
    world.repo.set_env("staging", {"api": "1.0"})

    async def body(engine: Engine) -> DeploymentRecord | None:
        await engine.sync("startup")
        await asyncio.to_thread(away.refused.wait)
        # The grace runs out while "completed" is being retried: the runner is cancelled.
        stop = asyncio.create_task(engine.stop(0.05))
        done, _ = await asyncio.wait([stop], timeout=0.5)
        assert not done  # the finish step holds the stop until the record is written
        away.back.set()
        await stop
        return engine.store.get_deployment(1)

    rec = engine_run(world, body, store_class=away)
    assert rec is not None and rec.status == "completed"


def test_the_final_write_outlasts_the_store_retry_limit(world: World, away, monkeypatch):
    monkeypatch.setattr(executor_module, "STORE_RETRY_SECONDS", away.LATE / 3)
    monkeypatch.setattr(executor_module, "STORE_RETRY_WAIT", 0.01, raising=False)
    monkeypatch.setattr(executor_module, "STORE_RETRY_WAIT_MAX", 0.02, raising=False)
    world.repo.set_env("staging", {"api": "1.0"})

    async def body(engine: Engine) -> DeploymentRecord | None:
        await engine.sync("startup")
        # Still retried well past STORE_RETRY_SECONDS, after which durable() gives up.
        await asyncio.to_thread(away.refused_late.wait)
        # Unfinished: `in_progress`, or `validating` when it waits to go with the end.
        rec = engine.store.get_deployment(1)
        assert rec is not None and rec.status in ("validating", "in_progress")
        away.back.set()
        await engine.idle()
        return engine.store.get_deployment(1)

    rec = engine_run(world, body, store_class=away)
    assert rec is not None and rec.status == "completed"


# ---- the command's environment -------------------------------------------------------------


def test_a_command_gets_a_built_environment_not_the_daemons(world: World, monkeypatch):
    monkeypatch.setenv("RECONCILER_DATABASE__URL", "postgresql://app:pw-canary-1@db/app")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "canary-2")
    monkeypatch.setenv("LC_TIME", "C.UTF-8")
    monkeypatch.setenv("TZ", "UTC")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/reconciler.service")
    monkeypatch.setenv("DEPLOY_API_KEY", "from-the-daemon-env")
    # What a command should get of the daemon's environment, it is given by name.
    world.config.write_text(
        world.config.read_text().replace(
            'SECRET_TOKEN = "hunter2-secret"',
            'SECRET_TOKEN = "hunter2-secret", CREDS_FILE = "${CREDENTIALS_DIRECTORY}/t", '
            'KEPT = "${UNSET_VARIABLE}", API_KEY = "${DEPLOY_API_KEY}"',
        )
    )
    script(world, "#!/usr/bin/env bash\nenv\n")
    world.repo.set_env("staging", {"api": "1.0"})
    rec = engine_run(world, deploy_once)
    assert rec.status == "completed", rec.error_message
    env = dict(entry.line.split("=", 1) for entry in rec.log if "=" in entry.line)
    assert "canary" not in "\n".join(entry.line for entry in rec.log)
    assert env["LC_TIME"] == "C.UTF-8" and env["TZ"] == "UTC" and env["PATH"]
    assert env["RECONCILER_SERVICE"] == "api" and env["DEPLOY_LOG"] == str(world.log)
    assert env["SECRET_TOKEN"] == "***"  # the provider's own env, redacted in the log
    assert env["API_KEY"] == "***"  # redacted as expanded
    assert "from-the-daemon-env" not in "\n".join(entry.line for entry in rec.log)
    assert env["CREDS_FILE"] == "/run/credentials/reconciler.service/t"
    assert env["KEPT"] == "${UNSET_VARIABLE}" and "CREDENTIALS_DIRECTORY" not in env
    allowed = {"PATH", "HOME", "LANG", "TZ", "DEPLOY_LOG", "DEPLOY_PIDS", "DEPLOY_GATE"}
    allowed |= {"CREDS_FILE", "KEPT", "API_KEY"}
    extra = {
        k
        for k in env
        if k not in allowed
        and not k.startswith(("LC_", "RECONCILER_"))
        and k not in ("SECRET_TOKEN", "PWD", "SHLVL", "_", "OLDPWD")
    }
    assert not extra
    assert not [k for k in env if k.startswith("RECONCILER_") and "__" in k]


def test_dropped_sizes_read_like_the_spec():
    from reconciler.executor import _size

    assert [_size(n) for n in (512, 1000, 9_800_000, 999_960)] == [
        "512 B",
        "1.0 kB",
        "9.8 MB",
        "1.0 MB",
    ]


def test_a_flood_of_empty_lines_is_bounded_by_rows_too(tmp_path: Path):
    world = World(tmp_path, log_cap="64KiB")
    script(world, f"#!{sys.executable}\nimport sys\nsys.stdout.write('\\n' * 500_000)\n")
    world.repo.set_env("staging", {"api": "1.0"})
    rec = engine_run(world, deploy_once)
    assert rec.status == "completed", rec.error_message
    assert len(rec.log) <= 64 * 1024 // 32 + 1
    assert rec.log[-1].line == ""
    [marker] = [e.line for e in rec.log if e.stream == "system"]
    dropped = 500_000 - len(rec.log) + 1
    assert marker == f"… {dropped:,} lines ({dropped / 1000:.1f} kB) dropped …"
