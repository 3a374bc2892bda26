"""Recognising and ending a run's process group across a daemon restart (real processes)."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from reconciler.providers.process import end_group, group_members, start_token
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
