"""Text-first YAML: compose nodes with PyYAML, then turn them into plain Python ourselves.

Every scalar becomes a ``str`` (``1.10`` stays ``"1.10"``, ``no`` stays ``"no"``); only
plain null scalars (empty, ``~``, ``null``) become ``None``. Tags are ignored, except that
an explicit ``!!str`` keeps a null-looking scalar as text and ``!!null`` makes ``None``.
Keys are always the scalar's text. Duplicate keys at any depth are errors at the second
key. Anchors and aliases are resolved (shared, never copied); merge keys (``<<``) work
as in YAML 1.1. Nodes keep their marks, so errors found later (by the schema) can be
mapped back to ``line:col`` with :func:`locate`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import FileError

__all__ = [
    "YamlText",
    "compose",
    "describe",
    "find_key",
    "locate",
    "position",
]

# Tag given to every implicitly tagged node: we resolve nothing, we keep the text.
_IMPLICIT = "?"
_STR_TAG = "tag:yaml.org,2002:str"
_NULL_TAG = "tag:yaml.org,2002:null"
_NULLS = frozenset(("", "~", "null", "Null", "NULL"))
_MERGE = "<<"
_IN_PROGRESS = object()
_intern = sys.intern
_INTERN_MAX = 64  # versions, names, small params: the values that repeat across files
# Values that aliases may add to a document, all uses together: far beyond any real file.
_ALIAS_BUDGET = 100_000


class _ComposerMixin:
    """No implicit resolution: composing is all we want, and it is faster without it."""

    def resolve(self, kind: object, value: object, implicit: object) -> str:
        return _IMPLICIT

    def descend_resolver(self, current_node: object, current_index: object) -> None:
        return None

    def ascend_resolver(self) -> None:
        return None


try:
    from yaml._yaml import CParser

    class _Composer(_ComposerMixin, CParser):
        pass

    C_COMPOSER = True
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml.composer import Composer
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Composer(_ComposerMixin, Reader, Scanner, Parser, Composer):  # type: ignore[no-redef]
        def __init__(self, stream: str | bytes) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)
            Composer.__init__(self)

        def dispose(self) -> None:
            Parser.dispose(self)

    C_COMPOSER = False


def position(node: Node) -> tuple[int, int]:
    """1-based ``(line, col)`` of a node's start."""
    mark = node.start_mark
    if mark is None:
        return (1, 1)
    return (mark.line + 1, mark.column + 1)


def _offset_position(data: str | bytes, offset: int) -> tuple[int, int]:
    head = data[:offset]
    if isinstance(head, bytes):
        head = head.decode("utf-8", "replace")
    line = head.count("\n") + 1
    col = offset - (head.rfind("\n") + 1) + 1
    return (line, col)


def _syntax_error(file: str, data: str | bytes, exc: yaml.YAMLError) -> FileError:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        if problem == "but found another document":
            return FileError(file, line, col, "", _MULTI_DOC)
        message = f"YAML syntax error: {problem}"
        ctx_mark = exc.context_mark
        if exc.context and exc.problem and ctx_mark is not None:
            message += f" ({exc.context} at line {ctx_mark.line + 1}, column {ctx_mark.column + 1})"
        elif exc.context and exc.problem:
            message += f" ({exc.context})"
        return FileError(file, line, col, "", message)
    if isinstance(exc, yaml.reader.ReaderError):
        line, col = _offset_position(data, exc.position)
        if isinstance(exc.character, int) and exc.character:
            what = f"character #x{exc.character:04x}"
        else:
            what = "bytes"
        return FileError(file, line, col, "", f"unreadable text: {what}: {exc.reason}")
    return FileError(file, 1, 1, "", f"YAML error: {exc}")


_MULTI_DOC = "more than one YAML document: a file declares exactly one environment"


def _is_empty_document(node: Node) -> bool:
    return (
        isinstance(node, ScalarNode)
        and not node.style
        and node.tag == _IMPLICIT
        and node.value in _NULLS
    )


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return "text"


