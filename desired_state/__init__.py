"""The desired-state format of the reconciler (SPEC §2): reading, checking, its schema.

This package knows nothing of the reconciler: it turns YAML files into
:class:`EnvironmentSpec` objects and :class:`FileError` lists.

Names load on first use (PEP 562): `from desired_state import one_line` costs only the
small module it lives in, not Pydantic and the models, which a CLI command that never
reads a desired-state file (`history`, `--help`) should not pay for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .durations import format_duration, parse_duration
    from .errors import FileError, one_line
    from .loader import (
        DesiredState,
        ParsedFile,
        SpecCheck,
        assemble,
        gc_paused,
        is_environment_file,
        load_directory,
        load_files,
        parse_environment_file,
    )
    from .models import (
        NAME_RE,
        SERVICE_RE,
        VERSION_RE,
        EnvironmentSpec,
        Service,
        Strategy,
        Window,
    )
    from .schema import json_schema

_WHERE = {
    "format_duration": "durations",
    "parse_duration": "durations",
    "FileError": "errors",
    "one_line": "errors",
    "DesiredState": "loader",
    "ParsedFile": "loader",
    "SpecCheck": "loader",
    "assemble": "loader",
    "gc_paused": "loader",
    "is_environment_file": "loader",
    "load_directory": "loader",
    "load_files": "loader",
    "parse_environment_file": "loader",
    "NAME_RE": "models",
    "SERVICE_RE": "models",
    "VERSION_RE": "models",
    "EnvironmentSpec": "models",
    "Service": "models",
    "Strategy": "models",
    "Window": "models",
    "json_schema": "schema",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup is a plain module attribute
    return value


__all__ = [
    "NAME_RE",
    "SERVICE_RE",
    "VERSION_RE",
    "DesiredState",
    "EnvironmentSpec",
    "FileError",
    "ParsedFile",
    "Service",
    "SpecCheck",
    "Strategy",
    "Window",
    "assemble",
    "format_duration",
    "gc_paused",
    "is_environment_file",
    "json_schema",
    "load_directory",
    "load_files",
    "one_line",
    "parse_duration",
    "parse_environment_file",
]
