"""Reading environment files out of a repository by commit id, without a checkout.

A :class:`TreeReader` lists the files of a commit (or only those that changed between two
commits) with ``ls-tree`` / ``diff-tree`` and reads all their blobs, and the commit itself
(its author, subject and parents), with one ``git cat-file --batch``: an incremental load is
two git processes, a full one two or three (each costs a few ms of CPU, on every commit).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

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
    # The new commit, read along with the files (not part of what changed: not compared).
    commit: CommitInfo | None = field(default=None, compare=False)


# "Name <email> 1700000000 +0100" (git's ident line); the name/email split as GitPython's.
_IDENT = re.compile(rb"(.*) (\d+) ([+-]\d{4})")
_NAME_EMAIL = re.compile(r"(.*) <(.*?)>")


def parse_commit(sha: str, data: bytes) -> tuple[CommitInfo, list[str]]:
    """A commit object's author, date and subject, and its parents (raw ``cat-file`` bytes)."""
    header, _, message = data.partition(b"\n\n")
    parents: list[str] = []
    author = b""
    encoding = "utf-8"
    for line in header.split(b"\n"):
        if line.startswith(b"parent "):
            parents.append(line[7:].decode("ascii"))
        elif line.startswith(b"author "):
            author = line[7:]
        elif line.startswith(b"encoding "):
            encoding = line[9:].decode("ascii", "replace")
    try:
        text = message.decode(encoding, "replace")
    except LookupError:  # an encoding Python does not know
        text = message.decode("utf-8", "replace")
    ident = _IDENT.fullmatch(author)
    # The ident in UTF-8 whatever the message's encoding (what git writes, GitPython reads).
    who = (ident.group(1) if ident else author).decode("utf-8", "replace")
    stamp = int(ident.group(2)) if ident else 0
    name_email = _NAME_EMAIL.fullmatch(who)
    name, email = name_email.groups() if name_email else (who, "")
    info = CommitInfo(
        sha=sha,
        author=f"{name} <{email}>",
        authored_at=datetime.fromtimestamp(stamp, tz=UTC),
        subject=text.split("\n", 1)[0],
    )
    return info, parents


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


def parse_cat_file_batch(
    out: bytes, count: int, kinds: tuple[bytes, ...] | None = None
) -> list[bytes | None]:
    """Split ``git cat-file --batch`` output for ``count`` requests, in order; an object
    not of its expected kind (``kinds``, else blobs) is None."""
    result: list[bytes | None] = []
    pos = 0
    for i in range(count):
        eol = out.index(b"\n", pos)
        header = out[pos:eol].split(b" ")
        pos = eol + 1
        if len(header) != 3:  # "<name> missing" / "ambiguous"
            result.append(None)
            continue
        size = int(header[2])
        kind = kinds[i] if kinds is not None else b"blob"
        result.append(out[pos : pos + size] if header[1] == kind else None)
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
        return self._incremental_load(old, new)

    def _rewritten(self, old: str, new: str) -> Changes:
        reason = f"history rewritten: {old[:7]} is not an ancestor of {new[:7]}"
        return self._full_load(new, reason=reason)

    def _rel(self, repo_path: str) -> str | None:
        """The path relative to the configured folder, or None if it lies outside it."""
        if not self.path:
            return repo_path
        prefix = self.path + "/"
        return repo_path[len(prefix) :] if repo_path.startswith(prefix) else None

    def _full_load(self, new: str, reason: str | None) -> Changes:
        tree = f"{new}:{self.path}" if self.path else f"{new}^{{tree}}"
        try:
            out = self.git.run(["ls-tree", "-r", "-z", "--full-tree", tree])
        except GitFailed as exc:
            if exc.timed_out:
                raise self.git.error(f"cannot list {new[:12]}", exc) from None
            self._verify_commit(new)  # raises for an unknown commit
            # The commit exists, so the folder does not (or is a file): no environments.
            files, commit, _parents = self._read_objects(new, {})
            return Changes(full=True, reason=reason, commit=commit)
        wanted: dict[str, str] = {}
        for entry in out.split(b"\0"):
            if not entry:
                continue
            meta, _, name = entry.partition(b"\t")
            mode, kind, sha = meta.decode().split(" ")
            relpath = name.decode("utf-8", "surrogateescape")
            if kind == "blob" and mode in REGULAR_MODES and is_env_file(relpath):
                wanted[relpath] = sha
        files, commit, _parents = self._read_objects(new, wanted)
        return Changes(full=True, reason=reason, files=files, commit=commit)

    def _incremental_load(self, old: str, new: str) -> Changes:
        """diff-tree, then the changed blobs and the commit in one batch. The usual case,
        ``old`` the new commit's parent, needs no ``merge-base`` to know it is no rewrite."""
        args = ["diff-tree", "-r", "-z", "--no-renames", "--no-commit-id", old, new]
        if self.path:
            args += ["--", f":(literal){self.path}"]
        try:
            out = self.git.run(args)
        except GitFailed as exc:
            if not exc.timed_out and not self.is_ancestor(old, new):
                return self._rewritten(old, new)  # e.g. `old` is gone (gc after a force push)
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
        files, commit, parents = self._read_objects(new, wanted)
        if old not in parents and not self.is_ancestor(old, new):
            return self._rewritten(old, new)
        return Changes(full=False, files=files, deleted=frozenset(deleted), commit=commit)

    def _verify_commit(self, sha: str) -> None:
        try:
            self.git.run(["rev-parse", "--quiet", "--verify", f"{sha}^{{commit}}"])
        except GitFailed as exc:
            if exc.timed_out:
                raise self.git.error(f"cannot read {sha[:12]}", exc) from None
            raise SourceError(f"unknown commit {sha[:12]}") from None

    def _read_objects(
        self, commit: str, wanted: dict[str, str]
    ) -> tuple[dict[str, bytes], CommitInfo, list[str]]:
        """The commit ``commit`` (its info and parents) and the blobs ``relpath -> sha``,
        with one ``git cat-file --batch``."""
        shas = sorted(set(wanted.values()))
        try:
            out = self.git.run(
                ["cat-file", "--batch"],
                input="".join(s + "\n" for s in [commit, *shas]).encode(),
            )
        except GitFailed as exc:
            raise self.git.error("cannot read files", exc) from None
        read = parse_cat_file_batch(out, len(shas) + 1, kinds=(b"commit",) + (b"blob",) * len(shas))
        if read[0] is None:
            raise SourceError(f"unknown commit {commit[:12]}")
        info, parents = parse_commit(commit, read[0])
        blobs = dict(zip(shas, read[1:], strict=True))
        result: dict[str, bytes] = {}
        for relpath, sha in sorted(wanted.items()):
            data = blobs[sha]
            if data is None:
                raise SourceError(f"cannot read {relpath}: object {sha[:12]} is missing")
            result[relpath] = data
        return result, info, parents
