"""The documentation a user who clones the repository gets: complete, current, self-contained."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.providers import BUILTIN_TYPES
from tests.support import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_the_generated_reference_is_current():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_reference.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository_and_resolve(page: Path):
    text = page.read_text()
    assert "../shared" not in text and "SPEC.md" not in text and "PROVIDERS.md" not in text
    prose = re.sub(r"```.*?```|`[^`\n]*`", "", text, flags=re.DOTALL)  # code is not links
    for target in LINK.findall(prose):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), f"{page.name}: {target} leaves the repository"
        assert path.exists(), f"{page.name}: {target} does not exist"


def test_the_install_steps_create_every_credential_the_unit_loads():
    unit = (ROOT / "systemd" / "reconciler.service").read_text()
    sources = re.findall(r"^LoadCredential=[^:]+:(\S+)$", unit, re.MULTILINE)
    assert sources, "the unit loads credentials"
    install = (ROOT / "docs" / "operations.md").read_text().split("## Install on a host")[1]
    steps = install.split("```sh", 1)[1].split("```", 1)[0]
    for source in sources:
        # Without the file the service does not start (243/CREDENTIALS).
        assert f"tee {source} " in steps, f"the install steps do not create {source}"


def _section(text: str, kind: str) -> str:
    start = text.index(f"\n## `{kind}`")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


@pytest.mark.parametrize("kind", sorted(BUILTIN_TYPES))
def test_providers_md_describes_every_type_and_param(kind: str):
    section = _section((ROOT / "docs" / "providers.md").read_text(), kind)
    module, _, name = BUILTIN_TYPES[kind][0].partition(":")
    model = getattr(importlib.import_module(module), name).params_model
    for field, info in (model.model_fields if model is not None else {}).items():
        key = info.alias or field
        assert f"`{key}`" in section, f"providers.md, {kind}: param `{key}` is not described"
