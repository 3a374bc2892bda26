"""The mirror: a bare, single-branch copy of the desired-state branch in the state directory.

A :class:`GitSource` fetches the configured branch into ``workdir``
(``state_dir/"repo.git"``) and reads everything from there by commit id (through
:class:`~reconciler.source.tree.TreeReader`). GitPython's persistent ``cat-file``
processes serve small look-ups (commit metadata, one file, the branch head);
:meth:`GitSource.close` releases them.

The blocking methods are meant to be called through ``asyncio.to_thread``; a
:class:`GitSource` serialises its own use of GitPython, so concurrent calls are safe.
"""

from __future__ import annotations

import contextlib
import posixpath
import threading
from datetime import UTC, datetime
from pathlib import Path

import git

from reconciler.source.gitcmd import (
    DEFAULT_TIMEOUT,
    SHA,
    GitFailed,
    GitRunner,
    SourceError,
    check_branch,
    local_path,
)
from reconciler.source.tree import REGULAR_MODES, Changes, CommitInfo, TreeReader, normalise_path

#: Where the mirror keeps the last applied commit (see GitSource.keep).
APPLIED_REF = "refs/reconciler/applied"
# The file in the mirror naming the pack that holds the applied commit's own objects.
_KEPT_PACK = "reconciler-applied-pack"


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
        check_branch(branch)
        self.url = url
        self.branch = branch
        self.path = normalise_path(path)
        self.workdir = Path(workdir)
        self._git = GitRunner(self.workdir, url, timeout)
        self._run = self._git.run
        self._error = self._git.error
        self._scrub = self._git.scrub
        self._tree = TreeReader(self._git, self.path)
        self._display_url = self._git.display_url
        self._ref = f"refs/heads/{branch}"
        self._repo: git.Repo | None = None
        self._repo_lock = threading.RLock()  # GitPython's cat-file processes: one user at a time
        self._fetch_lock = threading.Lock()
        self._shared: Path | None = None  # a local source's git dir, whose objects we borrow

    @property
    def timeout(self) -> float:
        return self._git.timeout

    def __repr__(self) -> str:
        return f"GitSource({self._display_url!r}, branch={self.branch!r}, path={self.path!r})"

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
        except GitFailed as exc:
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
            return loose if SHA.fullmatch(loose) else None
        try:
            packed = (git_dir / "packed-refs").read_text()
        except OSError:
            return None
        for line in packed.splitlines():
            sha, _, name = line.partition(" ")
            if name == self._ref and SHA.fullmatch(sha):
                return sha
        return None

    def fetch(self) -> str:
        """Bring the mirror's branch to the remote branch head (forced) and return its sha."""
        with self._fetch_lock:
            before = self.head()
            sha = self._fetch()
            if sha != before:
                # GitPython's long-lived cat-file processes keep serving packs deleted
                # since they started (a gc in the source): start afresh, so that what the
                # mirror answers is what a restart would.
                self.close()
            return sha

    def _fetch(self) -> str:
        self._ensure_mirror()
        self._share_local_objects()
        action = f"cannot fetch {self._display_url} (branch {self.branch})"
        if self._shared is not None:
            # The objects are shared already: moving the ref is the whole fetch.
            sha = self._local_head(self._shared)
            if sha is not None:
                with contextlib.suppress(GitFailed):  # e.g. not a commit: fetch says why
                    if sha != self.head():
                        self._run(["update-ref", self._ref, f"{sha}^{{commit}}"])
                    return sha
        unchanged = self._remote_unchanged(action)
        if unchanged is not None:
            return unchanged
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
                    self._git.git_url,
                    f"+{self._ref}:{self._ref}",
                ]
            )
        except GitFailed as exc:
            raise SourceError(f"{action}: {self._fetch_reason(exc)}") from None
        sha = self.head()
        if sha is None:  # pragma: no cover - git said it fetched
            raise SourceError(f"{action}: the branch did not arrive")
        return sha

    def _remote_unchanged(self, action: str) -> str | None:
        """The mirror's head if the remote branch is still there, asked with one
        ``ls-remote`` (a poll usually finds nothing new, and a ``git fetch`` that brings
        nothing costs twice its CPU and five times its wall time). Any doubt: None, and
        the fetch that follows says what is wrong."""
        mirrored = self.head()
        if mirrored is None:
            return None
        try:
            out = self._run(["ls-remote", "--", self._git.git_url, self._ref])
        except GitFailed as exc:
            if exc.timed_out:  # the fetch would wait as long again
                raise SourceError(f"{action}: {self._fetch_reason(exc)}") from None
            return None
        for line in out.decode("utf-8", "replace").splitlines():
            sha, _, name = line.partition("\t")
            if name == self._ref:
                return mirrored if sha == mirrored else None
        return None

    def keep(self, sha: str) -> None:
        """Keep ``sha`` (the last applied commit) readable from the mirror alone.

        The branch ref moves with every fetch, also to a head that is refused (a force
        push), and a local source's objects are only borrowed (alternates): a gc there
        would take the applied commit with it, and with it the desired state the daemon
        shows and compares against. So ``refs/reconciler/applied`` points at it, and for a
        borrowing mirror the objects needed to read it (the commit, and the trees and blobs
        under ``path``) are copied into one pack of the mirror's own, which replaces the
        previous commit's pack.
        """
        with self._fetch_lock:
            try:
                self._run(["update-ref", APPLIED_REF, f"{sha}^{{commit}}"])
                if (self.workdir / "objects" / "info" / "alternates").is_file():
                    self._pack_own(sha)
            except GitFailed as exc:
                raise self._error(f"cannot keep {sha[:12]}", exc) from None
            except OSError as exc:
                raise SourceError(f"cannot keep {sha[:12]}: {exc.strerror or exc}") from None

    def _pack_own(self, sha: str) -> None:
        args = ["rev-list", "--objects", "--no-walk", sha]
        if self.path:
            args += ["--", f":(literal){self.path}"]
        objects = self._run(args)
        pack_dir = self.workdir / "objects" / "pack"
        # Objects borrowed from the alternate are packed too (no --local).
        name = self._run(["pack-objects", "-q", str(pack_dir / "pack")], input=objects)
        kept = name.decode().strip()
        marker = self.workdir / _KEPT_PACK
        try:
            previous = marker.read_text().strip()
        except FileNotFoundError:
            previous = ""
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(kept + "\n")
        tmp.replace(marker)
        if previous and previous != kept and SHA.fullmatch(previous):
            for ext in (".pack", ".idx", ".rev", ".bitmap"):
                (pack_dir / f"pack-{previous}{ext}").unlink(missing_ok=True)

    def _fetch_reason(self, exc: GitFailed) -> str:
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
            return not self._run(["ls-remote", "--", self._git.git_url]).strip()
        except (GitFailed, SourceError):
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
        return self._tree.is_ancestor(old, new)

    def load(self, old: str | None, new: str) -> Changes:
        """The environment files to parse at ``new``, knowing ``old`` was applied before."""
        return self._tree.load(old, new)

    def read_file(self, sha: str, relpath: str) -> bytes | None:
        """The content of ``relpath`` (relative to ``path``) at ``sha``; None if absent."""
        full = posixpath.join(self.path, relpath.strip("/")) if self.path else relpath.strip("/")
        return self.read_repo_file(sha, full)

    def file_commits(self, sha: str, repo_path: str) -> list[str]:
        """The commits from ``sha`` back that changed ``repo_path`` (relative to the
        repository's root), newest first (`git log`, history simplified as by default)."""
        try:
            out = self._run(["log", "--format=%H", sha, "--", f":(literal){repo_path}"])
        except GitFailed as exc:
            raise self._error(f"cannot read the history of {repo_path}", exc) from None
        return out.decode().split()

    def descendants(self, sha: str, head: str) -> list[str]:
        """The commits that descend from ``sha`` and lead to ``head`` (``head`` included,
        ``sha`` not): `git rev-list --ancestry-path`."""
        try:
            out = self._run(["rev-list", "--ancestry-path", f"{sha}..{head}", "--"])
        except GitFailed as exc:
            raise self._error(f"cannot list the commits after {sha[:12]}", exc) from None
        return out.decode().split()

    def read_repo_file(self, sha: str, full: str) -> bytes | None:
        """The content of ``full`` (relative to the repository's root) at ``sha``; None
        if absent."""
        with self._repo_lock:
            commit = self._commit(sha)
            try:
                obj = commit.tree / full
            except KeyError:
                return None
            if obj.type != "blob" or f"{obj.mode:o}" not in REGULAR_MODES:
                return None
            data: bytes = obj.data_stream.read()
            return data

    # -- watching, lifecycle ---------------------------------------------------------

    def is_local(self) -> bool:
        """A repository on this machine (a path or file://): it can be watched."""
        return local_path(self.url) is not None

    def local_git_dir(self) -> Path | None:
        """For a local repository: the git directory to watch; None for a remote URL.

        The ``.git`` of a work tree (the common git dir of a linked work tree), or the
        bare repository itself.  The path may not exist (yet): check before watching.
        """
        local = local_path(self.url)
        if local is None:
            return None
        try:
            out = self._run(
                ["-C", str(local), "rev-parse", "--path-format=absolute", "--git-common-dir"],
                git_dir=False,
            )
            return Path(out.decode().strip())
        except (GitFailed, SourceError):
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
