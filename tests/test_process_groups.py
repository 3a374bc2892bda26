"""Recognising and ending a run's process group across a daemon restart (real processes)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from reconciler.providers.process import (
    MARKER_DEPLOYMENT,
    MARKER_LEDGER,
    end_group,
    group_members,
    marked_groups,
    start_token,
)
from tests.support import alive, wait_for

pytestmark = pytest.mark.timeout(30)


def test_a_group_is_recognised_by_its_leaders_start_and_ended():
    leader = subprocess.Popen(["bash", "-c", "sleep 300 & wait"], start_new_session=True)
    try:
        token = start_token(leader.pid)
        assert token is not None
        members = wait_for(lambda: len(group_members(leader.pid, token)) == 2, what="the child")
        assert members
        boot, ticks = token.split(":")
        # The same number with another start time is a reused pid; another boot, nothing.
        assert group_members(leader.pid, f"{boot}:{int(ticks) + 1}") == []
        assert group_members(leader.pid, f"another-boot:{ticks}") == []
        [child] = [p for p in group_members(leader.pid, token) if p != leader.pid]
        assert asyncio.run(end_group(leader.pid, token, grace=5)) is True
        leader.wait(timeout=5)
        assert not alive(child) and group_members(leader.pid, token) == []
        assert asyncio.run(end_group(leader.pid, token, grace=5)) is False
    finally:
        if leader.poll() is None:
            leader.kill()
            leader.wait()


def test_a_group_whose_leader_exited_is_still_recognised_by_its_members():
    leader = subprocess.Popen(
        ["bash", "-c", "trap '' TERM; sleep 300 >/dev/null & echo $!"],
        start_new_session=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    token = start_token(leader.pid)
    assert token is not None
    child = int(leader.communicate(timeout=10)[0])
    try:
        assert group_members(leader.pid, token) == [child]
        # It ignores SIGTERM: SIGKILL after the grace.
        assert asyncio.run(end_group(leader.pid, token, grace=0.2)) is True
        assert not alive(child)
    finally:
        if alive(child):
            subprocess.run(["kill", "-9", str(child)], check=False)


# Each run of the tests its own database identities: a process left by another never counts.
LEDGER, OTHER_LEDGER = uuid.uuid4().hex, uuid.uuid4().hex


def _marked(ledger: str, deployment: int, script: str, **kw: object) -> subprocess.Popen[str]:
    env = {**os.environ, MARKER_LEDGER: ledger, MARKER_DEPLOYMENT: str(deployment)}
    return subprocess.Popen(["bash", "-c", script], env=env, text=True, **kw)  # type: ignore[call-overload]


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _end(*procs: subprocess.Popen[str]) -> None:
    """Kill what a test started, children included."""
    for pid in [c for proc in procs if proc.poll() is None for c in _children(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_runs_processes_are_found_by_their_marker_and_another_databases_left_alone():
    run = _marked(LEDGER, 7, "sleep 300 & wait", start_new_session=True)
    # The same deployment id in another database, and another deployment of this one.
    other_db = _marked(OTHER_LEDGER, 7, "sleep 300 & wait", start_new_session=True)
    other_run = _marked(LEDGER, 8, "sleep 300 & wait", start_new_session=True)
    # A marked process in this process's own group (a daemon started by a run): never.
    own_group = _marked(LEDGER, 7, "sleep 300 & wait")
    try:
        token = start_token(run.pid)
        assert token is not None
        for proc in (run, other_db, other_run, own_group):  # each has its child
            wait_for(lambda p=proc: _children(p.pid), what="the child")
        [child] = _children(run.pid)
        assert marked_groups(LEDGER, [7]) == {7: {run.pid: token}}
        assert marked_groups(LEDGER, [9]) == {}
        [(pgid, found)] = marked_groups(LEDGER, [7, 8])[8].items()
        assert pgid == other_run.pid and found == start_token(other_run.pid)
        assert asyncio.run(end_group(run.pid, token, grace=5)) is True
        run.wait(timeout=5)
        assert not alive(child) and marked_groups(LEDGER, [7]) == {}
        assert other_db.poll() is None and other_run.poll() is None and own_group.poll() is None
    finally:
        _end(run, other_db, other_run, own_group)


def test_what_a_run_left_behind_is_found_with_its_leader_gone_and_outside_its_group():
    # The leader exits at once, leaving a child in its group and one in a session of its own.
    leader = _marked(
        LEDGER,
        7,
        "sleep 300 >/dev/null & echo $!; setsid sleep 300 >/dev/null & echo $!",
        start_new_session=True,
        stdout=subprocess.PIPE,
    )
    out, _ = leader.communicate(timeout=10)
    in_group, own_session = (int(p) for p in out.split())
    try:
        wait_for(lambda: os.getpgid(own_session) == own_session, what="setsid")
        found = marked_groups(LEDGER, [7])[7]
        assert set(found) == {leader.pid, own_session}
        # The gone leader's group is known by its earliest marked member's start.
        assert found[leader.pid] == start_token(in_group)
        assert found[own_session] == start_token(own_session)
        ended = asyncio.run(_end_all(found))
        assert ended == [True, True]
        assert not alive(in_group) and not alive(own_session)
    finally:
        for pid in (in_group, own_session):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


async def _end_all(groups: dict[int, str]) -> list[bool]:
    return list(await asyncio.gather(*(end_group(g, t, grace=5) for g, t in groups.items())))
