"""Provider plumbing: lazy built-in types, missing extras, entry points, params checked at
validate time with file:line:col."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import reconciler
from reconciler import providers as registry
from reconciler.config import ConfigError, load_config
from reconciler.providers import build_providers
from tests.support import RECONCILER, cli_env

# A third-party provider type, shipped as a package with an entry point of the
# `reconciler.providers` group: it checks its params with a pydantic model.
PLUGIN = """
from pydantic import BaseModel, ConfigDict, Field

from reconciler.providers import Provider


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(pattern=r"^[a-z0-9./-]+$")
    replicas: int = Field(default=1, ge=1, le=10)


class EchoProvider(Provider):
    type = "echo"
    params_model = Params
    strategies = frozenset({"rolling", "blue_green"})

    def __init__(self, name, config, base_dir):
        super().__init__(name, config, base_dir)
        self.token = self.read_token()

    async def deploy(self, ctx):
        await ctx.report_progress(100, "done")
"""


def install_plugin(root: Path) -> Path:
    site = root / "site"
    (site / "echo_provider").mkdir(parents=True)
    (site / "echo_provider" / "__init__.py").write_text(PLUGIN)
    dist = site / "echo_provider-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-provider\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[reconciler.providers]\necho = echo_provider:EchoProvider\n"
    )
    return site


def config(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "reconciler.toml"
    p.write_text(f'[repository]\nurl = "repo"\n\n{body}')
    return p


def test_unknown_type_names_the_key(tmp_path):
    c = load_config(config(tmp_path, '[providers.x]\ntype = "nope"\n'), environ={})
    with pytest.raises(ConfigError, match=r"providers\.x\.type: unknown provider type 'nope'"):
        build_providers(c)


def test_missing_extra_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "needs_sdk.py").write_text("import sdk_that_is_not_installed_xyz\nclass P: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.BUILTIN_TYPES, "fancy", ("needs_sdk:P", "fancy"))
    c = load_config(config(tmp_path, '[providers.f]\ntype = "fancy"\n'), environ={})
    with pytest.raises(ConfigError) as err:
        build_providers(c)
    message = str(err.value)
    assert message.startswith("providers.f.type: provider type 'fancy' needs")
    assert "sdk_that_is_not_installed_xyz" in message
    # The distribution's name on the index (the import package is `reconciler`).
    assert "pip install 'gitops-reconciler[fancy]'" in message
    assert "\n" not in message


def test_the_extra_hint_names_the_installed_distribution():
    from importlib.metadata import distribution

    dist = distribution(reconciler.DISTRIBUTION)
    assert dist.metadata["Name"] == "gitops-reconciler"
    assert {"docker", "kubernetes", "aws", "all"} <= set(dist.metadata.get_all("Provides-Extra"))
    assert [ep.value for ep in dist.entry_points if ep.name == "reconciler"] == [
        "reconciler.cli:main"
    ]


def test_entry_point_type_loads_and_reads_its_token(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(install_plugin(tmp_path)))
    (tmp_path / "tok").write_text("tok-s3cret-123\n")
    c = load_config(
        config(tmp_path, '[providers.e]\ntype = "echo"\ntoken_file = "tok"\n'), environ={}
    )
    provider = build_providers(c)["e"]
    assert provider.type == "echo"
    assert "tok-s3cret-123" in provider.secrets()


def test_validate_reports_params_and_strategy_at_their_position(tmp_path):
    site = install_plugin(tmp_path)
    (tmp_path / "tok").write_text("t0ken-value\n")
    cfg = config(tmp_path, '[providers.e]\ntype = "echo"\ntoken_file = "tok"\n')
    desired = tmp_path / "desired"
    desired.mkdir()
    (desired / "prod.yaml").write_text(
        "environment: prod\n"
        "provider: e\n"
        "services:\n"
        "  api:\n"
        '    version: "1.0"\n'
        "    params:\n"
        "      image: UPPER\n"
        "      replicas: 99\n"
        "      colour: red\n"
        "  worker:\n"
        '    version: "1.0"\n'
        "strategy:\n"
        "  type: canary\n"
    )
    (desired / "ok.yaml").write_text(
        "environment: ok\nprovider: e\nservices:\n  api:\n    version: '2'\n"
        "    params: {image: reg/app}\n"
    )
    env = cli_env()
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    out = subprocess.run(
        [*RECONCILER, "--config", str(cfg), "validate", str(desired)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 1, out.stderr
    lines = out.stderr.splitlines()
    f = f"{desired}/prod.yaml"
    assert (
        f"{f}:7:14: services.api.params.image: String should match pattern '^[a-z0-9./-]+$'"
        in lines
    )
    assert any(line.startswith(f"{f}:8:17: services.api.params.replicas: ") for line in lines)
    assert f"{f}:9:7: services.api.params.colour: unknown key 'colour'" in lines
    # a missing key is placed at the nearest node that exists: the worker's mapping
    assert f"{f}:11:5: services.worker.params.image: required key missing" in lines
    assert (
        f"{f}:13:9: strategy.type: provider 'e' (echo) supports blue_green, rolling, not canary"
        in lines
    )
    assert not any("ok.yaml" in line for line in lines)
    assert "t0ken-value" not in out.stderr + out.stdout


def test_no_cloud_sdk_is_imported_for_a_command_only_configuration(tmp_path):
    c = config(tmp_path, '[providers.l]\ntype = "command"\ncommand = ["true"]\n')
    code = (
        "import sys; from reconciler.config import load_config; "
        "from reconciler.providers import build_providers; "
        f"build_providers(load_config({str(c)!r}, environ={{}})); "
        "print(sorted(m for m in ('docker', 'kubernetes', 'boto3', 'botocore') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), check=True
    )
    assert out.stdout.strip() == "[]"
