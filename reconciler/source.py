"""The git side of the reconciler: fetch the desired-state branch, read it, watch it.

A :class:`GitSource` keeps a bare, single-branch mirror of the configured branch in
``workdir`` (``state_dir/"repo.git"``).  Everything is read from that mirror by commit id,
without a checkout: the environment files of a commit, or only those that changed between
two commits.

Two mechanisms talk to git, each where it is cheapest:

* one-shot ``git`` subprocesses (fetch, ``diff-tree``, ``ls-tree``, one
  ``cat-file --batch`` for all blobs of a load), each with a timeout after which its
  whole process group is killed;
* GitPython's persistent ``cat-file`` processes for small look-ups (commit metadata, one
  file, the branch head).  :meth:`GitSource.close` releases them.

Git never prompts: ``GIT_TERMINAL_PROMPT=0``, no askpass, ``ssh -o BatchMode=yes``.

The blocking methods are meant to be called through ``asyncio.to_thread``; a
:class:`GitSource` serialises its own use of GitPython, so concurrent calls are safe.

:func:`watch_refs` turns commits into a local repository into "re-read the head" signals
(via inotify, Linux only); :func:`poll_delay` spreads polls of remote repositories.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import posixpath
import random
import re
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import git

if sys.platform == "linux":  # watch_refs: inotify, read on the event loop
    from asyncinotify import Inotify, Mask, Watch

__all__ = [
    "Changes",
    "CommitInfo",
    "GitSource",
    "SourceError",
    "poll_delay",
    "watch_refs",
]

DEFAULT_TIMEOUT = 120.0

_REGULAR_MODES = frozenset({"100644", "100755"})
_ENV_SUFFIXES = (".yaml", ".yml")
# Environment variables that would point our git commands at another repository.
_GIT_LOCATION_VARS = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
    "GIT_PREFIX",
)


_SHA = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")  # SHA-1 or SHA-256 object names


class SourceError(Exception):
    """One-line, user-facing message (no traceback).

    For example ``cannot fetch /srv/x (branch main): repository not found``.
    """


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


def _is_env_file(relpath: str) -> bool:
    """True for ``*.yaml`` / ``*.yml`` with no path component starting with ``.``."""
    parts = relpath.split("/")
    if any(not part or part.startswith(".") for part in parts):
        return False
    return parts[-1].endswith(_ENV_SUFFIXES)


def _redact_url(url: str) -> str:
    """The URL without credentials (``https://user:token@host/x`` -> ``https://***@host/x``)."""
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


# A credential helper that answers from the environment git runs in (see _credentials).
_ENV_HELPER = (
    '!f() { test "$1" = get && printf "username=%s\\npassword=%s\\n" '
    '"$RECONCILER_GIT_USERNAME" "$RECONCILER_GIT_PASSWORD"; }; f'
)


def _credentials(url: str, env: dict[str, str]) -> str:
    """The URL to give git, without the user info of an ``http(s)://user:token@host`` URL.

    The credentials go to git through its environment instead (a credential helper set
    with ``GIT_CONFIG_*`` that prints them): a command line is readable by every user of
    the host (`ps`), an environment only by the same user. ``env`` is updated in place.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return url
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    n = int(env.get("GIT_CONFIG_COUNT", "0") or "0")
    env.update(
        {
            "GIT_CONFIG_COUNT": str(n + 2),
            # An empty helper clears the configured ones: the URL's credentials win, as before.
            f"GIT_CONFIG_KEY_{n}": "credential.helper",
            f"GIT_CONFIG_VALUE_{n}": "",
            f"GIT_CONFIG_KEY_{n + 1}": "credential.helper",
            f"GIT_CONFIG_VALUE_{n + 1}": _ENV_HELPER,
            "RECONCILER_GIT_USERNAME": unquote(user),
            "RECONCILER_GIT_PASSWORD": unquote(password),
        }
    )
    return urlunsplit(parts._replace(netloc=host))


def _local_path(url: str) -> Path | None:
    """The filesystem path of a local repository URL, None for a remote one."""
    if url.startswith("file://"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            return None
        return Path(unquote(parts.path))
    if "://" in url:
        return None
    # scp-like "host:path" is ssh, as git reads it: a colon before the first slash.
    colon, slash = url.find(":"), url.find("/")
    if colon > 0 and (slash < 0 or colon < slash):
        return None
    return Path(os.path.abspath(url))


def _normalise_path(path: str) -> str:
    """The configured folder as a posix path relative to the repository root ("" = root)."""
    cleaned = posixpath.normpath(path.replace("\\", "/").strip("/") or ".")
    if cleaned == ".":
        return ""
    if cleaned == ".." or cleaned.startswith("../"):
        raise SourceError(f"invalid repository path {path!r}: it leaves the repository")
    return cleaned


def _check_branch(branch: str) -> None:
    bad = (
        not branch
        or branch.startswith(("-", "/", "."))
        or branch.endswith(("/", ".lock", "."))
        or ".." in branch
        or "//" in branch
        or "@{" in branch
        or "/." in branch
        or any(c in branch for c in " ~^:?*[\\\x7f")
        or any(ord(c) < 32 for c in branch)
    )
    if bad:
        raise SourceError(f"invalid branch name {branch!r}")


def _git_env() -> dict[str, str]:
    # Not the daemon's own settings either (its database URL): git and ssh need none.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _GIT_LOCATION_VARS and not k.startswith("RECONCILER_")
    }
    env.update(
        GIT_TERMINAL_PROMPT="0",
        GIT_ASKPASS="",
        SSH_ASKPASS="",
        GCM_INTERACTIVE="never",
        LC_ALL="C",
        LANGUAGE="C",
    )
    if "GIT_SSH_COMMAND" not in env and "GIT_SSH" not in env:
        env["GIT_SSH_COMMAND"] = "ssh -o BatchMode=yes -o ConnectTimeout=30"
    return env


class _GitFailed(Exception):
    def __init__(self, returncode: int, stderr: str, timed_out: bool = False) -> None:
        super().__init__(stderr)
        self.returncode = returncode
        self.stderr = stderr
        self.timed_out = timed_out

    def line(self) -> str:
        """git's most telling error line, without its ``fatal:`` prefix."""
        lines = [ln.strip() for ln in self.stderr.splitlines() if ln.strip()]
        for prefix in ("fatal:", "error:", "remote: fatal:", "remote: error:"):
            for ln in lines:
                if ln.startswith(prefix):
                    return ln[len(prefix) :].strip()
        meaningful = [ln for ln in lines if not ln.startswith("hint:")]
        return meaningful[0] if meaningful else f"git exited with status {self.returncode}"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


def _parse_cat_file_batch(out: bytes, count: int) -> list[bytes | None]:
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


class GitSource:
    """A bare single-branch mirror of the desired-state repository in ``workdir``."""

    def __init__(
        self,
        url: str,
        branch: str,
        path: str,
        workdir: Path,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if not url or url.startswith("-"):
            raise SourceError(f"invalid repository url {url!r}")
        _check_branch(branch)
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.url = url
        self.branch = branch
        self.path = _normalise_path(path)
        self.workdir = Path(workdir)
        self.timeout = timeout
        self._display_url = _redact_url(url)
        self._ref = f"refs/heads/{branch}"
        self._env = _git_env()
        self._git_url = _credentials(url, self._env)  # what git's command line shows
        self._repo: git.Repo | None = None
        self._repo_lock = threading.RLock()  # GitPython's cat-file processes: one user at a time
        self._fetch_lock = threading.Lock()
        self._shared: Path | None = None  # a local source's git dir, whose objects we borrow

    def __repr__(self) -> str:
        return f"GitSource({self._display_url!r}, branch={self.branch!r}, path={self.path!r})"

    # -- subprocesses ------------------------------------------------------------------

    def _run(
        self,
        args: Sequence[str],
        *,
        input: bytes | None = None,
        git_dir: bool = True,
    ) -> bytes:
        """Run git (on the mirror unless ``git_dir`` is False); stdout, or raise _GitFailed."""
        cmd = ["git", f"--git-dir={self.workdir}", *args] if git_dir else ["git", *args]
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env,
                start_new_session=True,  # so that a timeout kills ssh & co. too
            )
        except OSError as exc:
            raise SourceError(f"cannot run git: {exc.strerror or exc}") from None
        try:
            out, err = proc.communicate(input, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=5)
            raise _GitFailed(-9, f"timed out after {self.timeout:g} s", timed_out=True) from None
        except BaseException:
            _kill_group(proc)
            proc.wait()
            raise
        if proc.returncode != 0:
            raise _GitFailed(proc.returncode, err.decode("utf-8", "replace"))
        return out

    def _error(self, action: str, exc: _GitFailed) -> SourceError:
        detail = "timed out" if exc.timed_out else exc.line()
        return SourceError(f"{action}: {self._scrub(detail)}")

    def _scrub(self, text: str) -> str:
        return text.replace(self.url, self._display_url) if self.url else text

    # -- fetching --------------------------------------------------------------------

    def _ensure_mirror(self) -> None:
        if (self.workdir / "HEAD").is_file() and (self.workdir / "objects").is_dir():
            return
        try:
            self.workdir.parent.mkdir(parents=True, exist_ok=True)
            self._run(
                ["init", "--quiet", "--bare", f"--initial-branch={self.branch}", str(self.workdir)],
                git_dir=False,
            )
        except OSError as exc:
            raise SourceError(f"cannot create {self.workdir}: {exc.strerror or exc}") from None
        except _GitFailed as exc:
            raise self._error(f"cannot create {self.workdir}", exc) from None

    def _share_local_objects(self) -> None:
        """For a repository on this machine, borrow its object store (git alternates, as
        `git clone --shared`): a fetch then copies no objects, only moves the ref, which
        halves the time from a commit to its deployment. A commit the source garbage-collects
        later is only needed for an incremental diff, and its absence means a full load."""
        if self._shared is not None or not self.is_local():
            return
        git_dir = self.local_git_dir()
        objects = git_dir / "objects" if git_dir is not None else None
        if git_dir is None or objects is None or not objects.is_dir():
            return  # not there (yet): the fetch says why
        info = self.workdir / "objects" / "info"
        info.mkdir(parents=True, exist_ok=True)
        alternates = info / "alternates"
        line = str(objects.resolve())
        if not (alternates.is_file() and line in alternates.read_text().splitlines()):
            alternates.write_text(line + "\n")
        self._shared = git_dir

    def _local_head(self, git_dir: Path) -> str | None:
        """The branch head of a local repository, read from its ref files (no subprocess):
        the loose ref, else packed-refs. None when it cannot tell (then: a real fetch)."""
        if (git_dir / "reftable").exists():
            return None
        try:
            loose = (git_dir / self._ref).read_text().strip()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            loose = ""
        except OSError:
            return None
        if loose:
            return loose if _SHA.fullmatch(loose) else None
        try:
            packed = (git_dir / "packed-refs").read_text()
        except OSError:
            return None
        for line in packed.splitlines():
            sha, _, name = line.partition(" ")
            if name == self._ref and _SHA.fullmatch(sha):
                return sha
        return None

    def fetch(self) -> str:
        """Bring the mirror's branch to the remote branch head (forced) and return its sha."""
        with self._fetch_lock:
            self._ensure_mirror()
            self._share_local_objects()
            action = f"cannot fetch {self._display_url} (branch {self.branch})"
            if self._shared is not None:
                # The objects are shared already: moving the ref is the whole fetch.
                sha = self._local_head(self._shared)
                if sha is not None:
                    with contextlib.suppress(_GitFailed):  # e.g. not a commit: fetch says why
                        if sha != self.head():
                            self._run(["update-ref", self._ref, f"{sha}^{{commit}}"])
                        return sha
            try:
                self._run(
                    [
                        "fetch",
                        "--quiet",
                        "--no-tags",
                        "--no-write-fetch-head",
                        "--no-recurse-submodules",
                        "--no-show-forced-updates",
                        "--",
                        self._git_url,
                        f"+{self._ref}:{self._ref}",
                    ]
                )
            except _GitFailed as exc:
                raise SourceError(f"{action}: {self._fetch_reason(exc)}") from None
            sha = self.head()
            if sha is None:  # pragma: no cover - git said it fetched
                raise SourceError(f"{action}: the branch did not arrive")
            return sha

    def _fetch_reason(self, exc: _GitFailed) -> str:
        if exc.timed_out:
            return f"timed out after {self.timeout:g} s"
        line = exc.line()
        low = exc.stderr.lower()
        if "couldn't find remote ref" in low:
            if self._remote_is_empty():
                return "the repository is empty"
            return f"branch {self.branch!r} not found"
        if (
            "does not appear to be a git repository" in low
            or "repository not found" in low
            or "not a git repository" in low
        ):
            return "repository not found"
        if (
            "terminal prompts disabled" in low
            or "authentication failed" in low
            or "could not read username" in low
            or "permission denied (publickey" in low
            or "host key verification failed" in low
        ):
            return f"authentication failed ({self._scrub(line)})"
        return self._scrub(line)

    def _remote_is_empty(self) -> bool:
        try:
            return not self._run(["ls-remote", "--", self._git_url]).strip()
        except (_GitFailed, SourceError):
            return False

    # -- reading ---------------------------------------------------------------------

    def _git_repo(self) -> git.Repo | None:
        if self._repo is None:
            if not (self.workdir / "HEAD").is_file():
                return None
            repo = git.Repo(self.workdir)
            # GitPython starts from os.environ: pin the repository in case the daemon runs
            # from a git hook (GIT_DIR set to another repository).
            repo.git.update_environment(
                GIT_DIR=str(self.workdir),
                GIT_COMMON_DIR=str(self.workdir),
                GIT_OBJECT_DIRECTORY=str(self.workdir / "objects"),
                LC_ALL="C",
                LANGUAGE="C",
            )
            self._repo = repo
        return self._repo

    def head(self) -> str | None:
        """The sha of the mirrored branch, without fetching; None before the first fetch."""
        with self._repo_lock:
            repo = self._git_repo()
            if repo is None:
                return None
            try:
                sha: str = git.SymbolicReference.dereference_recursive(repo, self._ref)
            except (ValueError, OSError):
                return None
            return sha

    def _commit(self, sha: str) -> git.Commit:
        repo = self._git_repo()
        if repo is None:
            raise SourceError(f"unknown commit {sha[:12]}: nothing fetched yet")
        try:
            commit = repo.commit(sha)
            if commit.type != "commit":
                raise ValueError(sha)
            commit.tree  # noqa: B018 - a full sha is resolved lazily: load it now
        except (ValueError, LookupError, TypeError, git.exc.ODBError, git.exc.GitError):
            raise SourceError(f"unknown commit {sha[:12]}") from None
        return commit

    def commit_info(self, sha: str) -> CommitInfo:
        with self._repo_lock:
            commit = self._commit(sha)
            author = commit.author
            subject = commit.summary
            if isinstance(subject, bytes):
                subject = subject.decode("utf-8", "replace")
            return CommitInfo(
                sha=commit.hexsha,
                author=f"{author.name or ''} <{author.email or ''}>",
                authored_at=datetime.fromtimestamp(commit.authored_date, tz=UTC),
                subject=subject,
            )

    def is_ancestor(self, old: str, new: str) -> bool:
        """True if ``old`` is ``new`` or one of its ancestors; False also if ``old`` is unknown."""
        try:
            self._run(["merge-base", "--is-ancestor", old, new])
        except _GitFailed as exc:
            if exc.timed_out:
                raise self._error("cannot compare commits", exc) from None
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
            out = self._run(["ls-tree", "-r", "-z", "--full-tree", tree])
        except _GitFailed as exc:
            if exc.timed_out:
                raise self._error(f"cannot list {new[:12]}", exc) from None
            # The commit exists, so the folder does not (or is a file): no environments.
            return Changes(full=True, reason=reason)
        wanted: dict[str, str] = {}
        for entry in out.split(b"\0"):
            if not entry:
                continue
            meta, _, name = entry.partition(b"\t")
            mode, kind, sha = meta.decode().split(" ")
            relpath = name.decode("utf-8", "surrogateescape")
            if kind == "blob" and mode in _REGULAR_MODES and _is_env_file(relpath):
                wanted[relpath] = sha
        return Changes(full=True, reason=reason, files=self._read_blobs(wanted))

    def _incremental_load(self, old: str, new: str) -> Changes:
        args = ["diff-tree", "-r", "-z", "--no-renames", "--no-commit-id", old, new]
        if self.path:
            args += ["--", f":(literal){self.path}"]
        try:
            out = self._run(args)
        except _GitFailed as exc:
            raise self._error(f"cannot diff {old[:12]}..{new[:12]}", exc) from None
        fields = out.split(b"\0")
        wanted: dict[str, str] = {}
        deleted: set[str] = set()
        for i in range(0, len(fields) - 1, 2):
            meta = fields[i].decode()
            if not meta.startswith(":"):
                continue
            old_mode, new_mode, _old_sha, new_sha, _status = meta[1:].split(" ")
            relpath = self._rel(fields[i + 1].decode("utf-8", "surrogateescape"))
            if relpath is None or not _is_env_file(relpath):
                continue
            if new_mode in _REGULAR_MODES:
                wanted[relpath] = new_sha
            elif old_mode in _REGULAR_MODES:  # deleted, or now a symlink / submodule
                deleted.add(relpath)
        return Changes(full=False, files=self._read_blobs(wanted), deleted=frozenset(deleted))

    def _verify_commit(self, sha: str) -> None:
        try:
            self._run(["rev-parse", "--quiet", "--verify", f"{sha}^{{commit}}"])
        except _GitFailed as exc:
            if exc.timed_out:
                raise self._error(f"cannot read {sha[:12]}", exc) from None
            raise SourceError(f"unknown commit {sha[:12]}") from None

    def _read_blobs(self, wanted: dict[str, str]) -> dict[str, bytes]:
        """Read the blobs ``relpath -> sha`` with one ``git cat-file --batch``."""
        if not wanted:
            return {}
        shas = sorted(set(wanted.values()))
        try:
            out = self._run(["cat-file", "--batch"], input="".join(s + "\n" for s in shas).encode())
        except _GitFailed as exc:
            raise self._error("cannot read files", exc) from None
        blobs = dict(zip(shas, _parse_cat_file_batch(out, len(shas)), strict=True))
        result: dict[str, bytes] = {}
        for relpath, sha in sorted(wanted.items()):
            data = blobs[sha]
            if data is None:
                raise SourceError(f"cannot read {relpath}: object {sha[:12]} is missing")
            result[relpath] = data
        return result

    def read_file(self, sha: str, relpath: str) -> bytes | None:
        """The content of ``relpath`` (relative to ``path``) at ``sha``; None if absent."""
        full = posixpath.join(self.path, relpath.strip("/")) if self.path else relpath.strip("/")
        with self._repo_lock:
            commit = self._commit(sha)
            try:
                obj = commit.tree / full
            except KeyError:
                return None
            if obj.type != "blob" or f"{obj.mode:o}" not in _REGULAR_MODES:
                return None
            data: bytes = obj.data_stream.read()
            return data

    # -- watching, lifecycle ---------------------------------------------------------

    def is_local(self) -> bool:
        """A repository on this machine (a path or file://): it can be watched."""
        return _local_path(self.url) is not None

    def local_git_dir(self) -> Path | None:
        """For a local repository: the git directory to watch; None for a remote URL.

        The ``.git`` of a work tree (the common git dir of a linked work tree), or the
        bare repository itself.  The path may not exist (yet): check before watching.
        """
        local = _local_path(self.url)
        if local is None:
            return None
        try:
            out = self._run(
                ["-C", str(local), "rev-parse", "--path-format=absolute", "--git-common-dir"],
                git_dir=False,
            )
            return Path(out.decode().strip())
        except (_GitFailed, SourceError):
            dotgit = local / ".git"
            return dotgit if dotgit.is_dir() else local

    def close(self) -> None:
        """Release GitPython's persistent ``cat-file`` processes (reopened on next use)."""
        with self._repo_lock:
            if self._repo is not None:
                self._repo.close()
                self._repo = None

    def __enter__(self) -> GitSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- watching a local repository ----------------------------------------------------

if sys.platform == "linux":
    # What can move a ref, seen from the directory holding it: git's lock + rename (moved
    # to), a deletion (pack-refs), a plain create or write in place (other tools); and,
    # for the watched directory itself, its removal or renaming.
    _DIR_EVENTS = (
        Mask.CREATE
        | Mask.MOVED_TO
        | Mask.MOVED_FROM
        | Mask.DELETE
        | Mask.CLOSE_WRITE
        | Mask.DELETE_SELF
        | Mask.MOVE_SELF
        | Mask.ONLYDIR
        | Mask.EXCL_UNLINK
    )
    _GONE = Mask.DELETE_SELF | Mask.MOVE_SELF | Mask.UNMOUNT | Mask.IGNORED


def _ref_filter(git_dir: Path, branch: str) -> Callable[[str], bool]:
    """True for a path whose change may have moved ``branch``: its loose ref (and the
    directories of a nested name), ``packed-refs``, ``HEAD``, reftable files; lock files
    never."""
    prefix = str(git_dir) + os.sep
    ref = f"refs/heads/{branch}"
    watched = {"HEAD", "packed-refs", ref}
    # A nested branch (feature/x) may appear with its directory: accept the directory's
    # creation too, in case the file inside was written before its watch was set up.
    parent = posixpath.dirname(ref)
    while parent != "refs/heads":
        watched.add(parent)
        parent = posixpath.dirname(parent)

    def accept(path: str) -> bool:
        if not path.startswith(prefix) or path.endswith(".lock"):
            return False
        rel = path[len(prefix) :].replace(os.sep, "/")
        # reftable (git >= 2.45 --ref-format=reftable) keeps every ref in reftable/.
        return rel in watched or rel.startswith("reftable/")

    return accept


class _RefWatches:
    """The inotify watches behind :func:`watch_refs`, read by a callback on the loop.

    Watches the git directory (``HEAD``, ``packed-refs``), every existing directory from
    ``refs`` down to the one that holds the branch's loose ref, and ``reftable/`` if
    present: a handful of non-recursive watches.  When one of those directories appears,
    vanishes or is replaced, the watches are re-armed (and that counts as a change, since
    a ref may have been written before its directory was watched).  Nothing runs while
    nothing happens: the inotify descriptor sits in the event loop's selector.
    """

    def __init__(self, git_dir: Path, branch: str, wake: asyncio.Event) -> None:
        self.git_dir = git_dir
        self.accept = _ref_filter(git_dir, branch)
        parts = ["refs", "heads", *branch.split("/")[:-1]]
        # refs, refs/heads, refs/heads/feature, ...: each watched if it exists.
        self.chain = [git_dir.joinpath(*parts[: i + 1]) for i in range(len(parts))]
        self.reftable = git_dir / "reftable"
        self.dirs = {*self.chain, self.reftable}
        self.wake = wake
        self.changed = False
        self.error: OSError | None = None
        self.inotify = Inotify(cache_size=64)
        self.root: Watch | None = None
        self.watches: dict[Path, tuple[Watch, tuple[int, int]]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Put the watches in place; raises FileNotFoundError if ``git_dir`` is missing."""
        self.root = self.inotify.add_watch(self.git_dir, _DIR_EVENTS)
        self.rearm()
        self.changed = False  # directories found now are no news
        fd = self.inotify.fd
        os.set_blocking(fd, False)
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(fd, self._read)

    def close(self) -> None:
        loop, self.loop = self.loop, None
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self.inotify.fd)
        self.inotify.close()

    def take(self) -> bool:
        """Whether something changed since the last call; raises if watching broke."""
        if self.error is not None:
            raise self.error
        changed, self.changed = self.changed, False
        return changed

    # -- inside the event loop's reader callback --

    def _read(self) -> None:
        try:
            while True:
                try:
                    event = self.inotify.sync_get()
                except BlockingIOError:
                    break
                if event is None:  # pragma: no cover - only with a sync_timeout
                    break
                self._handle(event.mask, event.watch, event.name)
        except OSError as exc:
            self.error = exc
            self.close()
        if self.changed or self.error is not None:
            self.wake.set()

    def _handle(self, mask: Mask, watch: Watch | None, name: Path | None) -> None:
        if Mask.Q_OVERFLOW in mask:  # events were dropped: look again
            self.changed = True
            self.rearm()
            return
        if watch is None:
            return
        if watch is self.root:
            if name is None and mask & _GONE:
                raise FileNotFoundError(
                    errno.ENOENT, "the watched git directory was removed", str(self.git_dir)
                )
        elif not any(watch is w for w, _ in self.watches.values()):
            return  # a watch already replaced: its last events are stale
        if name is None:  # about the watched directory itself
            if mask & _GONE:
                self.rearm()
            return
        path = watch.path / name
        if self.accept(str(path)):
            self.changed = True
        if Mask.ISDIR in mask and path in self.dirs:
            self.rearm()

    def rearm(self) -> None:
        """Watch each directory of the chain down to the deepest existing one."""
        for i, path in enumerate(self.chain):
            if not self._arm(path):
                for below in self.chain[i:]:
                    self._drop(below)
                break
        self._arm(self.reftable)

    def _arm(self, path: Path) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is None or not stat.S_ISDIR(st.st_mode):
            self._drop(path)
            return False
        key = (st.st_dev, st.st_ino)
        current = self.watches.get(path)
        if current is not None and current[1] == key:
            return True
        self._drop(path)  # replaced (or moved away): its old watch follows the old inode
        try:
            watch = self.inotify.add_watch(path, _DIR_EVENTS)
        except (FileNotFoundError, NotADirectoryError):
            return False
        self.watches[path] = (watch, key)
        self.changed = True  # a ref inside may predate the watch
        return True

    def _drop(self, path: Path) -> None:
        entry = self.watches.pop(path, None)
        if entry is not None:
            with contextlib.suppress(OSError):  # already gone with its directory
                self.inotify.rm_watch(entry[0])


async def _set_when(event: asyncio.Event, then: asyncio.Event) -> None:
    await event.wait()
    then.set()


async def watch_refs(
    git_dir: Path,
    branch: str,
    *,
    stop: asyncio.Event | None = None,
    debounce_ms: int = 20,
    step_ms: int = 10,
    ready: asyncio.Event | None = None,
) -> AsyncIterator[None]:
    """Yield once per burst of changes that may have moved ``branch`` in ``git_dir``.

    Watches ``refs/heads/<branch>`` (written by lock + rename), ``packed-refs`` and
    ``HEAD`` (and ``reftable/``); lock files, objects and logs are ignored.  A yield means
    "re-read the head", never anything more.  After the first relevant event it waits for
    ``debounce_ms`` of quiet (at most 4 × ``debounce_ms`` in all), so that one commit or
    ``git pack-refs`` gives one yield.

    Linux only: inotify watches read on the event loop (``asyncinotify``), so an idle
    watch costs no CPU and no wake-ups; elsewhere this raises OSError (poll instead).
    ``step_ms`` is ignored (kept for compatibility: the previous watcher polled every
    step).

    Ends promptly once ``stop`` is set (cancelling the iteration never sets ``stop``).
    ``ready``, if given, is set once the watches are in place: a change after that is
    seen, so re-read the head then.  Raises FileNotFoundError if ``git_dir`` does not
    exist, or later if it is removed or renamed (call again to watch it anew).
    """
    del step_ms  # nothing polls any more
    if stop is not None and stop.is_set():
        return
    if sys.platform != "linux":
        raise OSError(f"watching a repository needs Linux inotify (not {sys.platform}): poll it")
    git_dir = Path(os.path.realpath(git_dir))
    wake = asyncio.Event()
    watches = _RefWatches(git_dir, branch, wake)
    forward = None
    try:
        watches.start()
        if stop is not None:
            forward = asyncio.create_task(_set_when(stop, wake))
        if ready is not None:
            ready.set()
        loop = asyncio.get_running_loop()
        quiet = max(debounce_ms, 0) / 1000
        while True:
            await wake.wait()
            wake.clear()
            if stop is not None and stop.is_set():
                return
            if not watches.take():
                continue
            give_up = loop.time() + 4 * quiet
            while (left := min(quiet, give_up - loop.time())) > 0:
                try:
                    async with asyncio.timeout(left):
                        await wake.wait()
                except TimeoutError:
                    break
                wake.clear()
                if stop is not None and stop.is_set():
                    return
                watches.take()  # more of the same burst (or an error, raised)
            yield None
    finally:
        if forward is not None:
            forward.cancel()
        watches.close()


def poll_delay(interval: float, jitter: float = 0.1, rng: random.Random | None = None) -> float:
    """``interval`` ± ``jitter`` (a fraction of it), uniform, never negative.

    A zero interval means "polling off": the caller must not poll, so it is a ValueError.
    """
    if interval <= 0:
        raise ValueError("poll interval must be positive (0 turns polling off)")
    if jitter < 0:
        raise ValueError("jitter must not be negative")
    r = rng if rng is not None else random
    return max(0.0, interval * (1.0 + r.uniform(-jitter, jitter)))
