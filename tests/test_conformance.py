"""The conformance suite (tests/conformance.py) run for all eight built-in types: `command`
(a real script), `docker` (a real Docker Engine, tests/dockerd.py), `kubernetes` (the fake
API server of tests/fake_kube.py), `ecs` and `lambda` (moto, with ECS's scheduler and
Lambda's asynchronous updates played by tests/aws_support.py), and `vercel`, `netlify`,
`railway` (local servers faithful to each platform's API, tests/fakes/hosted.py).

Adding a type is one backend class (tests/fakes/backends.py) and one fixture parameter. The
expensive targets are shared: one dockerd for the session, one moto server for the module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.aws_support import EcsScheduler, LambdaUpdates
from tests.conformance import *  # noqa: F403  (the conformance test functions)
from tests.conformance import Backend
from tests.fake_kube import FakeKube
from tests.fakes.backends import (
    FAKES,
    KUBE_TOKEN,
    TOKEN,
    CommandBackend,
    DockerBackend,
    EcsBackend,
    HostedBackend,
    KubernetesBackend,
    LambdaBackend,
)

pytestmark = pytest.mark.timeout(60)

TYPES = ["command", "docker", "kubernetes", "ecs", "lambda", "vercel", "netlify", "railway"]


@pytest.fixture(params=TYPES)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    kind = request.param
    where = tmp_path / "backend"
    if kind == "command":
        yield CommandBackend(where)
        return
    if kind == "docker":
        docker = DockerBackend(request.getfixturevalue("dockerd"), where)
        try:
            yield docker
        finally:
            docker.close()
        return
    if kind == "kubernetes":
        with FakeKube(token=KUBE_TOKEN, tick=0.02) as kube:
            yield KubernetesBackend(kube, where)
        return
    if kind in ("ecs", "lambda"):
        moto = request.getfixturevalue("moto")  # fake credentials in the environment
        monkeypatch = request.getfixturevalue("monkeypatch")
        if kind == "ecs":
            yield EcsBackend(moto, EcsScheduler(monkeypatch))
        else:
            yield LambdaBackend(moto, LambdaUpdates(monkeypatch))
        return
    fake = FAKES[kind](TOKEN)
    fake.start()
    try:
        yield HostedBackend(kind, fake, where)
        if kind == "railway":
            assert fake.invalid == []  # every document validated against the schema
    finally:
        fake.stop()
