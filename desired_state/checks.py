"""The checks of the desired-state format, without Pydantic: its models
(:mod:`.models`) and the generated core schema that `validate DIR` runs with
pydantic-core alone (:mod:`.format_schema`) call the same functions, so both report the
same errors with the same messages.

Errors are :class:`pydantic_core.PydanticCustomError`: the loader maps them to
``file:line:col`` whichever validator raised them.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from ._core import PydanticCustomError
from .durations import format_duration, parse_duration

if TYPE_CHECKING:
    from pydantic_core.core_schema import ValidationInfo

NAME_RE = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
SERVICE_RE = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$"
VERSION_RE = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$"

NAME = re.compile(NAME_RE)
_SERVICE = re.compile(SERVICE_RE)
_VERSION = re.compile(VERSION_RE)

DURATION_PATTERN = r"^([0-9]+|([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?)$"

STRATEGY_TYPES = ("rolling", "blue_green", "canary")

# Bounds of every value that reaches a clock, a process or the database (SPEC §2).
MAX_TIMEOUT = 7 * 86400  # a deployment's deadline: at most 7 days
MAX_WINDOW = 366 * 86400  # a window open longer than a year is always open
MAX_STEPS = 100  # strategy steps: percentages, so at most one per percent
# Params reach a provider as text: for `command` one environment variable each
# (RECONCILER_PARAM_<KEY>, SPEC §6), where Linux caps one variable at 128 KiB and all of
# them together at about 2 MiB. These bounds keep every deployable file deployable.
PARAM_KEY_RE = r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$"
MAX_PARAM_BYTES = 32 * 1024  # one param, as the provider receives it (text or JSON)
MAX_PARAMS_BYTES = 128 * 1024  # all params of one service together
MAX_PARAM_DEPTH = 8  # nested mappings and lists inside one param
MAX_NESTED_KEY = 256  # a key inside a param's mapping (e.g. docker `env` names)
_PARAM_KEY = re.compile(PARAM_KEY_RE)
_QUOTE_MAX = 60  # how much of a user's value a message quotes


def error(kind: str, message: str, **ctx: Any) -> PydanticCustomError:
    # The message travels in the context so that braces in user text are never a template.
    return PydanticCustomError(kind, "{message}", {"message": message, **ctx})


def _quote(value: object) -> str:
    """``'value'``, cut short: a message names a value, it does not reproduce it."""
    text = str(value)
    if len(text) > _QUOTE_MAX:
        text = text[:_QUOTE_MAX] + "..."
    return f"'{text}'"


def _describe(value: object) -> str:
    if value is None:
        return "an empty value"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return _quote(value)


# --- field types -------------------------------------------------------------------------


def check_env_name(value: str) -> str:
    if NAME.fullmatch(value) is None:
        raise error(
            "environment_name",
            f"{_quote(value)} is not a valid environment name: use lowercase letters, digits and -"
            " (at most 63, starting and ending with a letter or digit)",
        )
    return value


def check_service_name(value: str) -> str:
    if _SERVICE.fullmatch(value) is None:
        raise error(
            "service_name",
            f"{_quote(value)} is not a valid service name: use letters, digits and . _ -"
            " (at most 63, starting and ending with a letter or digit)",
        )
    return value


def check_version(value: str) -> str:
    if _VERSION.fullmatch(value) is None:
        if len(value) > 128:
            raise error("version", f"{_quote(value)} is too long for a version: at most 128")
        raise error(
            "version", f"{_quote(value)} is not a valid version: use letters, digits and . _ + -"
        )
    return value


def to_seconds(value: Any, maximum: int, *, zero: bool = False) -> int:
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise error(
            "duration",
            f"expected a duration (seconds or 90s / 30m / 2h), got {_describe(value)}",
        )
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise error("duration", str(exc)) from None
    if seconds < 0 or (seconds == 0 and not zero):
        raise error("duration", f"bad duration {_quote(value)}: must be longer than 0 seconds")
    if seconds > maximum:
        raise error("duration", f"bad duration {_quote(value)}: at most {format_duration(maximum)}")
    return seconds


# --- params ------------------------------------------------------------------------------

Problem = tuple[tuple[str | int, ...], str, bool]  # (path below the field, message, at the key)


def _text_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _value_problems(value: Any, path: tuple[str | int, ...], depth: int, out: list[Problem]) -> int:
    """Problems of one param value (NUL, depth, nested keys); returns its size as JSON."""
    if isinstance(value, str):
        if "\x00" in value:
            out.append((path, "contains a NUL character, which no provider can receive", False))
        return _text_size(value) + 2
    if value is None or isinstance(value, bool | int | float):
        return len(json.dumps(value))
    if depth >= MAX_PARAM_DEPTH:
        out.append((path, f"nested deeper than {MAX_PARAM_DEPTH} levels", False))
        return 0
    size = 2
    if isinstance(value, dict):
        for key, item in value.items():
            key = str(key)
            if "\x00" in key or len(key) > MAX_NESTED_KEY:
                problem = "contains a NUL character" if "\x00" in key else "is too long"
                out.append(((*path, key), f"this key {problem}", True))
            size += _text_size(key) + 4 + _value_problems(item, (*path, key), depth + 1, out)
            if size > MAX_PARAMS_BYTES:
                break
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            size += 1 + _value_problems(item, (*path, index), depth + 1, out)
            if size > MAX_PARAMS_BYTES:
                break
    else:
        return len(str(value))
    return size


def param_problems(params: dict[str, Any], env_names: bool, most: int) -> list[Problem]:
    """Every reason why ``params`` could not reach a provider. ``env_names``: each key
    becomes an environment variable name (service params, SPEC §6); ``most``: bytes in all."""
    out: list[Problem] = []
    total = 2
    variables: dict[str, str] = {}
    for key, value in params.items():
        key = str(key)
        if _PARAM_KEY.fullmatch(key) is None:
            out.append(
                (
                    (key,),
                    f"{_quote(key)} is not a valid param name: use letters, digits, _ and -"
                    " (at most 64, not starting with a digit or -)",
                    True,
                )
            )
            continue
        variable = _variable(key)
        if env_names:
            other = variables.setdefault(variable, key)
            if other != key:
                out.append(
                    (
                        (key,),
                        f"'{key}' and '{other}' would both be RECONCILER_PARAM_{variable}",
                        True,
                    )
                )
        if value.__class__ is str and "\x00" not in value:  # the common case, inline
            size = _text_size(value)
        else:
            size = _value_problems(value, (key,), 0, out)
        if size > MAX_PARAM_BYTES:
            out.append(((key,), f"too large: {size} bytes, at most {MAX_PARAM_BYTES}", False))
        total += _text_size(key) + 4 + size
    if total > most:
        out.append(((), f"too large: {total} bytes in all, at most {most}", False))
    return out


def _raise_problems(kind: str, problems: list[Problem]) -> None:
    if problems:
        # One error for pydantic; the loader reports each problem at its own position.
        raise error(kind, problems[0][1], problems=problems)


# Valid param keys seen so far whose RECONCILER_PARAM_ name no other key seen shares. Keys
# repeat across services and files: this keeps the check out of a large load's time.
_KNOWN_KEYS: set[str] = set()
_KEY_OF_VARIABLE: dict[str, str] = {}


def _variable(key: str) -> str:
    variable = key.upper().replace("-", "_")
    if len(_KEY_OF_VARIABLE) < 10_000:
        other = _KEY_OF_VARIABLE.setdefault(variable, key)
        if other == key:
            _KNOWN_KEYS.add(key)
        else:
            _KNOWN_KEYS.discard(other)
    return variable


def _plainly_fine(params: dict[str, Any]) -> bool:
    """The common case at a glance: known keys with plain text, short in all.

    True implies :func:`param_problems` finds nothing (the size bound here is stricter)."""
    known = _KNOWN_KEYS
    size = 0
    for key, value in params.items():
        if key not in known or value.__class__ is not str or not value.isascii():
            return False
        if "\x00" in value:
            return False
        size += len(key) + len(value)
    return size <= MAX_PARAM_BYTES


def check_params(value: dict[str, Any]) -> dict[str, Any]:
    if value and not _plainly_fine(value):
        _raise_problems("params", param_problems(value, env_names=True, most=MAX_PARAMS_BYTES))
    return value


def text_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value == "true":
        return True
    if value == "false":
        return False
    raise error("boolean", f"expected true or false, got {_describe(value)}")


@lru_cache(maxsize=256)
def _cron_problem(expr: str) -> str | None:
    from croniter import croniter

    if len(expr.split()) != 5:
        return (
            f"'{expr}' is not a cron expression of 5 fields"
            " (minute hour day-of-month month day-of-week)"
        )
    try:
        croniter(expr)
    except Exception as exc:  # croniter raises several kinds, all "bad expression"
        detail = ": out of range" if "out of range" in str(exc) else ""
        return f"'{expr}' is not a valid cron expression{detail}"
    return None


def check_cron(value: str) -> str:
    problem = _cron_problem(value)
    if problem is not None:
        raise error("cron", problem)
    return value


@lru_cache(maxsize=256)
def _timezone_ok(name: str) -> bool:
    import zoneinfo  # only for a file with a window's timezone

    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


def check_timezone(value: str | None) -> str | None:
    if value is not None and not _timezone_ok(value):
        raise error("timezone", f"unknown timezone '{value}': use an IANA name like Europe/Paris")
    return value


# --- field and model validators with fixed arguments: the core schema names them --------


def timeout_seconds(value: Any) -> int:
    """A deployment's deadline: a duration of at most :data:`MAX_TIMEOUT`."""
    return to_seconds(value, MAX_TIMEOUT)


