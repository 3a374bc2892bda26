"""`status` from the database alone (reconciler/status.py), and what reading commands import
(issue 10 item 3): the answer is the engine's, the start-up is not."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from reconciler import operations as ops
from reconciler.cli import main as cli_main
from reconciler.config import load_config
from reconciler.status import saved_status
from reconciler.store import Store
from reconciler.store.reading import open_reader
from reconciler.store.sqlite_read import SQLiteReader
from tests.support import ROOT, World, cli_env
from tests.test_cli_output import run_listing_modules

pytestmark = pytest.mark.timeout(180)

#: What a reading command must never load: the engine and what only it needs (git, the
#: providers and their clients), the servers, migrations, the ORM, the PostgreSQL dialect.
NOT_FOR_READING = (
    "alembic",
    "boto3",
    "croniter",
    "git",
    "jsonschema",
    "starlette",
    "uvicorn",
    "yaml",
    "reconciler.engine",  # (reconciler.operations is a LazyLoader stub: never executed)
    "reconciler.providers",
    "reconciler.source",
    "reconciler.sync",
    "reconciler.http",
    "sqlalchemy.orm",
    "sqlalchemy.dialects.postgresql",
)


def loaded(modules: set[str], prefixes: tuple[str, ...]) -> set[str]:
    return {m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes)}


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path, retries=1)


def statuses(world: World) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """`status --json` rows as the saved-state read gives them, and as the engine does."""
    config = load_config(world.config)
    store = Store.for_reading(config.database_url)
    reader = open_reader(config.database_url)  # what the command reads: sqlite3 alone
    assert isinstance(reader, SQLiteReader)
    try:
        now = datetime.now(UTC)
        saved = saved_status(config, store, None, now)
        assert saved == saved_status(config, reader, None, now)  # the same answer
    finally:
        store.close()
        reader.close()
    assert saved is not None, "a sync without broken files: the store answers alone"
    engine, decisions = asyncio.run(ops.decisions(config, fetch=False))
    commit = engine.commit.sha if engine.commit else None
    assert saved.commit == commit
    return [d.status_json(saved.commit) for d in saved.decisions], [
        d.status_json(commit) for d in decisions
    ]


def test_status_from_the_saved_states_is_the_engines(world: World):
    world.repo.set_env("staging", {"api": "1.0", "web": "2.0"})
    world.repo.set_env("production", {"api": "1.0", "web": "2.0"}, depends_on=["staging"])
    world.cli("sync", check=True)
    world.cli("suspend", "--env", "production", "--reason", "freeze", check=True)
    world.repo.set_env("staging", {"api": "1.1-fail", "web": "2.1"})
    world.repo.set_env("production", {"api": "1.1", "web": "2.1"}, depends_on=["staging"])
    assert world.cli("sync").returncode == 1  # staging/api failed
    saved, engine = statuses(world)
    assert saved == engine
    states = {(r["environment"], r["service"]): r["state"] for r in saved}
    assert states[("staging", "api")] == "failed" and states[("staging", "web")] == "synced"
    assert len(set(states.values())) >= 3, states  # failed, synced, and production's own


def test_status_after_a_sync_with_a_broken_file_shows_it_invalid(world: World):
    world.repo.set_env("staging", {"api": "1.0"})
    world.cli("sync", check=True)
    world.repo.write("staging.yaml", "environment: staging\nprovider: local\nservices: [\n")
    world.repo.commit("break staging")
    world.cli("sync")
    out = world.cli("status", "--json", check=True)
    rows = json.loads(out.stdout)
    assert [(r["environment"], r["state"]) for r in rows] == [("staging", "invalid")]


def test_status_of_an_unknown_environment_exits_2(world: World):
    world.repo.set_env("staging", {"api": "1.0"})
    world.cli("sync", check=True)
    out = world.cli("status", "--env", "nowhere")
    assert out.returncode == 2 and "unknown environment 'nowhere'" in out.stderr


def test_reading_commands_load_neither_the_engine_nor_git_nor_servers(world: World):
    world.repo.set_env("staging", {"api": "1.0"})
    world.cli("sync", check=True)
    config = ("--config", str(world.config))
    for args in (("status",), ("history",), ("show", "1")):
        modules = run_listing_modules(*config, *args)
        assert "sqlite3" in modules, args  # it did read the database (tests/test_sqlite_read.py)
        assert not loaded(modules, NOT_FOR_READING), (args, loaded(modules, NOT_FOR_READING))
    assert not loaded(run_listing_modules("--help"), (*NOT_FOR_READING, "sqlalchemy", "pydantic"))


def plugin_world(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An installed Pydantic plugin (a distribution with a `pydantic` entry point) that
    leaves a file behind when Pydantic loads it: the environment to run with, the file."""
    site = tmp_path / "site"
    dist = site / "marker_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: marker-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[pydantic]\nmarker = marker_plugin:plugin\n")
    marker = tmp_path / "plugin-loaded"
    (site / "marker_plugin.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "class Plugin:\n"
        "    def new_schema_validator(self, *args, **kwargs):\n"
        "        return None, None, None\n"
        "plugin = Plugin()\n"
    )
    env = {**cli_env(), "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])}
    env.pop("PYDANTIC_DISABLE_PLUGINS", None)
    return env, marker


def test_reading_commands_skip_the_pydantic_plugin_lookup(world: World, tmp_path: Path):
    world.repo.set_env("staging", {"api": "1.0"})
    world.cli("sync", check=True)
    env, marker = plugin_world(tmp_path)
    model = "import pydantic\nclass M(pydantic.BaseModel):\n    x: int = 0\n"
    subprocess.run([sys.executable, "-c", model], env=env, check=True, timeout=60)
    assert marker.exists(), "the fixture's plugin is found by Pydantic itself"
    marker.unlink()
    config = ("--config", str(world.config))
    for args in (("status",), ("history",), ("show", "1"), ("validate", str(world.repo.path))):
        done = subprocess.run(
            [sys.executable, "-m", "reconciler", *config, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, (args, done.stderr)
        assert not marker.exists(), args
    # a command that deploys keeps the plugins (and its children's environment as it was)
    done = subprocess.run(
        [sys.executable, "-m", "reconciler", *config, "sync"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert marker.exists()


def test_the_plugin_switch_is_undone_when_the_command_ends(world: World):
    assert "PYDANTIC_DISABLE_PLUGINS" not in os.environ
    result = CliRunner().invoke(cli_main, ["--config", str(world.config), "history"])
    assert result.exit_code == 0, result.output
    assert "PYDANTIC_DISABLE_PLUGINS" not in os.environ
