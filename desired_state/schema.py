"""JSON Schema (draft 2020-12) of one environment file, for editors and CI."""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

from .models import SERVICE_RE, EnvironmentSpec

__all__ = ["json_schema"]

_DIALECT = "https://json-schema.org/draft/2020-12/schema"

_DESCRIPTION = (
    "One environment of a reconciler desired-state repository: which version of each"
    " service runs there, and how it is deployed. The reconciler reads every YAML scalar"
    " as text first (version 1.10 is the text '1.10'; no value silently becomes a number"
    " or a boolean), so this schema also accepts the numbers and booleans that generic"
    " YAML tools see. Durations are seconds or 90s / 30m / 2h / 1d. Unknown and duplicate"
    " keys are errors."
)


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """An empty YAML value (``params:``) means the default: accept null as well."""
    if isinstance(schema.get("type"), str):
        schema["type"] = [schema["type"], "null"]
        return schema
    description = schema.pop("description", None)
    default = schema.pop("default", None)
    wrapped: dict[str, Any] = {"anyOf": [schema, {"type": "null"}]}
    if description is not None:
        wrapped["description"] = description
    if default is not None:
        wrapped["default"] = default
    return wrapped


def _drop_property_titles(schema: dict[str, Any]) -> None:
    for prop in schema.get("properties", {}).values():
        if isinstance(prop, dict):
            prop.pop("title", None)


@lru_cache(maxsize=1)
def _build() -> dict[str, Any]:
    schema = EnvironmentSpec.model_json_schema()
    defs: dict[str, Any] = schema.get("$defs", {})
    for sub in (schema, *defs.values()):
        _drop_property_titles(sub)

    props: dict[str, Any] = schema["properties"]
    service_ref = {"$ref": "#/$defs/Service"}
    services = props["services"]
    services.pop("patternProperties", None)
    services["propertyNames"] = {"pattern": SERVICE_RE}
    services["additionalProperties"] = service_ref
    for name in ("strategy", "depends_on", "windows"):
        props[name] = _nullable(props[name])
    service_props = defs["Service"]["properties"]
    service_props["params"] = _nullable(service_props["params"])

    return {
        "$schema": _DIALECT,
        "title": "reconciler environment file",
        "description": _DESCRIPTION,
        **{k: v for k, v in schema.items() if k not in ("title", "description")},
    }


def json_schema() -> dict[str, Any]:
    """The JSON Schema of one environment file (a fresh copy, safe to modify)."""
    return copy.deepcopy(_build())
