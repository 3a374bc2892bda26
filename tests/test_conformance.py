"""The conformance suite (tests/conformance.py) run for the built-in types whose backend
the tests can start here: `command` (a real script), and `vercel`, `netlify`, `railway`
(local servers faithful to each platform's API, tests/fakes/hosted.py).

Adding a type is one backend class (tests/fakes/backends.py) and one fixture parameter."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance import *  # noqa: F403  (the conformance test functions)
from tests.conformance import Backend
from tests.fakes.backends import FAKES, TOKEN, CommandBackend, HostedBackend

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["command", "vercel", "netlify", "railway"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    kind = request.param
    if kind == "command":
        yield CommandBackend(tmp_path / "backend")
        return
    fake = FAKES[kind](TOKEN)
    fake.start()
    try:
        yield HostedBackend(kind, fake, tmp_path / "backend")
        if kind == "railway":
            assert fake.invalid == []  # every document validated against the schema
    finally:
        fake.stop()
