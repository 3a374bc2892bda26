"""The format checked without Pydantic (desired_state/format_schema.py, what `validate DIR`
runs): the generated schema is current, it gives the models' errors and values for every
document below, and `validate DIR` never imports Pydantic."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic_core import ValidationError

from desired_state import parse_environment_file
from desired_state.checks import MAX_PARAM_BYTES, MAX_STEPS
from desired_state.format_gen import OUTPUT, _Walk, render
from desired_state.format_schema import VALIDATOR
from desired_state.models import EnvironmentSpec
from tests.support import SPEC_EXAMPLE
from tests.test_cli_output import ROOT, run_listing_modules


def test_the_generated_schema_is_current():
    assert OUTPUT.read_text(encoding="utf-8") == render(), "run scripts/gen_format_schema.py"


def test_the_generator_names_only_the_shared_checks():
    with pytest.raises(SystemExit, match=r"checks\.py"):
        _Walk().function(lambda value: value)


BASE: dict[str, Any] = {
    "environment": "production",
    "provider": "k8s-prod",
    "services": {"api": {"version": "1.4.2", "params": {"deployment": "api"}}},
}


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"k": value}
    return value


# (key, value): the base document with `key` set to `value`, or removed (_MISSING)
_MISSING = object()
CHANGES: list[tuple[str, Any]] = [
    ("environment", _MISSING),
    ("environment", None),
    ("environment", 5),
    ("environment", "Prod"),
    ("environment", "a" * 64),
    ("environment", "-x"),
    ("environment", ["x"]),
    ("environment", {"a": "1"}),
    ("provider", _MISSING),
    ("provider", ""),
    ("provider", None),
    ("provider", 3),
    ("provider", ["p"]),
    ("services", _MISSING),
    ("services", {}),
    ("services", None),
    ("services", "api"),
    ("services", ["api"]),
    ("services", {"Bad Name!": {"version": "1"}}),
    ("services", {"a" * 64: {"version": "1"}}),
    ("services", {"api": None}),
    ("services", {"api": "1.0"}),
    ("services", {"api": ["1.0"]}),
    ("services", {"api": {}}),
    ("services", {"api": {"version": None}}),
    ("services", {"api": {"version": 1.5}}),
    ("services", {"api": {"version": "1 2"}}),
    ("services", {"api": {"version": "a" * 129}}),
    ("services", {"api": {"version": ""}}),
    ("services", {"api": {"version": "1", "image": "x"}}),
    ("services", {"api": {"version": "1", "params": None}}),
    ("services", {"api": {"version": "1", "params": "x"}}),
    ("services", {"api": {"version": "1", "params": ["x"]}}),
    ("services", {"api": {"version": "1", "params": {"1bad": "x", "ok": "y"}}}),
    ("services", {"api": {"version": "1", "params": {"a-b": "1", "a_b": "2"}}}),
    ("services", {"api": {"version": "1", "params": {"k": "x\x00"}}}),
    ("services", {"api": {"version": "1", "params": {"k": "x" * (MAX_PARAM_BYTES + 1)}}}),
    ("services", {"api": {"version": "1", "params": {"k": nested(10)}}}),
    ("services", {"api": {"version": "1", "params": {"k": {"a\x00": "1", "b" * 300: "2"}}}}),
    ("services", {"api": {"version": "1", "params": {"k": [1, None, True, 2.5, ["é"]]}}}),
    (
        "services",
        {
            "api": {
                "version": "1",
                "params": {f"p{i}": "x" * (MAX_PARAM_BYTES - 100) for i in range(5)},
            }
        },
    ),
    (
        "services",
        {
            "api": {"version": "1", "params": {"a": "1"}},
            "web": {"version": "2.0", "params": {"a": "1"}},
            "db": {"version": "bad version", "params": {"a": "1"}},
            "x!": {"version": "1"},
        },
    ),
    ("timeout", "90"),
    ("timeout", 90),
    ("timeout", "1h30m"),
    ("timeout", "0"),
    ("timeout", 0),
    ("timeout", -1),
    ("timeout", "5x"),
    ("timeout", "8d"),
    ("timeout", "7d"),
    ("timeout", True),
    ("timeout", None),
    ("timeout", ["1"]),
    ("timeout", "1" * 50),
    ("timeout", 1.5),
    ("strategy", None),
    ("strategy", "canary"),
    ("strategy", ["canary"]),
    ("strategy", {}),
    ("strategy", {"type": "x"}),
    ("strategy", {"type": 5}),
    ("strategy", {"type": None}),
    ("strategy", {"type": "canary", "steps": ["10", "50", "100"], "interval": "30s"}),
    ("strategy", {"type": "canary", "steps": "x"}),
    ("strategy", {"type": "canary", "steps": []}),
    ("strategy", {"type": "canary", "steps": ["101", "a", True, None, "050"]}),
    ("strategy", {"type": "canary", "steps": ["1"] * (MAX_STEPS + 1)}),
    ("strategy", {"type": "canary", "interval": "0"}),
    ("strategy", {"type": "canary", "interval": "5x"}),
    ("strategy", {"type": "canary", "interval": "8d"}),
    ("strategy", {"max_surge": "25%", "k\x00": "1", "1bad": "2"}),
    ("strategy", {"big": "x" * (MAX_PARAM_BYTES + 1)}),
    ("on_failure", "rollback"),
    ("on_failure", "x"),
    ("on_failure", None),
    ("on_failure", 3),
    ("depends_on", None),
    ("depends_on", "staging"),
    ("depends_on", ["staging"]),
    ("depends_on", ["staging", "staging", "production", "qa"]),
    ("depends_on", ["Bad"]),
    ("depends_on", [None, 1]),
    ("depends_on", {"staging": "1"}),
    ("windows", None),
    ("windows", {}),
    ("windows", "0 9 * * *"),
    ("windows", [None]),
    ("windows", ["x"]),
    ("windows", [{"cron": "0 9 * * mon-fri", "duration": "8h"}]),
    ("windows", [{"cron": "0 9 * * *", "duration": "1h", "timezone": "Europe/Paris"}]),
    ("windows", [{"cron": "bad", "duration": "8h"}]),
    ("windows", [{"cron": "0 9 * *", "duration": "8h"}]),
    ("windows", [{"cron": "99 9 * * *", "duration": "1h"}]),
    ("windows", [{"cron": None, "duration": "1h"}]),
    ("windows", [{"cron": "0 9 * * *", "duration": "0"}]),
    ("windows", [{"cron": "0 9 * * *", "duration": "400d"}]),
    ("windows", [{"cron": "0 9 * * *", "duration": True}]),
    ("windows", [{"duration": "1h"}]),
    ("windows", [{"cron": "0 9 * * *"}]),
    ("windows", [{"cron": "0 9 * * *", "duration": "1h", "days": "mon"}]),
    ("windows", [{"cron": "0 9 * * *", "duration": "1h", "timezone": "Nowhere/X"}]),
    ("windows", [{"cron": "0 9 * * *", "duration": "1h", "timezone": None}]),
    ("windows", [{"cron": "0 9 * * *", "duration": "1h", "timezone": 5}]),
    ("suspended", "true"),
    ("suspended", "false"),
    ("suspended", True),
    ("suspended", "yes"),
    ("suspended", "True"),
    ("suspended", None),
    ("suspended", 1),
    ("self_heal", "true"),
    ("self_heal", "on"),
    ("self_heal", ["true"]),
    ("foo", "1"),
    ("", "1"),
]


def changed(key: str, value: Any) -> Any:
    doc = copy.deepcopy(BASE)
    if value is _MISSING:
        doc.pop(key)
    else:
        doc[key] = value
    return doc


DOCUMENTS: list[Any] = [
    BASE,
    *(changed(key, value) for key, value in CHANGES),
    {},
    None,
    "environment: x",
    ["environment"],
    {"environment": "Prod", "provider": "", "services": {}, "timeout": "x", "bar": None},
]


def plain(value: Any) -> Any:
    """A model or a record as comparable data: class name, fields, extra keys, fields set."""
    if hasattr(value, "__pydantic_fields_set__"):
        return (
            type(value).__name__,
            plain(value.__dict__),
            plain(value.__pydantic_extra__),
            sorted(value.__pydantic_fields_set__),
        )
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def outcome(validate: Any, document: Any) -> tuple[str, Any]:
    try:
        return ("valid", plain(validate(document)))
    except ValidationError as exc:
        return ("errors", exc.errors(include_url=False))


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: repr(d)[:60])
def test_the_same_errors_and_values_as_the_models(document):
    expected = outcome(EnvironmentSpec.model_validate, document)
    assert outcome(VALIDATOR.validate_python, document) == expected


def test_the_documents_cover_every_kind_of_outcome():
    kinds = set()
    valid = 0
    for document in DOCUMENTS:
        status, found = outcome(EnvironmentSpec.model_validate, document)
        if status == "valid":
            valid += 1
        else:
            kinds.update(error["type"] for error in found)
    assert valid >= 20
    assert {
        "missing",
        "extra_forbidden",
        "string_type",
        "too_short",
        "dict_type",
        "model_type",
        "list_type",
        "literal_error",
        "environment_name",
        "service_name",
        "version",
        "duration",
        "params",
        "strategy",
        "depends_on",
        "cron",
        "timezone",
        "boolean",
    } <= kinds


TEXTS = [
    SPEC_EXAMPLE,
    """\
    environment: Prod
    provider: ""
    services:
      api:
        version: 1 2
        params:
          "1bad": x
          a-b: "1"
          a_b: "2"
      web: 3
    timeout: 8d
    strategy: {type: canary, steps: [10, x, 101], interval: 5x}
    depends_on: [prod, prod, Bad]
    windows:
      - cron: "0 9 * *"
        duration: 0
        timezone: Nowhere/X
      - {cron: "0 9 * * *", duration: 1h, extra: 1}
    suspended: yes
    foo: 1
    """,
    """\
    environment: qa
    provider: p
    services: {}
    depends_on: [qa]
    """,
]


@pytest.mark.parametrize("text", TEXTS)
def test_the_loader_reports_the_same_file_errors(text):
    data = textwrap.dedent(text)
    with_models = parse_environment_file("env.yaml", data)
    format_only = parse_environment_file("env.yaml", data, format_only=True)
    assert [str(e) for e in format_only.errors] == [str(e) for e in with_models.errors]
    assert plain(format_only.environment) == plain(with_models.environment)
    assert format_only.env_name == with_models.env_name


def test_the_examples_give_the_same_values():
    files = sorted((ROOT / "examples").rglob("*.yaml"))
    assert files
    for file in files:
        data = file.read_bytes()
        with_models = parse_environment_file(str(file), data)
        format_only = parse_environment_file(str(file), data, format_only=True)
        assert [str(e) for e in format_only.errors] == [str(e) for e in with_models.errors]
        assert plain(format_only.environment) == plain(with_models.environment)


def pydantic_modules(modules: set[str]) -> set[str]:
    return {m for m in modules if m == "pydantic" or m.startswith("pydantic.")}


def test_validate_dir_imports_pydantic_core_but_not_pydantic(tmp_path: Path):
    modules = run_listing_modules("validate", str(ROOT / "examples" / "desired-state"))
    assert "desired_state.format_schema" in modules  # it did check the files
    assert "pydantic_core._pydantic_core" in modules
    assert not pydantic_modules(modules)
    assert "importlib.metadata" not in modules
    # the compiled module alone, not the package's TypedDicts (desired_state/_core.py)
    assert "pydantic_core.core_schema" not in modules


def test_validate_dir_with_errors_imports_no_pydantic_either(tmp_path: Path):
    (tmp_path / "bad.yaml").write_text(textwrap.dedent(TEXTS[1]), encoding="utf-8")
    modules = run_listing_modules("validate", str(tmp_path))
    assert "desired_state.format_schema" in modules
    assert not pydantic_modules(modules)


PYDANTIC_AFTER_THE_FORMAT = """
import sys
from desired_state.format_schema import VALIDATOR
from desired_state import _core
assert "pydantic_core.core_schema" not in sys.modules, "the package ran at once"
import pydantic_core
from pydantic import BaseModel
from desired_state.models import EnvironmentSpec
assert pydantic_core.ValidationError is _core.ValidationError
assert pydantic_core.PydanticCustomError is _core.PydanticCustomError
assert pydantic_core._pydantic_core is sys.modules["pydantic_core._pydantic_core"]
bad = {"environment": "Prod", "provider": "p", "services": {"api": {"version": "1 2"}}}
found = []
for validate in (VALIDATOR.validate_python, EnvironmentSpec.model_validate):
    try:
        validate(bad)
    except pydantic_core.ValidationError as exc:
        found.append(exc.errors(include_url=False))
assert len(found) == 2 and found[0] == found[1] and len(found[0]) == 2, found
print("ok")
"""


def test_pydantic_works_after_the_format_loaded_pydantic_core_alone():
    """The format's checks load pydantic-core's compiled module without its package; a
    process that then uses Pydantic (or pydantic_core) gets the same classes."""
    out = subprocess.run(
        [sys.executable, "-c", PYDANTIC_AFTER_THE_FORMAT],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