def describe(value: object) -> str:
    """How a converted value reads in a message: ``a mapping``, ``a list``, ``text '1.2'``."""
    if value is None:
        return "an empty value"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value}"
    text = str(value)
    # A message names a value; it does not reproduce it (a whole file can be one scalar).
    return f"text '{text[:60]}...'" if len(text) > 60 else f"text '{text}'"


class _Converter:
    __slots__ = ("alias_budget", "errors", "file", "memo", "sizes")

    def __init__(self, file: str) -> None:
        self.file = file
        self.errors: list[FileError] = []
        self.memo: dict[int, Any] = {}
        self.sizes: dict[int, int] = {}
        self.alias_budget = _ALIAS_BUDGET

    def expanded_size(self, node: Node) -> int:
        """How many values a node holds once aliases are expanded (a billion laughs guard)."""
        if node.__class__ is ScalarNode:
            return 1
        sizes = self.sizes
        known = sizes.get(id(node))
        if known is not None:
            return known
        sizes[id(node)] = 1  # a recursive alias is reported elsewhere; do not loop here
        total = 1
        if node.__class__ is MappingNode:
            for _key, value in node.value:
                total += 1 + self.expanded_size(value)
        else:
            for item in node.value:
                total += self.expanded_size(item)
        sizes[id(node)] = total
        return total

    def error(self, node: Node, path: Sequence[str | int], message: str) -> None:
        line, col = position(node)
        self.errors.append(FileError(self.file, line, col, ".".join(map(str, path)), message))

    def convert(self, node: Node, path: tuple[str | int, ...]) -> Any:
        cls = node.__class__
        if cls is ScalarNode:
            return _scalar(node)  # type: ignore[arg-type]
        key = id(node)
        memo = self.memo
        done = memo.get(key)
        if done is not None:
            if done is _IN_PROGRESS:
                self.error(node, path, "an alias refers to a node that contains it (recursive)")
                return None
            # An alias: shared, not copied, but whoever walks the result sees it expanded.
            self.alias_budget -= self.expanded_size(node)
            if self.alias_budget < 0:
                if self.alias_budget + self.expanded_size(node) >= 0:  # report once
                    self.error(node, path, f"aliases expand to more than {_ALIAS_BUDGET} values")
                return None
            return done
        memo[key] = _IN_PROGRESS
        result: Any
        if cls is MappingNode:
            result = self.mapping(node, path)  # type: ignore[arg-type]
        else:
            result = [self.convert(item, (*path, i)) for i, item in enumerate(node.value)]
        memo[key] = result
        return result

    def mapping(self, node: MappingNode, path: tuple[str | int, ...]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        merges: list[tuple[Node, Node]] = []
        for key_node, value_node in node.value:
            if key_node.__class__ is not ScalarNode:
                self.error(key_node, path, f"a key must be text, not {_kind(key_node)}")
                continue
            # Interned: a fleet's files repeat the same keys (and values) thousands of times,
            # and the desired state is kept in memory for as long as it is in force.
            key: str = _intern(key_node.value)
            if key in result:
                first = _first_key_line(node, key)
                self.error(key_node, (*path, key), f"duplicate key '{key}' (first at line {first})")
                continue
            if key == _MERGE and not key_node.style:
                merges.append((key_node, value_node))
                continue
            # Fast path for the common case: a plain, untagged, non-null scalar value.
            if value_node.__class__ is ScalarNode:
                value = value_node.value
                if value in _NULLS or value_node.tag is not _IMPLICIT:
                    value = _scalar(value_node)
                elif len(value) <= _INTERN_MAX:
                    value = _intern(value)
                result[key] = value
            else:
                result[key] = self.convert(value_node, (*path, key))
        if merges:
            result = self.merge(result, merges, path)
        return result

    def merge(
        self, explicit: dict[str, Any], merges: list[tuple[Node, Node]], path: tuple[str | int, ...]
    ) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for key_node, value_node in merges:
            sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
            for source in sources:
                if not isinstance(source, MappingNode):
                    self.error(key_node, path, "'<<' (merge) needs a mapping or a list of mappings")
                    continue
                value = self.convert(source, path)
                if isinstance(value, dict):
                    for k, v in value.items():
                        merged.setdefault(k, v)
        for k in explicit:
            merged.pop(k, None)
        merged.update(explicit)
        return merged


def _scalar(node: ScalarNode) -> str | None:
    value: str = node.value
    tag = node.tag
    if tag == _NULL_TAG:
        return None
    if value in _NULLS and not node.style and tag != _STR_TAG:
        return None
    return value


def _first_key_line(node: MappingNode, key: str) -> int:
    for key_node, _ in node.value:
        if key_node.__class__ is ScalarNode and key_node.value == key:
            return position(key_node)[0]
    return position(node)[0]  # pragma: no cover - the key was seen


class YamlText:
    """The result of reading one file: its root node, its plain value, its errors."""

    __slots__ = ("data", "errors", "root")

    def __init__(self, root: Node | None, data: Any, errors: list[FileError]) -> None:
        self.root = root
        self.data = data
        self.errors = errors


def compose(file: str, text: str | bytes) -> YamlText:
    """Read one single-document YAML file, text-first. Never raises on bad input."""
    errors: list[FileError] = []
    root: Node | None = None
    loader = _Composer(text)
    try:
        if loader.check_node():
            root = loader.get_node()
            # A second document: an error, unless it is empty (a trailing ``---``).
            while loader.check_node():
                extra = loader.get_node()
                if extra is not None and not _is_empty_document(extra):
                    line, col = position(extra)
                    errors.append(FileError(file, line, col, "", _MULTI_DOC))
                    break
    except yaml.YAMLError as exc:
        errors.append(_syntax_error(file, text, exc))
        if root is None:
            return YamlText(None, None, errors)
    except RecursionError:
        errors.append(FileError(file, 1, 1, "", "YAML nesting is too deep"))
        return YamlText(None, None, errors)
    finally:
        loader.dispose()
    if root is None:
        return YamlText(None, None, errors)
    converter = _Converter(file)
    try:
        data = converter.convert(root, ())
    except RecursionError:
        converter.errors.append(FileError(file, 1, 1, "", "YAML nesting is too deep"))
        data = None
    errors.extend(converter.errors)
    return YamlText(root, data, errors)


def find_key(node: Node, key: str) -> tuple[Node, Node] | None:
    """``(key node, value node)`` of ``key`` in a mapping node (following merge keys)."""
    if not isinstance(node, MappingNode):
        return None
    merges: list[Node] = []
    for key_node, value_node in node.value:
        if isinstance(key_node, ScalarNode):
            if key_node.value == key:
                return (key_node, value_node)
            if key_node.value == _MERGE and not key_node.style:
                merges.append(value_node)
    for source in merges:
        candidates = source.value if isinstance(source, SequenceNode) else [source]
        for candidate in candidates:
            found = find_key(candidate, key)
            if found is not None:
                return found
    return None


def locate(root: Node, loc: Sequence[str | int], *, key: bool = False) -> tuple[Node, int]:
    """The deepest node along ``loc`` and how many elements of ``loc`` were found.

    With ``key=True``, when the last element names a mapping key, the key node itself is
    returned instead of its value.
    """
    node = root
    found = 0
    last = len(loc) - 1
    for i, part in enumerate(loc):
        if isinstance(node, MappingNode):
            pair = find_key(node, str(part))
            if pair is None:
                break
            node = pair[0] if (key and i == last) else pair[1]
        elif isinstance(node, SequenceNode) and isinstance(part, int):
            if not 0 <= part < len(node.value):
                break
            node = node.value[part]
        else:
            break
        found += 1
    return node, found
