"""Process groups of runs: how they end, and how a restarted daemon recognises its own.

A run's command leads a process group of its own (``start_new_session``). The daemon
records the group id with the leader's start token (boot id + start time in clock ticks,
from ``/proc``), so that after a crash recovery can end a group that outlived it without
ever signalling an unrelated process that happens to reuse the number. Linux does not
hand out a pid while a process group of that number exists, so a group member that
started no earlier than the recorded leader is one of ours.

The group is recorded a few milliseconds after the spawn: a daemon killed in between
leaves a run nobody recorded. So every run's environment also carries a marker, the
deployment id and the identity of the database's ledger (`MARKER_DEPLOYMENT`,
`MARKER_LEDGER`), and recovery finds the processes of an unfinished deployment by it
(`marked_groups`, Linux: ``/proc/<pid>/environ``), recorded group or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Collection
from functools import cache
from pathlib import Path
from typing import Any

PROC = Path("/proc")
#: The variables that mark a run's processes (SPEC §6): which deployment, of which database
#: (deployment ids repeat across databases; a ledger's genesis hash does not).
MARKER_DEPLOYMENT = "RECONCILER_DEPLOYMENT_ID"
MARKER_LEDGER = "RECONCILER_LEDGER_ID"
# How often a group that is not our child is looked at while it ends (no wait() for it).
GONE_POLL_SECONDS = 0.02
# How long a SIGKILLed group may take to vanish before recovery goes on without waiting.
KILLED_GONE_SECONDS = 5.0


class _PidfdWatcher(asyncio.AbstractChildWatcher):
    """Python 3.12's pidfd child watcher on 3.11: each child's pidfd is watched by the loop
    running when it was spawned (3.11's own `asyncio.PidfdChildWatcher` is bound to one
    loop, which a process running one loop per command or per test cannot keep)."""

    def add_child_handler(self, pid: int, callback: Any, *args: Any) -> None:  # type: ignore[override]
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(pid)
        loop._add_reader(pidfd, self._reap, loop, pid, pidfd, callback, args)  # type: ignore[attr-defined]

    @staticmethod
    def _reap(
        loop: asyncio.AbstractEventLoop, pid: int, pidfd: int, callback: Any, args: Any
    ) -> None:
        loop._remove_reader(pidfd)  # type: ignore[attr-defined]
        try:
            _, status = os.waitpid(pid, 0)
            returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # reaped elsewhere: what asyncio reports then
            returncode = 255
        finally:
            os.close(pidfd)
        callback(pid, returncode, *args)

    def remove_child_handler(self, pid: int) -> bool:
        return True

    def attach_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        pass

    def close(self) -> None:
        pass

    def is_active(self) -> bool:
        return True

    def __enter__(self) -> _PidfdWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@cache  # once per process: the watcher is the event loop policy's, for every loop
def use_pidfd_child_watcher() -> bool:
    """On Python 3.11 under Linux >= 5.3, wait for child processes with a pidfd in the
    event loop instead of asyncio's default, a thread started per child (~10 % of the
    daemon's CPU per no-op deployment, issue 12). Python 3.12 does this itself. Whether a
    pidfd can be opened is tried first (a seccomp filter may refuse it): else the default
    stays. True when children are waited for with pidfds."""
    if not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    if sys.version_info < (3, 12):
        asyncio.set_child_watcher(_PidfdWatcher())
    return True


@cache  # fixed until the next boot; read for every run's process group
def _boot_id() -> str | None:
    try:
        return (PROC / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time in ticks since boot) of a process, None if gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name may hold spaces and ')'
    return fields[0], int(fields[2]), int(fields[19])


def start_token(pid: int) -> str | None:
    """``<boot id>:<start ticks>`` of a live process; None where /proc cannot tell."""
    boot, st = _boot_id(), _stat(pid)
    if boot is None or st is None:
        return None
    return f"{boot}:{st[2]}"


def process_gone(pid: int) -> bool:
    """/proc says the process no longer exists (False where /proc cannot tell)."""
    return _boot_id() is not None and _stat(pid) is None


def group_members(pgid: int, token: str) -> list[int]:
    """Live (not zombie) processes of the group whose leader started as ``token`` says."""
    boot, _, ticks = token.partition(":")
    if boot != _boot_id() or not ticks.isdigit():
        return []  # another boot: nothing of that run survives
    started = int(ticks)
    leader = _stat(pgid)
    if leader is not None and leader[2] != started:
        return []  # the number was reused, so the recorded group ended long ago
    members = []
    for entry in os.scandir(PROC):
        if not entry.name.isdigit():
            continue
        st = _stat(int(entry.name))
        if st is not None and st[1] == pgid and st[2] >= started and st[0] != "Z":
            members.append(int(entry.name))
    return members


def marked_groups(ledger: str, deployment_ids: Collection[int]) -> dict[int, dict[int, str]]:
    """The process groups of the host's live processes whose environment marks them as a
    run of one of ``deployment_ids`` in the database whose ledger is ``ledger``:
    ``{deployment id: {process group: start token}}``, each token as `end_group` takes it
    (the leader's, or the earliest marked member's when the leader is gone).

    Processes whose environment cannot be read (another user's) are skipped, and so are
    this process and its own group: a daemon started by a run of another must not end
    itself. Empty where there is no ``/proc`` (not Linux): the recorded group alone counts.
    """
    boot = _boot_id()
    if boot is None or not deployment_ids:
        return {}
    wanted = {str(i).encode(): i for i in deployment_ids}
    ledger_entry = f"{MARKER_LEDGER}={ledger}".encode()
    deployment_key = f"{MARKER_DEPLOYMENT}=".encode()
    me, my_group = os.getpid(), os.getpgrp()
    earliest: dict[int, dict[int, int]] = {}  # deployment -> group -> earliest start
    try:
        entries = list(os.scandir(PROC))
    except OSError:
        return {}
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(PROC / entry.name / "environ", "rb") as f:
                environ = f.read()
        except OSError:  # another user's, or gone
            continue
        if ledger_entry not in environ:
            continue  # nearly every process: one search, no split
        deployment, marked = None, False
        for item in environ.split(b"\0"):
            if item == ledger_entry:
                marked = True
            elif item.startswith(deployment_key):
                deployment = wanted.get(item[len(deployment_key) :])
        st = _stat(int(entry.name))
        if not marked or deployment is None or st is None or st[0] == "Z" or st[1] == my_group:
            continue
        groups = earliest.setdefault(deployment, {})
        groups[st[1]] = min(groups.get(st[1], st[2]), st[2])
    found: dict[int, dict[int, str]] = {}
    for deployment, groups in earliest.items():
        for pgid, started in groups.items():
            leader = _stat(pgid)
            ticks = leader[2] if leader is not None else started
            found.setdefault(deployment, {})[pgid] = f"{boot}:{ticks}"
    return found


def killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def end_group(pgid: int, token: str, grace: float) -> bool:
    """End a recorded group that is not our child: SIGTERM, SIGKILL after ``grace`` seconds,
    then wait until it is gone. False if nothing of it was running."""
    if not group_members(pgid, token):
        return False
    killpg(pgid, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + grace
    while group_members(pgid, token) and loop.time() < give_up:
        await asyncio.sleep(GONE_POLL_SECONDS)
    killpg(pgid, signal.SIGKILL)
    give_up = loop.time() + KILLED_GONE_SECONDS  # a process stuck in the kernel (state D)
    while group_members(pgid, token) and loop.time() < give_up:
        await asyncio.sleep(GONE_POLL_SECONDS)
    return True
