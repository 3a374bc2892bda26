"""Reconciler's own overhead per deployment with the `kubernetes` provider, beside `command`.

Runs N deployments one after another through the real Executor and Store (SQLite in a
temporary folder), each to a new version:

* kubernetes: the provider against tests/fake_kube.py running in a *separate process*
  (so its threads do not share this interpreter's GIL), one Deployment of 1 replica, the
  fake's rollout controller stepping every 5 ms;
* command: the `command` provider running a tiny bash script (the baseline).

"Platform time" is the time spent waiting on the platform: for kubernetes every API call
(reads, SelfSubjectAccessReviews, the patch) and every wait for the next watch event, timed
around the client's calls; for command the script's own run time from its first to its
last line ($EPOCHREALTIME). Overhead = the run's wall time (Executor.run, including the
record writes) - platform time: kubeconfig loading, the client's setup, JSON/models,
kubectl's rules, progress and log records.

    .venv/bin/python bench/bench_kubernetes.py            # 30 deployments per type
    .venv/bin/python bench/bench_kubernetes.py --full     # 100 deployments per type
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import PYTHON, ROOT, Table, machine, median, ms, percentile, ratio, say
from kubernetes.aio import client as k8s

from desired_state import EnvironmentSpec
from reconciler.config import ProviderConfig
from reconciler.executor import Executor, Job
from reconciler.providers import CommandProvider
from reconciler.providers.kubernetes import KubernetesProvider
from reconciler.store import Store

FAKE = f"""
import sys, json
sys.path.insert(0, {str(ROOT)!r})
from tests.fake_kube import FakeKube
kube = FakeKube(tick=0.005).start()
kube.add_deployment("api", "registry.local/team/api:0", replicas=1)
print(kube.url, flush=True)
sys.stdin.read()
kube.stop()
"""

SCRIPT = """#!/bin/bash
start=$EPOCHREALTIME
echo '{"progress": 50, "message": "working"}'
printf '%s %s\\n' "$start" "$EPOCHREALTIME" >> "$BENCH_LOG"
"""


class Clock:
    """Accumulates the time spent inside awaited platform calls."""

    def __init__(self) -> None:
        self.total = 0.0
        self.calls = 0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        clock = self

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                clock.total += time.perf_counter() - started
                clock.calls += 1

        return timed


def spec(provider: str, version: str) -> EnvironmentSpec:
    return EnvironmentSpec.model_validate(
        {
            "environment": "bench",
            "provider": provider,
            "services": {"api": {"version": version}},
        }
    )


async def run_kubernetes(tmp: Path, url: str, n: int) -> tuple[list[float], list[float], float]:
    config = tmp / "kubeconfig"
    config.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "f", "cluster": {"server": url}}],
                "users": [{"name": "u", "user": {}}],
                "contexts": [{"name": "f", "context": {"cluster": "f", "user": "u"}}],
                "current-context": "f",
            }
        )
    )
    clock = Clock()
    provider = KubernetesProvider(
        "k8s",
        ProviderConfig.model_validate({"type": "kubernetes", "kubeconfig": str(config)}),
        tmp,
    )
    # Time every platform call: the provider's reads and patches, the access reviews, and
    # each wait for a watch event.
    for name in ("_read", "_patch"):
        setattr(provider, name, clock.wrap(getattr(provider, name)))
    authz = k8s.AuthorizationV1Api
    authz.create_self_subject_access_review = clock.wrap(  # type: ignore[method-assign]
        authz.create_self_subject_access_review
    )
    watch = provider._watch

    async def timed_watch(*args: Any) -> Any:
        events = watch(*args)
        while True:
            started = time.perf_counter()
            try:
                item = await events.__anext__()
            except StopAsyncIteration:
                return
            finally:
                clock.total += time.perf_counter() - started
                clock.calls += 1
            yield item

    provider._watch = timed_watch  # type: ignore[method-assign]
    store = Store.from_url(f"sqlite:///{tmp / 'k8s.db'}")
    executor = Executor(store, {"k8s": provider})
    totals, platform = [], []
    previous = "0"
    for i in range(n + 1):  # the first one warms up
        version = str(i + 1)
        before = clock.total
        calls = clock.calls
        started = time.perf_counter()
        rec = await executor.run(Job(spec("k8s", version), "api", version, previous, "git"))
        elapsed = time.perf_counter() - started
        assert rec.status == "completed", rec.error_message
        previous = version
        if i:
            totals.append(elapsed)
            platform.append(clock.total - before)
            per_run_calls = clock.calls - calls
    store.engine.dispose()
    return totals, platform, per_run_calls


async def run_command(tmp: Path, n: int) -> tuple[list[float], list[float]]:
    script = tmp / "deploy.sh"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    log = tmp / "command.log"
    provider = CommandProvider(
        "local",
        ProviderConfig.model_validate(
            {"type": "command", "command": [str(script)], "env": {"BENCH_LOG": str(log)}}
        ),
        tmp,
    )
    store = Store.from_url(f"sqlite:///{tmp / 'command.db'}")
    executor = Executor(store, {"local": provider})
    totals = []
    for i in range(n + 1):
        version = str(i + 1)
        started = time.perf_counter()
        rec = await executor.run(Job(spec("local", version), "api", version, None, "git"))
        if i:
            totals.append(time.perf_counter() - started)
        assert rec.status == "completed", rec.error_message
    store.engine.dispose()
    lines = log.read_text().splitlines()[1:]
    platform = [float(b) - float(a) for a, b in (line.split() for line in lines)]
    return totals, platform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="100 deployments per type")
    parser.add_argument("--deployments", type=int, default=None)
    args = parser.parse_args()
    n = args.deployments or (100 if args.full else 30)

    with tempfile.TemporaryDirectory(prefix="bench-k8s-") as tmp_name:
        tmp = Path(tmp_name)
        fake = subprocess.Popen(
            [PYTHON, "-c", FAKE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            assert fake.stdout is not None
            url = fake.stdout.readline().strip()
            say(f"fake API server at {url}; {n} kubernetes deployments")
            k_total, k_platform, calls = asyncio.run(run_kubernetes(tmp, url, n))
        finally:
            assert fake.stdin is not None
            fake.stdin.close()
            fake.wait(15)
        say(f"{n} command deployments")
        c_total, c_platform = asyncio.run(run_command(tmp, n))

    k_over = [t - p for t, p in zip(k_total, k_platform, strict=True)]
    c_over = [t - p for t, p in zip(c_total, c_platform, strict=True)]
    table = Table(f"kubernetes provider: overhead per deployment ({n} runs; {machine()})")
    table.add(
        "run, wall time (p50)",
        ms(median(k_total)),
        ms(median(c_total)),
        ratio(median(k_total), median(c_total)),
    )
    table.add("platform time (p50)", ms(median(k_platform)), ms(median(c_platform)))
    table.add(
        "reconciler overhead (p50)",
        ms(median(k_over)),
        ms(median(c_over)),
        ratio(median(k_over), median(c_over)),
        "< 2x command",
        median(k_over) < 2 * median(c_over),
    )
    table.add(
        "reconciler overhead (p95)",
        ms(percentile(k_over, 95)),
        ms(percentile(c_over, 95)),
        ratio(percentile(k_over, 95), percentile(c_over, 95)),
    )
    table.add("platform calls / deployment", str(calls), "1 process")
    table.note(
        "baseline: the `command` provider running a bash script; platform time of command = the script's own run time"
    )
    table.note(
        "kubernetes platform time = API calls + waits for watch events (the fake's rollout of 1 replica at a 5 ms tick)"
    )
    table.print()


if __name__ == "__main__":
    sys.exit(main())
