"""The JSON Schema of the environment file format."""

import json

import pytest
import yaml

from desired_state.models import NAME_RE, SERVICE_RE, VERSION_RE
from desired_state.schema import json_schema
from tests.support import SPEC_EXAMPLE

# SPEC §2, verbatim

try:  # not a dependency of the project; the structural checks below run without it
    import jsonschema
except ImportError:  # pragma: no cover
    jsonschema = None

needs_jsonschema = pytest.mark.skipif(jsonschema is None, reason="jsonschema not installed")


def test_schema_structure():
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"]
    assert "text" in schema["description"]
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"environment", "provider", "services"}
    props = schema["properties"]
    assert set(props) == {
        "environment",
        "provider",
        "services",
        "timeout",
        "strategy",
        "on_failure",
        "depends_on",
        "windows",
        "suspended",
        "self_heal",
    }
    assert props["self_heal"]["enum"] == [True, False, "true", "false"]
    assert all(p.get("description") for p in props.values())
    assert props["environment"]["pattern"] == NAME_RE
    assert props["services"]["propertyNames"] == {"pattern": SERVICE_RE}
    assert props["services"]["minProperties"] == 1
    service = schema["$defs"]["Service"]
    assert service["additionalProperties"] is False
    assert service["required"] == ["version"]
    assert {"type": "string", "pattern": VERSION_RE} in service["properties"]["version"]["anyOf"]
    assert schema["$defs"]["Window"]["additionalProperties"] is False
    assert schema["$defs"]["Strategy"]["additionalProperties"] is True
    timeout_types = {alt["type"] for alt in props["timeout"]["anyOf"]}
    assert timeout_types == {"integer", "string"}
    assert props["on_failure"]["enum"] == ["stop", "rollback"]
    json.dumps(schema)  # serialisable


def test_schema_is_a_fresh_copy():
    json_schema()["properties"].clear()
    assert json_schema()["properties"]


def _errors(instance):
    validator = jsonschema.Draft202012Validator(json_schema())
    messages = []
    stack = list(validator.iter_errors(instance))
    while stack:
        error = stack.pop()
        messages.append(error.message)
        stack.extend(error.context or [])
    return messages


@needs_jsonschema
def test_schema_is_valid_draft_2020_12():
    jsonschema.Draft202012Validator.check_schema(json_schema())


@needs_jsonschema
def test_schema_accepts_the_spec_example():
    # as a generic YAML tool (an editor) sees it: 1.10 a number, false a boolean
    assert _errors(yaml.safe_load(SPEC_EXAMPLE)) == []


@needs_jsonschema
def test_schema_accepts_a_minimal_file_with_empty_optionals():
    doc = yaml.safe_load(
        "environment: e\nprovider: p\nservices:\n  api:\n    version: '1'\n    params:\n"
        "depends_on:\nwindows:\ntimeout: 90\n"
    )
    assert _errors(doc) == []


@needs_jsonschema
@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda d: d.update(foo=1), "'foo' was unexpected"),
        (lambda d: d["services"]["api"].update(bar=1), "'bar' was unexpected"),
        (lambda d: d["windows"][0].update(baz=1), "'baz' was unexpected"),
        (lambda d: d["services"].update({"bad name": {"version": "1"}}), "does not match"),
        (lambda d: d.update(timeout="5x"), "is not valid"),
        (lambda d: d.update(on_failure="retry"), "is not one of"),
        (lambda d: d.pop("provider"), "'provider' is a required property"),
        (lambda d: d.update(environment="Prod"), "does not match"),
    ],
)
def test_schema_rejects(change, fragment):
    doc = yaml.safe_load(SPEC_EXAMPLE)
    change(doc)
    errors = _errors(doc)
    assert errors
    assert any(fragment in e for e in errors), errors