def window_seconds(value: Any) -> int:
    """How long a window stays open: a duration of at most :data:`MAX_WINDOW`."""
    return to_seconds(value, MAX_WINDOW)


def none_as_dict(value: Any) -> Any:
    """An empty YAML value (``params:`` with every line commented out) means the default."""
    return {} if value is None else value


def none_as_list(value: Any) -> Any:
    """An empty YAML value (``windows:``) means no item."""
    return [] if value is None else value


def check_strategy(strategy: Any) -> Any:
    """The strategy's parameters (its extra keys) are bounded like one param: all of them
    travel as one value (RECONCILER_STRATEGY, JSON). ``strategy`` is the model, or the
    record of the generated schema: either has its extra keys in ``__pydantic_extra__``."""
    extra: dict[str, Any] | None = strategy.__pydantic_extra__
    if extra:
        problems = param_problems(extra, env_names=False, most=MAX_PARAM_BYTES)
        if "steps" in extra:
            problems += steps_problems(extra["steps"])
        if "interval" in extra:
            try:
                # a pause between steps: none at all is a valid choice
                to_seconds(extra["interval"], MAX_TIMEOUT, zero=True)
            except PydanticCustomError as exc:
                problems.append((("interval",), str(exc), False))
        _raise_problems("strategy", problems)
    return strategy


