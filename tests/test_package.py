"""The package as users install it: a wheel built from this tree, alone in a fresh venv.

The development install is editable and sees the whole checkout; only a built wheel shows
that the distribution carries what the command needs (migrations, the schema, py.typed)
and declares every dependency.  Installing pulls the dependencies from the package index
(pip's cache makes later runs quick).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.timeout(600)


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=540
    )
    assert out.returncode == 0, f"{args}: {out.stdout}\n{out.stderr}"
    return out


def test_the_built_wheel_installs_alone_and_runs(tmp_path: Path):
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--wheel", "--outdir", dist, ROOT, cwd=tmp_path)
    (wheel,) = dist.glob("*.whl")
    assert wheel.name == f"gitops_reconciler-{meta['version']}-py3-none-any.whl"

    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    # Only the wheel (and what it declares) goes in: nothing of the checkout is importable.
    run(env / "bin" / "pip", "install", "--quiet", wheel, cwd=tmp_path)
    reconciler = env / "bin" / "reconciler"
    where = run(
        env / "bin" / "python", "-c", "import reconciler; print(reconciler.__file__)", cwd=tmp_path
    )
    assert str(env) in where.stdout

    assert "Usage: reconciler" in run(reconciler, "--help", cwd=tmp_path).stdout
    assert meta["version"] in run(reconciler, "--version", cwd=tmp_path).stdout
    checked = run(reconciler, "validate", ROOT / "examples" / "desired-state", cwd=tmp_path)
    assert "2 valid environments, 0 errors" in checked.stdout
    json.loads(run(reconciler, "schema", cwd=tmp_path).stdout)
    # The migrations ship in the wheel: a fresh database is brought to the newest schema.
    config = tmp_path / "reconciler.toml"
    config.write_text('[repository]\nurl = "repo"\n\n[daemon]\nstate_dir = "state"\n')
    upgraded = run(reconciler, "--config", config, "db", "upgrade", cwd=tmp_path)
    assert "applied" in upgraded.stdout
    # The dashboard's templates, stylesheet and script ship too, and load from the wheel.
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("templates/layout.html", "templates/overview.html", "static/dashboard.css"):
        assert f"reconciler/http/{name}" in names, name
    run(
        env / "bin" / "python",
        "-c",
        "from reconciler.http import pages\n"
        "for name in ('overview.html', 'history.html', 'deployment.html', 'error.html'):\n"
        "    pages.templates().get_template(name)\n"
        "assert pages.static_file('dashboard.js')",
        cwd=tmp_path,
    )
