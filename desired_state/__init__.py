"""The desired-state format of the reconciler (SPEC §2): reading, checking, its schema.

This package knows nothing of the reconciler: it turns YAML files into
:class:`EnvironmentSpec` objects and :class:`FileError` lists.
"""

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
