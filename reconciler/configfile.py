"""Where the configuration file is, apart from reading it: `validate` asks whether one
exists before it pays for the configuration's Pydantic models."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

DEFAULT_CONFIG_PATH = Path("/etc/reconciler/reconciler.toml")


def config_path(explicit: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Path:
    if explicit:
        return Path(explicit)
    if environ.get("RECONCILER_CONFIG"):
        return Path(environ["RECONCILER_CONFIG"])
    return DEFAULT_CONFIG_PATH