def steps_problems(steps: Any) -> list[Problem]:
    """``steps``: percentages of the rollout, e.g. ``[10, 50, 100]`` (kept as written)."""
    if not isinstance(steps, list) or not steps or len(steps) > MAX_STEPS:
        return [
            (
                ("steps",),
                f"expected a list of 1 to {MAX_STEPS} percentages, got {_describe_list(steps)}",
                False,
            )
        ]
    out: list[Problem] = []
    for index, step in enumerate(steps):
        text = str(step) if isinstance(step, int | str) and not isinstance(step, bool) else ""
        if not (text.isascii() and text.isdigit() and len(text) <= 3 and int(text) <= 100):
            out.append(
                (("steps", index), f"expected a percentage 0-100, got {_describe(step)}", False)
            )
    return out


def _describe_list(value: Any) -> str:
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return _describe(value)


def check_depends_on(value: list[str], info: ValidationInfo) -> list[str]:
    """No environment depends on itself, none is listed twice."""
    own = info.data.get("environment")
    seen: set[str] = set()
    problems: list[tuple[int, str]] = []
    for index, name in enumerate(value):
        if name == own:
            problems.append((index, f"'{name}' cannot depend on itself"))
        elif name in seen:
            problems.append((index, f"'{name}' is listed twice"))
        seen.add(name)
    if problems:
        # One error for pydantic; the loader reports each item at its own position.
        raise error("depends_on", problems[0][1], index=problems[0][0], items=problems)
    return value
