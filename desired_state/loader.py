"""Reading environment files and assembling the desired state of a whole repository."""

from __future__ import annotations

import gc
import os
import stat
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, cast

from yaml.nodes import Node, SequenceNode

from ._core import ValidationError
from .checks import NAME
from .errors import FileError
from .yamltext import compose, describe, find_key, locate, position

if TYPE_CHECKING:
    from .models import EnvironmentSpec

__all__ = [
    "DesiredState",
    "ParsedFile",
    "SpecCheck",
    "assemble",
    "is_environment_file",
    "load_directory",
    "load_files",
    "parse_environment_file",
]

_EXTENSIONS = (".yaml", ".yml")
# One environment file is a few KiB; a bigger one is a mistake, never read in full.
MAX_FILE_BYTES = 1024 * 1024

# A check from outside the format (the daemon's providers: params, strategy), run on a file
# whose schema passed. It returns ``(key path, message)`` pairs; the loader places each at
# its node's line and column (a path ending in "[key]" points at the key itself, as for
# an unknown key). desired_state stays ignorant of who checks.
SpecCheck: TypeAlias = "Callable[[EnvironmentSpec], Iterable[tuple[Sequence[str | int], str]]]"


@dataclass
class ParsedFile:
    """One environment file, read and checked on its own."""

    path: str
    environment: EnvironmentSpec | None
    errors: list[FileError]
    env_name: str | None
    # (line, col) of nodes the cross-file checks point at: "environment", "provider",
    # "depends_on", "depends_on.<i>". Filled for files that parsed.
    _positions: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False, compare=False)

    def position_of(self, key: str) -> tuple[int, int]:
        return self._positions.get(key) or self._positions.get(key.split(".")[0]) or (1, 1)


def is_environment_file(relpath: str) -> bool:
    """``*.yaml`` / ``*.yml``, with no path component starting with ``.``."""
    parts = relpath.replace("\\", "/").split("/")
    if not parts[-1].endswith(_EXTENSIONS):
        return False
    return not any(part.startswith(".") for part in parts if part not in (".", ".."))


# --- one file ----------------------------------------------------------------------------


def _message(err: Any) -> tuple[str, str]:
    """A short human message for one pydantic error, and which node it is about:
    ``"value"`` (the offending value), ``"key"`` (the key itself), ``"parent"`` (the
    mapping that lacks a key)."""
    kind: str = err["type"]
    ctx: dict[str, Any] = err.get("ctx") or {}
    value = err.get("input")
    loc = err["loc"]
    if "message" in ctx:  # our own errors (checks.error)
        return str(ctx["message"]), "value"
    if kind == "missing":
        return "required key missing", "parent"
    if kind == "extra_forbidden":
        return f"unknown key '{loc[-1]}'", "key"
    if kind == "string_type":
        if value is None:
            return "a value is required", "value"
        return f"expected text, got {describe(value)}", "value"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping, got {describe(value)}", "value"
    if kind == "list_type":
        return f"expected a list, got {describe(value)}", "value"
    if kind == "literal_error":
        expected = ctx.get("expected", "")
        if isinstance(value, str):
            return f"'{value}' is not one of {expected}", "value"
        return f"expected one of {expected}, got {describe(value)}", "value"
    if kind == "too_short":
        if loc == ("services",):
            return "at least one service is required", "value"
        return "must not be empty", "value"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"])), "value"
    return str(err["msg"]), "value"


