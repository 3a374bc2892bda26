"""Writes desired_state/format_schema.py: the models' core schema as Python literals, so
that checking the format (`reconciler validate DIR`, a pre-commit hook) needs pydantic-core
but not Pydantic, whose import and model building cost more than the whole start-up budget.

The schema is :attr:`EnvironmentSpec.__pydantic_core_schema__` with:

- each model class replaced by a plain record class of the same name (pydantic-core only
  sets ``__dict__`` and the ``__pydantic_*__`` attributes on it);
- metadata, references and JSON-Schema parts dropped (validation never reads them);
- every validator function named from :mod:`.checks`, which the models use as well: a
  function from anywhere else stops the generation;
- :meth:`Service._shared` (a wrap validator that makes equal services one object to save
  a daemon's memory) left out: it changes neither errors nor values.

    .venv/bin/python scripts/gen_format_schema.py           # rewrite the file
    .venv/bin/python scripts/gen_format_schema.py --check   # exit 1 if it is stale
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import FunctionType
from typing import Any

from pydantic import BaseModel

from . import checks
from .models import EnvironmentSpec, Service

__all__ = ["OUTPUT", "render"]

OUTPUT = Path(__file__).with_name("format_schema.py")

_DROPPED_KEYS = frozenset({"metadata", "ref", "serialization"})
#: wrap validators left out, by the function they run (see the module's docstring)
_DROPPED_WRAPS = {Service._shared.__func__: "Service._shared"}
_WIDTH = 100


class _Name:
    """A Python name in the generated text (a function or a record class), not a string."""

    def __init__(self, name: str) -> None:
        self.name = name


class _Walk:
    def __init__(self) -> None:
        self.functions: set[str] = set()
        self.models: dict[str, type[BaseModel]] = {}
        self.defaults: dict[str, type[BaseModel]] = {}

    def function(self, func: Any) -> _Name:
        name = getattr(func, "__name__", "")
        if not isinstance(func, FunctionType) or getattr(checks, name, None) is not func:
            raise SystemExit(
                f"{func!r} is not a function of desired_state/checks.py: the generated schema"
                " can only name those (move its logic there, and let the model call it)"
            )
        self.functions.add(name)
        return _Name(name)

    def model_class(self, cls: Any) -> _Name:
        assert isinstance(cls, type) and issubclass(cls, BaseModel), cls
        known = self.models.setdefault(cls.__name__, cls)
        assert known is cls, f"two models named {cls.__name__}"
        return _Name(cls.__name__)

    def schema(self, node: Any) -> Any:
        if isinstance(node, list | tuple):
            return [self.schema(item) for item in node]
        if not isinstance(node, dict):
            assert node is None or isinstance(node, str | int | float | bool), node
            return node
        if node.get("type") == "function-wrap":
            func = node["function"]["function"]
            if getattr(func, "__func__", func) in _DROPPED_WRAPS:
                return self.schema(node["schema"])
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _DROPPED_KEYS:
                continue
            if key == "cls":
                out[key] = self.model_class(value)
            elif key == "function" and not isinstance(value, dict):
                out[key] = self.function(value)
            elif key == "default_factory":
                out[key] = self.default_factory(value)
            else:
                out[key] = self.schema(value)
        return out

    def default_factory(self, factory: Any) -> _Name:
        if factory in (list, dict):
            return _Name(factory.__name__)
        if isinstance(factory, type) and issubclass(factory, BaseModel):
            self.model_class(factory)
            name = f"_default_{factory.__name__.lower()}"
            self.defaults[name] = factory
            return _Name(name)
        return self.function(factory)


def _literal(value: Any, indent: int) -> str:
    """``value`` as Python text: on one line when it fits, else one item per line."""
    if isinstance(value, _Name):
        return value.name
    if isinstance(value, dict):
        items = [f"{key!r}: {_literal(item, indent + 4)}" for key, item in value.items()]
        opening, closing = "{", "}"
    elif isinstance(value, list):
        items = [_literal(item, indent + 4) for item in value]
        opening, closing = "[", "]"
    else:
        return repr(value)
    flat = opening + ", ".join(items) + closing
    if "\n" not in flat and indent + len(flat) <= _WIDTH - 10:
        return flat
    pad = " " * (indent + 4)
    return opening + "\n" + "".join(f"{pad}{item},\n" for item in items) + " " * indent + closing


def _record_class(model: type[BaseModel]) -> list[str]:
    doc = (model.__doc__ or "").strip().split("\n")[0]
    fields = textwrap.wrap(f"Fields: {', '.join(model.model_fields)}.", _WIDTH - 8)
    return [
        "",
        "",
        f"class {model.__name__}(_Record):",
        f'    """{doc}',
        "",
        *(f"    {line}" for line in fields),
        '    """',
        "",
        "    __slots__ = ()",
    ]


def _default(name: str, model: type[BaseModel]) -> list[str]:
    made = model()
    return [
        f"def {name}() -> {model.__name__}:",
        f"    record = {model.__name__}()",
        f"    record.__dict__ = {made.__dict__!r}",
        f"    record.__pydantic_extra__ = {made.__pydantic_extra__!r}",
        f"    record.__pydantic_fields_set__ = {made.__pydantic_fields_set__!r}",
        f"    record.__pydantic_private__ = {made.__pydantic_private__!r}",
        "    return record",
        "",
        "",
    ]


def render() -> str:
    """The text of `format_schema.py`."""
    walk = _Walk()
    schema = walk.schema(EnvironmentSpec.__pydantic_core_schema__)
    lines = [
        '"""Generated by scripts/gen_format_schema.py from the models (desired_state/models.py):',
        "do not edit; run it after changing a model or a check.",
        "",
        "The core schema of one environment file, validated by pydantic-core alone: the models'",
        "own schema, with plain records in place of the model classes (same names, same fields,",
        "no methods) and the same check functions (checks.py), so that it reports the same",
        "errors. :data:`VALIDATOR` ``.validate_python(data)`` gives an :class:`EnvironmentSpec`",
        'record or raises :class:`pydantic_core.ValidationError`."""',
        "",
        "from __future__ import annotations",
        "",
        "from typing import Any",
        "",
        "from ._core import SchemaValidator",
        "from .checks import (",
        *(f"    {name}," for name in sorted(walk.functions)),
        ")",
        "",
        '__all__ = ["SCHEMA", "VALIDATOR", ' + ", ".join(f'"{n}"' for n in walk.models) + "]",
        "",
        "",
        "class _Record:",
        '    """What pydantic-core sets on an instance of a model class: nothing else."""',
        "",
        "    __slots__ = (",
        '        "__dict__",',
        '        "__pydantic_extra__",',
        '        "__pydantic_fields_set__",',
        '        "__pydantic_private__",',
        "    )",
        "    __pydantic_extra__: dict[str, Any] | None",
        "    __pydantic_fields_set__: set[str]",
        "    __pydantic_private__: dict[str, Any] | None",
    ]
    for model in walk.models.values():
        lines.extend(_record_class(model))
    lines.extend(["", "", "# fmt: off"])
    for name, model in walk.defaults.items():
        lines.extend(_default(name, model))
    lines.extend(
        [
            f"SCHEMA: dict[str, Any] = {_literal(schema, 0)}",
            "# fmt: on",
            "",
            "VALIDATOR = SchemaValidator(SCHEMA)",
        ]
    )
    return "\n".join(lines) + "\n"
