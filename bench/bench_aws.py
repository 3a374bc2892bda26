"""Reconciler's own overhead per deployment on the `ecs` and `lambda` types vs `command`.

Each deployment runs through the real `Executor` and a SQLite `Store` (records, progress
events, log lines) to `completed`. The AWS types talk to moto in server mode on 127.0.0.1
through real boto3 (the ECS rollout is advanced by the tests' `EcsScheduler`, as in
tests/aws_support.py, with one task so it completes at the first read); the `command`
type runs `/bin/true`.

    overhead = executor.run wall time - time inside the platform

where "inside the platform" is the wall time of every boto3 call (`AwsProvider.call`, a
worker thread each) for ecs/lambda, and the whole `CommandProvider.deploy` (spawn to exit)
for command. The overhead is what reconciler adds: validation glue, records, progress and
log writes, building requests and reading answers, thread hops.

    .venv/bin/python bench/bench_aws.py            # 30 deployments per type
    .venv/bin/python bench/bench_aws.py --full     # 200 deployments per type
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _common import Table, machine, median, ms, percentile, ratio, say

from desired_state import EnvironmentSpec
from reconciler.config import ProviderConfig
from reconciler.executor import Executor, Job
from reconciler.providers import Provider
from reconciler.providers._aws import AwsProvider
from reconciler.providers.aws_lambda import LambdaProvider
from reconciler.providers.command import CommandProvider
from reconciler.providers.ecs import EcsProvider
from reconciler.store import Store
from tests.aws_support import ACCESS_KEY, ACCOUNT, REGION, SECRET_KEY, EcsScheduler, Moto

PLATFORM = [0.0]  # seconds spent inside the platform, summed by the wrappers below


def instrument(mp: pytest.MonkeyPatch) -> None:
    aws_call = AwsProvider.call
    command_deploy = CommandProvider.deploy

    async def call(self: AwsProvider, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        try:
            return await aws_call(self, fn)
        finally:
            PLATFORM[0] += time.perf_counter() - started

    async def deploy(self: CommandProvider, ctx: Any) -> None:
        started = time.perf_counter()
        try:
            await command_deploy(self, ctx)
        finally:
            PLATFORM[0] += time.perf_counter() - started

    mp.setattr(AwsProvider, "call", call)
    mp.setattr(CommandProvider, "deploy", deploy)


def setup_aws(moto: Moto, mp: pytest.MonkeyPatch) -> None:
    EcsScheduler(mp)
    ecs = moto.client("ecs")
    ecs.create_cluster(clusterName="prod")
    ecs.register_task_definition(
        family="api", containerDefinitions=[{"name": "api", "image": "repo/api:0", "memory": 64}]
    )
    ecs.create_service(
        cluster="prod", serviceName="api", taskDefinition="api:1", desiredCount=1, launchType="EC2"
    )
    from moto.ecs.models import ecs_backends

    for d in ecs_backends[ACCOUNT][REGION].services["prod:api"].deployments:
        d.update(rolloutState="COMPLETED", runningCount=1, pendingCount=0)
    role = moto.client("iam").create_role(RoleName="api", AssumeRolePolicyDocument="{}")
    lam = moto.client("lambda")
    repo = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/api"
    lam.create_function(
        FunctionName="api", Role=role["Role"]["Arn"], PackageType="Image",
        Code={"ImageUri": f"{repo}:0"},
    )  # fmt: skip
    v = lam.publish_version(FunctionName="api", Description="0")["Version"]
    lam.create_alias(FunctionName="api", Name="staging", FunctionVersion=v)


def spec(provider: str, params: dict[str, str]) -> EnvironmentSpec:
    return EnvironmentSpec.model_validate(
        {
            "environment": "staging",
            "provider": provider,
            "services": {"api": {"version": "0", "params": params}},
        }
    )


async def run(
    store: Store, provider: Provider, params: dict[str, str], n: int
) -> tuple[list[float], list[float]]:
    executor = Executor(store, {provider.name: provider})
    s = spec(provider.name, params)
    totals, overheads = [], []
    for i in range(n + 2):  # the first two warm up (clients, imports, caches)
        job = Job(spec=s, service="api", version=f"{i + 1}", previous_version=f"{i}", trigger="git")
        PLATFORM[0] = 0.0
        started = time.perf_counter()
        rec = await executor.run(job)
        total = time.perf_counter() - started
        if rec.status != "completed":
            raise SystemExit(
                f"{provider.type} deployment {i} ended {rec.status}: {rec.error_message}"
            )
        if i >= 2:
            totals.append(total)
            overheads.append(total - PLATFORM[0])
    return totals, overheads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="200 deployments per type")
    parser.add_argument("--deployments", type=int, help="per type (default 30, --full 200)")
    args = parser.parse_args()
    n = args.deployments or (200 if args.full else 30)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_DEFAULT_REGION=REGION,
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE="/nonexistent",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
    )
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    results: dict[str, tuple[list[float], list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        setup_aws(Moto(url), mp)
        instrument(mp)
        aws = {"region": REGION, "endpoint_url": url, "poll_interval": 0.01}
        providers: list[tuple[Provider, dict[str, str]]] = [
            (
                CommandProvider(
                    "cmd", ProviderConfig.model_validate({"type": "command", "command": ["/bin/true"]}), Path(tmp)
                ),
                {},
            ),
            (
                EcsProvider("ecs", ProviderConfig.model_validate({"type": "ecs", "cluster": "prod", **aws}), Path(tmp)),
                {"container": "api"},
            ),
            (
                LambdaProvider("lam", ProviderConfig.model_validate({"type": "lambda", **aws}), Path(tmp)),
                {"image": f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/api", "alias": "staging"},
            ),
        ]  # fmt: skip
        for provider, params in providers:
            say(f"{provider.type}: {n} deployments ...")
            store = Store.from_url(f"sqlite:///{Path(tmp) / f'{provider.name}.db'}", migrate=True)
            results[provider.type] = asyncio.run(run(store, provider, params, n))
            store.engine.dispose()
    server.stop()

    table = Table(f"Per-deployment overhead, {n} deployments per type ({machine()})")
    base_total, base_over = results["command"]
    table.add("command: total (p50)", ms(median(base_total)))
    table.add("command: overhead (p50)", ms(median(base_over)))
    for kind in ("ecs", "lambda"):
        total, over = results[kind]
        table.add(f"{kind}: total (p50), moto on loopback", ms(median(total)))
        table.add(
            f"{kind}: overhead (p50)",
            ms(median(over)),
            ms(median(base_over)),
            ratio(median(over), median(base_over)),
        )
        table.add(
            f"{kind}: overhead (p95)", ms(percentile(over, 95)), ms(percentile(base_over, 95))
        )
    table.note("baseline = the command type's overhead (executor.run minus the process's lifetime)")
    table.print()


if __name__ == "__main__":
    main()