def _pydantic_errors(path: str, root: Node, exc: ValidationError) -> list[FileError]:
    out: list[FileError] = []
    for err in exc.errors(include_url=False):
        loc: tuple[str | int, ...] = tuple(err["loc"])
        message, where = _message(err)
        ctx = err.get("ctx") or {}
        items = ctx.get("items")
        if isinstance(items, list):  # several errors about items of one list
            for index, item_message in items:
                node, _found = locate(root, (*loc, index))
                line, col = position(node)
                out.append(FileError(path, line, col, _dotted((*loc, index)), item_message))
            continue
        problems = ctx.get("problems")
        if isinstance(problems, list):  # several errors below one field (models.Problem)
            for below, problem, on_key in problems:
                node, _found = locate(root, (*loc, *below), key=on_key)
                line, col = position(node)
                out.append(FileError(path, line, col, _dotted((*loc, *below)), problem))
            continue
        if loc and loc[-1] == "[key]":
            loc = loc[:-1]
            where = "key"
        node, _found = locate(root, loc, key=where == "key")
        line, col = position(node)
        out.append(FileError(path, line, col, _dotted(loc), message))
    return out


def _dotted(loc: tuple[str | int, ...]) -> str:
    return ".".join(map(str, loc))


def _read_env_name(data: Any) -> str | None:
    if isinstance(data, dict):
        name = data.get("environment")
        if isinstance(name, str) and NAME.fullmatch(name):
            return name
    return None


def _positions(root: Node) -> dict[str, tuple[int, int]]:
    found: dict[str, tuple[int, int]] = {}
    for key in ("environment", "provider", "depends_on"):
        pair = find_key(root, key)
        if pair is None:
            continue
        found[key] = position(pair[1])
        if key == "depends_on" and isinstance(pair[1], SequenceNode):
            for i, item in enumerate(pair[1].value):
                found[f"depends_on.{i}"] = position(item)
    return found


_VALIDATE: dict[bool, Callable[[Any], Any]] = {}


def _validator(format_only: bool) -> Callable[[Any], Any]:
    """The models' validation, or (``format_only``) the generated schema's, which needs
    pydantic-core but not Pydantic: imported at the first file, whichever is asked for."""
    found = _VALIDATE.get(format_only)
    if found is None:
        if format_only:
            from .format_schema import VALIDATOR

            found = _VALIDATE[format_only] = VALIDATOR.validate_python
        else:
            from .models import EnvironmentSpec

            found = _VALIDATE[format_only] = EnvironmentSpec.model_validate
    return found


def parse_environment_file(
    path: str, data: bytes | str, check: SpecCheck | None = None, *, format_only: bool = False
) -> ParsedFile:
    """Read one environment file. Never raises on bad content: errors are returned.

    `check` adds the errors of the provider the file names (its params and strategy).
    `format_only`: check the format without Pydantic (a start-up of a command that only
    reports errors, like `validate DIR`): the same errors, but the environment is a plain
    record of :mod:`.format_schema` with the model's fields and none of its methods."""
    assert check is None or not format_only, "a provider's check needs the models"
    if len(data) > MAX_FILE_BYTES:
        return ParsedFile(path, None, [_too_large(path)], None)
    doc = compose(path, data)
    root = doc.root
    errors = doc.errors
    env_name = _read_env_name(doc.data)
    if root is None:
        if not errors:
            errors.append(
                FileError(
                    path,
                    1,
                    1,
                    "",
                    "empty file: expected an environment (environment:, provider:, services:)",
                )
            )
        return ParsedFile(path, None, errors, env_name)
    if not isinstance(doc.data, dict):
        line, col = position(root)
        kind = "an empty document" if doc.data is None else describe(doc.data)
        errors.append(
            FileError(
                path,
                line,
                col,
                "",
                f"expected a mapping (environment:, provider:, services:), got {kind}",
            )
        )
        return ParsedFile(path, None, errors, env_name)
    positions = _positions(root)
    spec: EnvironmentSpec | None = None
    try:
        # a record with the model's fields when format_only (see the docstring)
        spec = cast("EnvironmentSpec", _validator(format_only)(doc.data))
    except ValidationError as exc:
        errors.extend(_pydantic_errors(path, root, exc))
    if spec is not None and check is not None:
        for loc, message in check(spec):
            where = tuple(loc)
            on_key = bool(where) and where[-1] == "[key]"  # about the key, not its value
            where = where[:-1] if on_key else where
            node, _found = locate(root, where, key=on_key)
            line, col = position(node)
            errors.append(FileError(path, line, col, _dotted(where), message))
    if errors:
        errors.sort(key=FileError.sort_key)
        return ParsedFile(path, None, errors, env_name, positions)
    return ParsedFile(path, spec, errors, env_name, positions)


