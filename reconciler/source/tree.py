"""Reading environment files out of a repository by commit id, without a checkout.

A :class:`TreeReader` lists the files of a commit (or only those that changed between two
commits) with ``ls-tree`` / ``diff-tree`` and reads all their blobs with one
``git cat-file --batch``.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from datetime import datetime

from reconciler.source.gitcmd import GitFailed, GitRunner, SourceError

REGULAR_MODES = frozenset({"100644", "100755"})
_ENV_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class CommitInfo:
    sha: str
    author: str  # "Name <email>"
    authored_at: datetime  # aware, UTC
    subject: str  # first line of the message


@dataclass(frozen=True)
class Changes:
    """The environment files to (re)parse for one sync.

    ``full`` is True when every environment file was loaded: the first load, or when the
    old commit is not an ancestor of the new one (history rewritten, force push); then
    ``deleted`` is empty and any environment absent from ``files`` is gone.
    """

    full: bool
    reason: str | None = None  # why a full load was forced by a rewrite; None otherwise
    files: dict[str, bytes] = field(default_factory=dict)  # relpath (posix, under `path`)
    deleted: frozenset[str] = frozenset()


def is_env_file(relpath: str) -> bool:
    """True for ``*.yaml`` / ``*.yml`` with no path component starting with ``.``."""
    parts = relpath.split("/")
    if any(not part or part.startswith(".") for part in parts):
        return False
    return parts[-1].endswith(_ENV_SUFFIXES)


def normalise_path(path: str) -> str:
    """The configured folder as a posix path relative to the repository root ("" = root)."""
    cleaned = posixpath.normpath(path.replace("\\", "/").strip("/") or ".")
    if cleaned == ".":
        return ""
    if cleaned == ".." or cleaned.startswith("../"):
        raise SourceError(f"invalid repository path {path!r}: it leaves the repository")
    return cleaned


def parse_cat_file_batch(out: bytes, count: int) -> list[bytes | None]:
    """Split ``git cat-file --batch`` output for ``count`` requests, in order."""
    result: list[bytes | None] = []
    pos = 0
    for _ in range(count):
        eol = out.index(b"\n", pos)
        header = out[pos:eol].split(b" ")
        pos = eol + 1
        if len(header) != 3:  # "<name> missing" / "ambiguous"
            result.append(None)
            continue
        size = int(header[2])
        result.append(out[pos : pos + size] if header[1] == b"blob" else None)
        pos += size + 1
    return result


class TreeReader:
    """The environment files below ``path`` (normalised) of the repository ``git`` runs on."""

    def __init__(self, git: GitRunner, path: str) -> None:
        self.git = git
        self.path = path

    def is_ancestor(self, old: str, new: str) -> bool:
        """True if ``old`` is ``new`` or one of its ancestors; False also if ``old`` is unknown."""
        try:
            self.git.run(["merge-base", "--is-ancestor", old, new])
        except GitFailed as exc:
            if exc.timed_out:
                raise self.git.error("cannot compare commits", exc) from None
            return False
        return True

    def load(self, old: str | None, new: str) -> Changes:
        """The environment files to parse at ``new``, knowing ``old`` was applied before."""
        if old is not None and old == new:
            return Changes(full=False)
        if old is None:
            return self._full_load(new, reason=None)
        if not self.is_ancestor(old, new):
            reason = f"history rewritten: {old[:7]} is not an ancestor of {new[:7]}"
            return self._full_load(new, reason=reason)
        return self._incremental_load(old, new)

    def _rel(self, repo_path: str) -> str | None:
        """The path relative to the configured folder, or None if it lies outside it."""
        if not self.path:
            return repo_path
        prefix = self.path + "/"
        return repo_path[len(prefix) :] if repo_path.startswith(prefix) else None

    def _full_load(self, new: str, reason: str | None) -> Changes:
        self._verify_commit(new)
        tree = f"{new}:{self.path}" if self.path else f"{new}^{{tree}}"
        try:
            out = self.git.run(["ls-tree", "-r", "-z", "--full-tree", tree])
        except GitFailed as exc:
            if exc.timed_out:
                raise self.git.error(f"cannot list {new[:12]}", exc) from None
            # The commit exists, so the folder does not (or is a file): no environments.
            return Changes(full=True, reason=reason)
        wanted: dict[str, str] = {}
        for entry in out.split(b"\0"):
            if not entry:
                continue
            meta, _, name = entry.partition(b"\t")
            mode, kind, sha = meta.decode().split(" ")
            relpath = name.decode("utf-8", "surrogateescape")
            if kind == "blob" and mode in REGULAR_MODES and is_env_file(relpath):
                wanted[relpath] = sha
        return Changes(full=True, reason=reason, files=self._read_blobs(wanted))

    def _incremental_load(self, old: str, new: str) -> Changes:
        args = ["diff-tree", "-r", "-z", "--no-renames", "--no-commit-id", old, new]
        if self.path:
            args += ["--", f":(literal){self.path}"]
        try:
            out = self.git.run(args)
        except GitFailed as exc:
            raise self.git.error(f"cannot diff {old[:12]}..{new[:12]}", exc) from None
        fields = out.split(b"\0")
        wanted: dict[str, str] = {}
        deleted: set[str] = set()
        for i in range(0, len(fields) - 1, 2):
            meta = fields[i].decode()
            if not meta.startswith(":"):
                continue
            old_mode, new_mode, _old_sha, new_sha, _status = meta[1:].split(" ")
            relpath = self._rel(fields[i + 1].decode("utf-8", "surrogateescape"))
            if relpath is None or not is_env_file(relpath):
                continue
            if new_mode in REGULAR_MODES:
                wanted[relpath] = new_sha
            elif old_mode in REGULAR_MODES:  # deleted, or now a symlink / submodule
                deleted.add(relpath)
        return Changes(full=False, files=self._read_blobs(wanted), deleted=frozenset(deleted))

    def _verify_commit(self, sha: str) -> None:
        try:
            self.git.run(["rev-parse", "--quiet", "--verify", f"{sha}^{{commit}}"])
        except GitFailed as exc:
            if exc.timed_out:
                raise self.git.error(f"cannot read {sha[:12]}", exc) from None
            raise SourceError(f"unknown commit {sha[:12]}") from None

    def _read_blobs(self, wanted: dict[str, str]) -> dict[str, bytes]:
        """Read the blobs ``relpath -> sha`` with one ``git cat-file --batch``."""
        if not wanted:
            return {}
        shas = sorted(set(wanted.values()))
        try:
            out = self.git.run(
                ["cat-file", "--batch"], input="".join(s + "\n" for s in shas).encode()
            )
        except GitFailed as exc:
            raise self.git.error("cannot read files", exc) from None
        blobs = dict(zip(shas, parse_cat_file_batch(out, len(shas)), strict=True))
        result: dict[str, bytes] = {}
        for relpath, sha in sorted(wanted.items()):
            data = blobs[sha]
            if data is None:
                raise SourceError(f"cannot read {relpath}: object {sha[:12]} is missing")
            result[relpath] = data
        return result