# --- the whole repository ----------------------------------------------------------------


@dataclass
class DesiredState:
    """Every environment of one commit (or folder), and every error."""

    environments: dict[str, EnvironmentSpec]
    sources: dict[str, str]
    errors: list[FileError]
    invalid: dict[str, list[FileError]]
    broken_files: dict[str, list[FileError]]

    @property
    def ok(self) -> bool:
        return not self.errors


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []
    counter = 0
    for start in graph:
        # A node without edges is a component of its own: never a cycle's start.
        if start in index or not graph[start]:
            continue
        work: list[tuple[str, int]] = [(start, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            edges = graph.get(node, [])
            if i < len(edges):
                work.append((node, i + 1))
                nxt = edges[i]
                if nxt not in graph:
                    continue
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    result.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return result


def _cycle_path(graph: dict[str, list[str]], start: str, members: set[str]) -> list[str]:
    """The shortest cycle through ``start`` inside ``members``: [start, ..., start]."""
    previous: dict[str, str] = {}
    queue = [start]
    seen = {start}
    while queue:
        node = queue.pop(0)
        for nxt in graph.get(node, []):
            if nxt not in members:
                continue
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if nxt not in seen:
                seen.add(nxt)
                previous[nxt] = node
                queue.append(nxt)
    return [start, start]  # pragma: no cover - start is in a cycle


def assemble(
    parsed: Iterable[ParsedFile], providers: Collection[str] | None = None
) -> DesiredState:
    """Cross-file checks over every parsed file of one repository.

    A failing file (or a failed cross-file check) removes only its own environment.
    """
    files = sorted(parsed, key=lambda p: p.path)
    # Only the files with errors: an incremental sync assembles 10,000 files for one change.
    errors_by_file: dict[str, list[FileError]] = {p.path: list(p.errors) for p in files if p.errors}
    first_file: dict[str, str] = {}
    declared: set[str] = set()
    ambiguous: set[str] = set()
    candidates: dict[str, ParsedFile] = {}

    def fail(p: ParsedFile, key: str, path: str, message: str) -> None:
        line, col = p.position_of(key)
        errors_by_file.setdefault(p.path, []).append(FileError(p.path, line, col, path, message))

    for p in files:
        name = p.env_name if p.environment is None else p.environment.environment
        if name is None:
            continue
        declared.add(name)
        if name in first_file:
            ambiguous.add(name)
            other = first_file[name]
            fail(
                p, "environment", "environment", f"environment '{name}' is also declared in {other}"
            )
            continue
        first_file[name] = p.path
        if p.environment is not None:
            candidates[name] = p

    failed: set[str] = set(ambiguous)
    provider_list = ", ".join(sorted(providers)) if providers is not None else ""
    graph: dict[str, list[str]] = {}
    for name, p in candidates.items():
        spec = p.environment
        assert spec is not None
        if providers is not None and spec.provider not in providers:
            fail(
                p,
                "provider",
                "provider",
                f"unknown provider '{spec.provider}' (declared: {provider_list or 'none'})",
            )
            failed.add(name)
        for i, dep in enumerate(spec.depends_on):
            if dep not in declared:
                import difflib  # only for a mistake: not in every start-up

                close = difflib.get_close_matches(dep, sorted(declared), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                fail(
                    p,
                    f"depends_on.{i}",
                    f"depends_on.{i}",
                    f"depends on '{dep}', which no file declares{hint}",
                )
                failed.add(name)
        graph[name] = list(spec.depends_on)

    for component in _cycles(graph):
        members = set(component)
        for name in component:
            p = candidates[name]
            assert p.environment is not None
            cycle = _cycle_path(graph, name, members)
            i = p.environment.depends_on.index(cycle[1])
            fail(p, f"depends_on.{i}", f"depends_on.{i}", "dependency cycle: " + " -> ".join(cycle))
            failed.add(name)

    environments: dict[str, EnvironmentSpec] = {}
    sources: dict[str, str] = {}
    invalid: dict[str, list[FileError]] = {}
    broken: dict[str, list[FileError]] = {}
    all_errors: list[FileError] = []
    for p in files:
        found = errors_by_file.get(p.path)
        errs = sorted(found, key=FileError.sort_key) if found else []
        name = p.env_name if p.environment is None else p.environment.environment
        if errs:
            broken[p.path] = errs
            all_errors.extend(errs)
        if name is None:
            continue
        sources.setdefault(name, p.path)
        if errs or name in failed:
            invalid.setdefault(name, []).extend(errs)
        elif p.environment is not None and name not in failed:
            environments[name] = p.environment
    # An environment declared twice is invalid as a whole, in every file that declares it.
    for name in ambiguous:
        environments.pop(name, None)
        invalid.setdefault(name, [])
    all_errors.sort(key=FileError.sort_key)
    return DesiredState(environments, sources, all_errors, invalid, broken)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Reading files makes many short-lived objects and no reference cycles: running the
    cyclic garbage collector meanwhile only costs time (about a third of a large load)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_files(
    files: Iterable[tuple[str, bytes | str]],
    providers: Collection[str] | None = None,
    check: SpecCheck | None = None,
) -> DesiredState:
    """Parse ``(path, content)`` pairs (from disk, a git tree, ...) and assemble them.

    Paths that are not environment files (:func:`is_environment_file`) are skipped.
    """
    with gc_paused():
        parsed = [
            parse_environment_file(path, data, check)
            for path, data in files
            if is_environment_file(path)
        ]
        return assemble(parsed, providers)


def load_directory(
    root: Path,
    providers: Collection[str] | None = None,
    check: SpecCheck | None = None,
    *,
    format_only: bool = False,
) -> DesiredState:
    """Parse every environment file below ``root`` (hidden folders and files skipped).

    Files are reported as ``str(root / relative_path)``, so that they open from the
    current directory when ``root`` was given relative to it. ``format_only``: see
    :func:`parse_environment_file` (the environments are then plain records).
    """
    found: list[tuple[str, Path]] = []
    inside = os.path.realpath(root)
    # os.walk does not enter linked folders; linked files are checked in _read_inside.
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        base = Path(folder)
        for name in names:
            if name.endswith(_EXTENSIONS) and not name.startswith("."):
                full = base / name
                found.append((str(full), full))
    found.sort()
    parsed: list[ParsedFile] = []
    with gc_paused():
        for shown, full in found:
            try:
                data = _read_inside(full, inside)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                error = FileError(shown, 1, 1, "", f"cannot read the file: {reason}")
                parsed.append(ParsedFile(shown, None, [error], None))
                continue
            except _NotRead as exc:
                parsed.append(ParsedFile(shown, None, [FileError(shown, 1, 1, "", str(exc))], None))
                continue
            parsed.append(parse_environment_file(shown, data, check, format_only=format_only))
        return assemble(parsed, providers)


class _NotRead(Exception):
    """A file that is not the user's YAML: its content is never read, so never shown."""


def _too_large(path: str) -> FileError:
    return FileError(path, 1, 1, "", f"file too large: at most {MAX_FILE_BYTES // 1024} KiB")


def _read_inside(file: Path, inside: str) -> bytes:
    """The bytes of a regular file whose real path lies inside the folder ``inside``.

    A link out of the folder is not followed (it could name a secret that error messages
    would then quote); a FIFO or device is not opened for reading; at most
    ``MAX_FILE_BYTES`` (+1, to tell) are read.
    """
    real = os.path.realpath(file)
    if os.path.commonpath([real, inside]) != inside:
        raise _NotRead("a symbolic link to outside the folder: not read")
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _NotRead("not a regular file: not read")
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise _NotRead(str(_too_large(str(file)).message))
    return data
