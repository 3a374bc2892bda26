"""reconciler.source against real git repositories made with the git CLI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import resource
import shutil
import statistics
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from reconciler.source import Changes, GitSource, SourceError, poll_delay, watch_refs
from reconciler.source.gitcmd import git_env
from reconciler.source.tree import is_env_file
from reconciler.source.watch import ref_filter

WAIT = 10.0  # generous: only reached when something is broken

GIT_ENV = {
    **os.environ,
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "Ada Lovelace",
    "GIT_AUTHOR_EMAIL": "ada@example.com",
    "GIT_COMMITTER_NAME": "Ada Lovelace",
    "GIT_COMMITTER_EMAIL": "ada@example.com",
}


def git(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**GIT_ENV, **(env or {})},
        check=True,
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip()


def init_repo(path: Path, *, bare: bool = False) -> Path:
    args = ["init", "-q", "-b", "main"] + (["--bare"] if bare else []) + [str(path)]
    git(path.parent, *args)
    if not bare:
        git(path, "config", "user.name", "Ada Lovelace")
        git(path, "config", "user.email", "ada@example.com")
    return path


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


def commit(repo: Path, message: str, files: dict[str, str] | None = None) -> str:
    write(repo, files or {})
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A work-tree repository with environment files and distractors."""
    repo = init_repo(tmp_path / "work")
    commit(
        repo,
        "initial",
        {
            "envs/staging.yaml": "environment: staging\n",
            "envs/prod/production.yml": "environment: production\n",
            "envs/old.yaml": "environment: old\n",
            "envs/README.md": "not an environment\n",
            "envs/.hidden/secret.yaml": "hidden folder\n",
            "envs/.dotfile.yaml": "hidden file\n",
            "elsewhere/outside.yaml": "outside path\n",
            "top.yaml": "outside path\n",
        },
    )
    return repo


def source(repo: Path | str, tmp_path: Path, path: str = "envs", **kw: object) -> GitSource:
    return GitSource(str(repo), "main", path, tmp_path / "state" / "repo.git", **kw)  # type: ignore[arg-type]


# -- predicates and helpers -----------------------------------------------------------


@pytest.mark.parametrize(
    ("relpath", "expected"),
    [
        ("a.yaml", True),
        ("a.yml", True),
        ("sub/dir/a.yaml", True),
        ("a.json", False),
        ("a.yaml.bak", False),
        (".a.yaml", False),
        (".git/a.yaml", False),
        ("sub/.hidden/a.yaml", False),
        ("yaml", False),
    ],
)
def test_is_env_file(relpath: str, expected: bool) -> None:
    assert is_env_file(relpath) is expected


def test_git_never_prompts() -> None:
    env = git_env()
    assert env["GIT_TERMINAL_PROMPT"] == "0"
    assert env["GIT_ASKPASS"] == ""
    assert "BatchMode=yes" in env["GIT_SSH_COMMAND"] or "GIT_SSH_COMMAND" in os.environ


def test_invalid_configuration(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="invalid branch"):
        GitSource("/x", "bad..branch", ".", tmp_path / "w")
    with pytest.raises(SourceError, match="leaves the repository"):
        GitSource("/x", "main", "../up", tmp_path / "w")
    with pytest.raises(SourceError, match="invalid repository url"):
        GitSource("--upload-pack=evil", "main", ".", tmp_path / "w")


# -- fetching -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["path", "file-url", "bare-path"])
def test_clone_and_fetch(work: Path, tmp_path: Path, kind: str) -> None:
    if kind == "bare-path":
        repo: Path = tmp_path / "bare.git"
        git(tmp_path, "clone", "-q", "--bare", str(work), str(repo))
    else:
        repo = work
    url = repo.as_uri() if kind == "file-url" else str(repo)
    src = source(url, tmp_path)
    assert src.head() is None
    sha = src.fetch()
    assert sha == git(work, "rev-parse", "HEAD")
    assert src.head() == sha
    assert (tmp_path / "state" / "repo.git" / "HEAD").is_file()
    assert git(tmp_path / "state" / "repo.git", "rev-parse", "--is-bare-repository") == "true"

    new = commit(work, "second", {"envs/staging.yaml": "environment: staging\n# 2\n"})
    if kind == "bare-path":
        git(work, "push", "-q", str(repo), "main")
    assert src.fetch() == new
    assert src.fetch() == new  # no change
    src.close()


def test_fetch_nonexistent_repository(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(SourceError) as info:
        source(missing, tmp_path).fetch()
    message = str(info.value)
    assert str(missing) in message
    assert "main" in message
    assert "\n" not in message


def test_fetch_nonexistent_branch(work: Path, tmp_path: Path) -> None:
    src = GitSource(str(work), "release", ".", tmp_path / "state" / "repo.git")
    with pytest.raises(SourceError) as info:
        src.fetch()
    message = str(info.value)
    assert str(work) in message
    assert "'release' not found" in message
    assert src.head() is None


def test_fetch_empty_repository(tmp_path: Path) -> None:
    empty = init_repo(tmp_path / "empty.git", bare=True)
    with pytest.raises(SourceError, match=r"empty\.git \(branch main\): the repository is empty"):
        source(empty, tmp_path).fetch()


def test_fetch_error_hides_credentials(tmp_path: Path) -> None:
    url = "https://user:s3cret@127.0.0.1:1/repo.git"
    with pytest.raises(SourceError) as info:
        source(url, tmp_path, timeout=30).fetch()
    assert "s3cret" not in str(info.value)
    assert "https://***@127.0.0.1:1/repo.git" in str(info.value)


def test_fetch_timeout_kills_the_whole_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A "remote" whose transport hangs: git runs this ssh command, a grandchild of ours.
    monkeypatch.setenv("GIT_SSH_COMMAND", "sh -c 'sleep 60' --")
    src = source("ssh://example.invalid/repo.git", tmp_path, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(SourceError, match=r"timed out after 0\.5 s"):
        src.fetch()
    assert time.monotonic() - started < 5


def test_fetch_after_force_push_moves_the_ref(work: Path, tmp_path: Path) -> None:
    src = source(work, tmp_path)
    src.fetch()
    git(work, "commit", "-q", "--amend", "-m", "amended")
    rewritten = git(work, "rev-parse", "HEAD")
    assert src.fetch() == rewritten


# -- reading --------------------------------------------------------------------------


def test_commit_info(tmp_path: Path) -> None:
    repo = init_repo(tmp_path / "r")
    write(repo, {"a.yaml": "a\n"})
    git(repo, "add", "-A")
    git(
        repo,
        "commit",
        "-q",
        "-m",
        "Deploy api 1.4.2\n\nLonger body.",
        env={"GIT_AUTHOR_DATE": "2026-01-02T03:04:05+02:00"},
    )
    sha = git(repo, "rev-parse", "HEAD")
    src = source(repo, tmp_path, path=".")
    src.fetch()
    info = src.commit_info(sha)
    assert info.sha == sha
    assert info.author == "Ada Lovelace <ada@example.com>"
    assert info.subject == "Deploy api 1.4.2"
    assert info.authored_at == datetime(2026, 1, 2, 1, 4, 5, tzinfo=UTC)
    assert info.authored_at.utcoffset() is not None
    assert info.authored_at.tzinfo == UTC
    with pytest.raises(SourceError, match="unknown commit"):
        src.commit_info("0" * 40)
    src.close()


def test_a_remote_poll_that_finds_the_same_head_only_asks_ls_remote(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = source(work, tmp_path)
    monkeypatch.setattr(src, "is_local", lambda: False)  # fetched as a remote one is
    first = src.fetch()
    ran: list[str] = []
    real_popen = subprocess.Popen

    def popen(cmd: list[str], *args: object, **kwargs: object) -> subprocess.Popen[bytes]:
        if cmd[0] == "git" and cmd[1].startswith("--git-dir="):
            ran.append(next(a for a in cmd[1:] if not a.startswith("-")))
        return real_popen(cmd, *args, **kwargs)  # type: ignore[call-overload,no-any-return]

    monkeypatch.setattr(subprocess, "Popen", popen)
    assert src.fetch() == first
    assert ran == ["ls-remote"]
    ran.clear()
    new = commit(work, "next", {"envs/prod.yaml": "environment: prod\n"})
    assert src.fetch() == new
    assert ran == ["ls-remote", "fetch"]
    src.close()


def test_loads_read_the_commit_as_gitpython_does(tmp_path: Path) -> None:
    """The commit read along with the files (one cat-file batch) says what commit_info
    (GitPython) says; a message in another encoding is decoded by its `encoding` header
    (GitPython shows U+FFFD there)."""
    repo = init_repo(tmp_path / "r")
    git(repo, "config", "i18n.commitEncoding", "ISO-8859-1")
    shas = [commit(repo, "first", {"envs/a.yaml": "a\n"})]
    name = {"GIT_AUTHOR_NAME": "Zoë Ångström", "GIT_AUTHOR_EMAIL": "zoe@example.com"}
    write(repo, {"envs/a.yaml": "a2\n"})
    git(repo, "add", "-A")
    message = "Déployer api 1.4.2\n\nLonger body.\n"
    subprocess.run(
        ["git", "commit", "-q", "-F", "-"],
        cwd=repo,
        env={**GIT_ENV, **name, "GIT_AUTHOR_DATE": "2026-01-02T03:04:05-07:00"},
        input=message.encode("latin-1"),
        check=True,
    )
    shas.append(git(repo, "rev-parse", "HEAD"))
    src = source(repo, tmp_path)
    assert src.fetch() == shas[-1]
    full = src.load(None, shas[0])
    incremental = src.load(shas[0], shas[1])
    assert not incremental.full and incremental.files == {"a.yaml": b"a2\n"}
    assert full.commit == src.commit_info(shas[0])
    assert incremental.commit is not None
    gitpython = src.commit_info(shas[1])
    assert incremental.commit.author == gitpython.author == "Zoë Ångström <zoe@example.com>"
    assert incremental.commit.authored_at == gitpython.authored_at
    assert incremental.commit.authored_at == datetime(2026, 1, 2, 10, 4, 5, tzinfo=UTC)
    assert incremental.commit.subject == "Déployer api 1.4.2"
    src.close()


def test_incremental_load_runs_two_git_processes(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """diff-tree and one cat-file batch (blobs + the commit): no merge-base when the old
    commit is a parent of the new one, which is what a commit or a one-commit push makes.
    A rewrite (old no longer an ancestor) still asks merge-base, and loads everything."""
    src = source(work, tmp_path)
    old = src.fetch()
    src.load(None, old)
    new = commit(work, "next", {"envs/prod.yaml": "environment: prod\n"})
    assert src.fetch() == new
    ran: list[str] = []
    real_popen = subprocess.Popen

    def popen(cmd: list[str], *args: object, **kwargs: object) -> subprocess.Popen[bytes]:
        if cmd[0] == "git" and cmd[1].startswith("--git-dir="):  # the source's, not ours
            ran.append(next(a for a in cmd[1:] if not a.startswith("-")))
        return real_popen(cmd, *args, **kwargs)  # type: ignore[call-overload,no-any-return]

    monkeypatch.setattr(subprocess, "Popen", popen)
    changes = src.load(old, new)
    assert ran == ["diff-tree", "cat-file"]
    assert not changes.full and set(changes.files) == {"prod.yaml"}
    assert changes.commit is not None and changes.commit.subject == "next"
    git(work, "commit", "-q", "--amend", "-m", "rewritten")
    rewritten = src.fetch()
    ran.clear()
    changes = src.load(new, rewritten)
    assert changes.full and changes.reason is not None
    assert ran[:3] == ["diff-tree", "cat-file", "merge-base"]
    src.close()


def test_full_load_reads_only_env_files_under_path(work: Path, tmp_path: Path) -> None:
    os.symlink("staging.yaml", work / "envs" / "link.yaml")
    sha = commit(work, "symlink")
    src = source(work, tmp_path)
    assert src.fetch() == sha
    changes = src.load(None, sha)
    assert changes == Changes(
        full=True,
        reason=None,
        files={
            "old.yaml": b"environment: old\n",
            "prod/production.yml": b"environment: production\n",
            "staging.yaml": b"environment: staging\n",
        },
        deleted=frozenset(),
    )


def test_full_load_at_repository_root(work: Path, tmp_path: Path) -> None:
    src = source(work, tmp_path, path=".")
    sha = src.fetch()
    assert set(src.load(None, sha).files) == {
        "top.yaml",
        "elsewhere/outside.yaml",
        "envs/staging.yaml",
        "envs/prod/production.yml",
        "envs/old.yaml",
    }


def test_full_load_when_path_is_missing(work: Path, tmp_path: Path) -> None:
    src = source(work, tmp_path, path="no/such/folder")
    sha = src.fetch()
    assert src.load(None, sha) == Changes(full=True)
    with pytest.raises(SourceError, match="unknown commit"):
        src.load(None, "1" * 40)


def test_incremental_load_returns_only_changed_env_files(work: Path, tmp_path: Path) -> None:
    src = source(work, tmp_path)
    old = src.fetch()
    commit(
        work,
        "change things",
        {
            "envs/staging.yaml": "environment: staging\nv: 2\n",  # modified
            "envs/prod/canary.yaml": "environment: canary\n",  # added
            "envs/README.md": "changed, not an env file\n",
            "envs/.hidden/secret.yaml": "changed, hidden\n",
            "envs/.dotfile.yaml": "changed, hidden\n",
            "elsewhere/outside.yaml": "changed, outside path\n",
            "top.yaml": "changed, outside path\n",
            "envs/.hidden/new.yaml": "added, hidden\n",
        },
    )
    git(work, "mv", "envs/prod/production.yml", "envs/prod/prod.yaml")  # renamed
    git(work, "rm", "-q", "envs/old.yaml")  # deleted
    git(work, "commit", "-q", "-m", "rename and delete")
    # A file added then removed between old and new never shows up.
    commit(work, "add temp", {"envs/temp.yaml": "temp\n"})
    git(work, "rm", "-q", "envs/temp.yaml")
    git(work, "commit", "-q", "-m", "remove temp")
    new = src.fetch()

    changes = src.load(old, new)
    assert changes == Changes(
        full=False,
        reason=None,
        files={
            "staging.yaml": b"environment: staging\nv: 2\n",
            "prod/canary.yaml": b"environment: canary\n",
            "prod/prod.yaml": b"environment: production\n",
        },
        deleted=frozenset({"old.yaml", "prod/production.yml"}),
    )


def test_incremental_load_ignores_changes_outside_path(work: Path, tmp_path: Path) -> None:
    src = source(work, tmp_path)
    old = src.fetch()
    commit(work, "outside", {"top.yaml": "2\n", "envs2/x.yaml": "prefix trap\n"})
    new = src.fetch()
    assert src.load(old, new) == Changes(full=False)


def test_env_file_becoming_a_symlink_is_deleted(work: Path, tmp_path: Path) -> None:
    src = source(work, tmp_path)
    old = src.fetch()
    (work / "envs" / "old.yaml").unlink()
    os.symlink("staging.yaml", work / "envs" / "old.yaml")
    new = commit(work, "symlink")
    src.fetch()
    assert src.load(old, new) == Changes(full=False, deleted=frozenset({"old.yaml"}))


def test_same_commit_means_nothing_to_do(work: Path, tmp_path: Path) -> None:
    src = source(work, tmp_path)
    sha = src.fetch()
    assert src.load(sha, sha) == Changes(full=False, reason=None, files={}, deleted=frozenset())


def test_force_push_gives_a_full_load_with_reason(work: Path, tmp_path: Path) -> None:
    bare = tmp_path / "remote.git"
    git(tmp_path, "clone", "-q", "--bare", str(work), str(bare))
    first = git(work, "rev-parse", "HEAD")
    applied = commit(work, "to be dropped", {"envs/staging.yaml": "environment: staging\nv: 2\n"})
    git(work, "push", "-q", str(bare), "main")
    src = source(bare, tmp_path)
    assert src.fetch() == applied

    git(work, "reset", "-q", "--hard", first)
    rewritten = commit(
        work, "rewrite", {"envs/prod/production.yml": "environment: production\n#\n"}
    )
    git(work, "push", "-q", "--force", str(bare), "main")
    assert src.fetch() == rewritten

    assert src.is_ancestor(first, rewritten)
    assert not src.is_ancestor(applied, rewritten)
    assert not src.is_ancestor("0" * 40, rewritten)
    changes = src.load(applied, rewritten)
    assert changes.full
    assert changes.reason == (
        f"history rewritten: {applied[:7]} is not an ancestor of {rewritten[:7]}"
    )
    assert changes.files["staging.yaml"] == b"environment: staging\n"
    assert changes.files["prod/production.yml"] == b"environment: production\n#\n"
    assert changes.deleted == frozenset()
    # An old commit the mirror never had is "not an ancestor" as well.
    assert src.load("f" * 40, rewritten).reason is not None


def test_ignores_git_dir_of_a_calling_hook(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = init_repo(tmp_path / "other")
    commit(other, "unrelated", {"envs/staging.yaml": "wrong repository\n"})
    monkeypatch.setenv("GIT_DIR", str(other / ".git"))
    monkeypatch.setenv("GIT_WORK_TREE", str(other))
    src = source(work, tmp_path)
    sha = src.fetch()
    assert sha == git(work, "rev-parse", "HEAD")
    assert src.read_file(sha, "staging.yaml") == b"environment: staging\n"
    assert src.load(None, sha).files["staging.yaml"] == b"environment: staging\n"
    assert src.commit_info(sha).subject == "initial"
    src.close()


def test_read_file(work: Path, tmp_path: Path) -> None:
    src = source(work, tmp_path)
    sha = src.fetch()
    assert src.read_file(sha, "staging.yaml") == b"environment: staging\n"
    assert src.read_file(sha, "prod/production.yml") == b"environment: production\n"
    assert src.read_file(sha, "missing.yaml") is None
    assert src.read_file(sha, "prod") is None  # a folder
    with pytest.raises(SourceError):
        src.read_file("2" * 40, "staging.yaml")
    src.close()
    assert src.read_file(sha, "staging.yaml") == b"environment: staging\n"  # reopens
    src.close()


def test_local_git_dir(work: Path, tmp_path: Path) -> None:
    bare = tmp_path / "b.git"
    git(tmp_path, "clone", "-q", "--bare", str(work), str(bare))
    state = tmp_path / "state"
    assert GitSource(str(work), "main", ".", state).local_git_dir() == work / ".git"
    assert GitSource(work.as_uri(), "main", ".", state).local_git_dir() == work / ".git"
    assert GitSource(str(bare), "main", ".", state).local_git_dir() == bare
    assert GitSource(bare.as_uri(), "main", ".", state).local_git_dir() == bare
    for remote in (
        "https://example.com/x.git",
        "ssh://git@example.com/x.git",
        "git@example.com:org/x.git",
    ):
        assert GitSource(remote, "main", ".", state).local_git_dir() is None


# -- watching -------------------------------------------------------------------------


def test_ref_filter() -> None:
    accept = ref_filter(Path("/r/.git"), "feature/x")
    assert accept("/r/.git/refs/heads/feature/x")
    assert accept("/r/.git/refs/heads/feature")
    assert accept("/r/.git/packed-refs")
    assert accept("/r/.git/HEAD")
    assert accept("/r/.git/reftable/tables.list")
    assert not accept("/r/.git/refs/heads/feature/x.lock")
    assert not accept("/r/.git/reftable/tables.list.lock")
    assert not accept("/r/.git/packed-refs.lock")
    assert not accept("/r/.git/refs/heads/main")
    assert not accept("/r/.git/refs/heads/feature/xy")
    assert not accept("/r/.git/logs/refs/heads/feature/x")
    assert not accept("/r/.git/objects/ab/cdef")
    assert not accept("/r/.git/ORIG_HEAD")
    assert not accept("/elsewhere/HEAD")


#: Both watchers, on Linux too: watchfiles is the one macOS and Windows get ("auto").
BACKENDS = pytest.mark.parametrize("backend", ["inotify", "watchfiles"])


class Watch:
    """watch_refs, started and in place on entry; each wait bounded by WAIT."""

    def __init__(self, git_dir: Path, branch: str = "main", **kw: object) -> None:
        self.git_dir = git_dir
        self.ready = asyncio.Event()
        self.it = watch_refs(git_dir, branch, ready=self.ready, **kw)  # type: ignore[arg-type]
        self.pending: asyncio.Future[None] | None = None

    async def __aenter__(self) -> Watch:
        self.pending = asyncio.ensure_future(self._anext())
        await asyncio.wait_for(self.ready.wait(), WAIT)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.pending is not None:
            self.pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await self.pending
        await self.it.aclose()  # type: ignore[attr-defined]

    async def _anext(self) -> None:
        await anext(self.it)

    async def next(self) -> None:
        pending, self.pending = self.pending, None
        await asyncio.wait_for(pending if pending is not None else self._anext(), WAIT)

    async def until_head(self, ref: str, expected: str) -> int:
        """Wait for yields until `ref` reads `expected` (a yield means re-read); count them."""
        yields = 0
        while True:
            await self.next()
            yields += 1
            head = await asyncio.to_thread(git, self.git_dir, "rev-parse", "--verify", "-q", ref)
            if head == expected:
                return yields


@BACKENDS
def test_watch_yields_after_commit_in_work_tree(work: Path, backend: str) -> None:
    async def main() -> None:
        async with Watch(work / ".git", backend=backend) as watch:
            sha = await asyncio.to_thread(commit, work, "watched", {"envs/a.yaml": "a\n"})
            await watch.until_head("refs/heads/main", sha)

    asyncio.run(main())


@pytest.mark.parametrize("branch", ["main", "team/feature"])
def test_inotify_watch_yields_for_a_commit_without_waiting_for_quiet(
    work: Path, branch: str
) -> None:
    """The branch ref renamed into place is final: the yield does not wait for the burst's
    quiet time (here a minute, far beyond WAIT), which a pack-refs still gets."""
    if branch != "main":
        git(work, "checkout", "-q", "-b", branch)

    async def main() -> None:
        async with Watch(work / ".git", branch, debounce_ms=60_000, backend="inotify") as watch:
            for i in range(3):
                sha = await asyncio.to_thread(commit, work, f"c{i}", {"envs/a.yaml": f"{i}\n"})
                assert await watch.until_head(f"refs/heads/{branch}", sha) == 1

    asyncio.run(main())


@BACKENDS
def test_watch_yields_for_nested_branch_name(work: Path, backend: str) -> None:
    async def main() -> None:
        git(work, "checkout", "-q", "-b", "other")
        async with Watch(work / ".git", "feature/x", backend=backend) as watch:
            await asyncio.to_thread(git, work, "checkout", "-q", "-b", "feature/x")
            sha = await asyncio.to_thread(commit, work, "on feature", {"envs/f.yaml": "f\n"})
            await watch.until_head("refs/heads/feature/x", sha)

    asyncio.run(main())


@BACKENDS
def test_watch_sees_nested_branch_directories_created_after_start(
    work: Path, tmp_path: Path, backend: str
) -> None:
    bare = tmp_path / "remote.git"
    git(tmp_path, "clone", "-q", "--bare", str(work), str(bare))
    branch = "team/feature/x"
    assert not (bare / "refs" / "heads" / "team").exists()

    async def main() -> None:
        async with Watch(bare, branch, backend=backend) as watch:
            # Two directory levels appear with the ref: watched as they come.
            sha = await asyncio.to_thread(commit, work, "new branch", {"envs/n.yaml": "n\n"})
            await asyncio.to_thread(git, work, "push", "-q", str(bare), f"HEAD:{branch}")
            await watch.until_head(f"refs/heads/{branch}", sha)
            # An update inside the directories that now exist.
            sha = await asyncio.to_thread(commit, work, "update", {"envs/n.yaml": "n2\n"})
            await asyncio.to_thread(git, work, "push", "-q", str(bare), f"HEAD:{branch}")
            await watch.until_head(f"refs/heads/{branch}", sha)
            # pack-refs removes the loose ref and its now empty directories...
            await asyncio.to_thread(git, bare, "pack-refs", "--all")
            assert not (bare / "refs" / "heads" / "team").exists()
            await watch.next()
            # ... which come back with the next push: watched again.
            sha = await asyncio.to_thread(commit, work, "again", {"envs/n.yaml": "n3\n"})
            await asyncio.to_thread(git, work, "push", "-q", str(bare), f"HEAD:{branch}")
            assert (bare / "refs" / "heads" / "team" / "feature" / "x").is_file()
            await watch.until_head(f"refs/heads/{branch}", sha)

    asyncio.run(main())


def test_watch_makes_no_wake_ups_while_idle(work: Path) -> None:
    async def main() -> tuple[float, int]:
        async with Watch(work / ".git", stop=asyncio.Event()):
            await asyncio.sleep(0.2)  # settle
            cpu, before = time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
            await asyncio.sleep(1.0)
            after = resource.getrusage(resource.RUSAGE_SELF)
            return time.process_time() - cpu, after.ru_nvcsw - before.ru_nvcsw

    cpu, switches = asyncio.run(main())
    # The watchfiles watcher (step 10 ms) woke ~100 times and used ~5 ms of CPU here.
    assert switches < 10, f"{switches} voluntary context switches in 1 s of idle watching"
    assert cpu < 0.0025, f"{cpu:.4f} CPU s in 1 s of idle watching"


@BACKENDS
def test_watch_gives_one_yield_per_burst(work: Path, backend: str) -> None:
    async def main() -> None:
        async with Watch(work / ".git", debounce_ms=100, backend=backend) as watch:
            # Rewrites packed-refs and deletes the loose ref: two events, one yield.
            await asyncio.to_thread(git, work, "pack-refs", "--all")
            await watch.next()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(watch.next(), 0.5)

    asyncio.run(main())


@BACKENDS
def test_watch_raises_when_the_git_dir_is_removed(work: Path, tmp_path: Path, backend: str) -> None:
    bare = tmp_path / "remote.git"
    git(tmp_path, "clone", "-q", "--bare", str(work), str(bare))

    async def main() -> None:
        async with Watch(bare, backend=backend) as watch:
            await asyncio.to_thread(shutil.rmtree, bare)
            with pytest.raises(FileNotFoundError):
                while True:  # removing refs/heads/main may come first: a yield
                    await watch.next()

    asyncio.run(main())


@BACKENDS
def test_watch_yields_after_push_into_bare_repo(work: Path, tmp_path: Path, backend: str) -> None:
    bare = tmp_path / "remote.git"
    git(tmp_path, "clone", "-q", "--bare", str(work), str(bare))

    async def main() -> None:
        async with Watch(bare, backend=backend) as watch:
            sha = await asyncio.to_thread(commit, work, "pushed", {"envs/p.yaml": "p\n"})
            await asyncio.to_thread(git, work, "push", "-q", str(bare), "main")
            await watch.until_head("refs/heads/main", sha)

    asyncio.run(main())


@BACKENDS
def test_watch_yields_with_packed_refs(work: Path, tmp_path: Path, backend: str) -> None:
    bare = tmp_path / "remote.git"
    git(tmp_path, "clone", "-q", "--bare", str(work), str(bare))

    async def main() -> None:
        async with Watch(bare, backend=backend) as watch:
            await asyncio.to_thread(git, bare, "pack-refs", "--all")
            assert not (bare / "refs" / "heads" / "main").exists()
            await watch.next()  # packed-refs rewritten, loose ref removed
            # The ref now lives only in packed-refs; a push moves it.
            sha = await asyncio.to_thread(commit, work, "after pack", {"envs/q.yaml": "q\n"})
            await asyncio.to_thread(git, work, "push", "-q", str(bare), "main")
            await watch.until_head("refs/heads/main", sha)
            # Packed again with the new value, then a commit in a packed work tree.
            await asyncio.to_thread(git, work / ".git", "pack-refs", "--all")
            sha = await asyncio.to_thread(commit, work, "again", {"envs/q.yaml": "q2\n"})
            await asyncio.to_thread(git, work, "push", "-q", str(bare), "main")
            await watch.until_head("refs/heads/main", sha)

    asyncio.run(main())


@BACKENDS
def test_watch_yields_after_commit_in_packed_work_tree(work: Path, backend: str) -> None:
    git(work, "pack-refs", "--all")
    assert not (work / ".git" / "refs" / "heads" / "main").exists()

    async def main() -> None:
        async with Watch(work / ".git", backend=backend) as watch:
            sha = await asyncio.to_thread(commit, work, "after pack", {"envs/a.yaml": "a\n"})
            await watch.until_head("refs/heads/main", sha)

    asyncio.run(main())


@BACKENDS
def test_watch_stops_when_stop_is_set(work: Path, backend: str) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        async with Watch(work / ".git", stop=stop, backend=backend) as watch:
            started = time.monotonic()
            stop.set()
            with pytest.raises(StopAsyncIteration):
                await watch.next()
            assert time.monotonic() - started < 2
        # Already set: ends at once.
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(
                anext(watch_refs(work / ".git", "main", stop=stop, backend=backend)), WAIT
            )

    asyncio.run(main())


@BACKENDS
def test_cancelling_the_watch_does_not_set_stop(work: Path, backend: str) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        ready = asyncio.Event()

        async def consume() -> None:
            async for _ in watch_refs(
                work / ".git", "main", stop=stop, ready=ready, backend=backend
            ):
                pass

        task = asyncio.create_task(consume())
        await asyncio.wait_for(ready.wait(), WAIT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT)
        assert not stop.is_set()

    asyncio.run(main())


@BACKENDS
def test_watch_missing_directory(tmp_path: Path, backend: str) -> None:
    async def main() -> None:
        await anext(watch_refs(tmp_path / "nope", "main", backend=backend))

    with pytest.raises(FileNotFoundError):
        asyncio.run(main())


# -- polling --------------------------------------------------------------------------


def test_poll_delay_bounds() -> None:
    rng = random.Random(42)
    samples = [poll_delay(30.0, 0.1, rng) for _ in range(2000)]
    assert all(27.0 <= s <= 33.0 for s in samples)
    assert min(samples) < 27.3 and max(samples) > 32.7  # spread over the whole range
    assert poll_delay(30.0, 0.0) == 30.0
    assert all(poll_delay(1.0, 3.0, rng) >= 0.0 for _ in range(200))
    assert 0.9 <= poll_delay(1.0) <= 1.1
    with pytest.raises(ValueError):
        poll_delay(0)
    with pytest.raises(ValueError):
        poll_delay(-1)
    with pytest.raises(ValueError):
        poll_delay(10, -0.1)


# -- measurements (printed, not asserted; run with -s to see them) ----------------------


def test_measure_latency_and_speed(tmp_path: Path) -> None:
    repo = init_repo(tmp_path / "big")
    commit(repo, "1000 files", {f"envs/e{i:04}.yaml": f"environment: e{i}\n" for i in range(1000)})
    src = source(repo, tmp_path)
    sha = src.fetch()

    fetches = []
    for _ in range(20):
        started = time.perf_counter()
        src.fetch()
        fetches.append(time.perf_counter() - started)
    loads = []
    for _ in range(5):
        started = time.perf_counter()
        assert len(src.load(None, sha).files) == 1000
        loads.append(time.perf_counter() - started)

    async def main() -> list[float]:
        latencies = []
        async with Watch(repo / ".git") as watch:
            for n in range(20):
                new = await asyncio.to_thread(commit, repo, f"c{n}", {"envs/e0000.yaml": f"{n}\n"})
                done = time.perf_counter()
                await watch.next()
                latencies.append(time.perf_counter() - done)
                head = await asyncio.to_thread(git, repo, "rev-parse", "HEAD")
                if head != new:  # pragma: no cover - the first yield came early
                    await watch.until_head("refs/heads/main", new)
        return latencies

    latencies = asyncio.run(main())
    old, new = sha, src.fetch()
    started = time.perf_counter()
    changes = src.load(old, new)
    incremental = time.perf_counter() - started
    assert changes.files == {"e0000.yaml": b"19\n"}
    src.close()

    def ms(values: list[float]) -> str:
        return (
            f"median {statistics.median(values) * 1000:.1f} ms, "
            f"min {min(values) * 1000:.1f}, max {max(values) * 1000:.1f}"
        )

    print()
    print(f"no-change fetch (local, 20x):        {ms(fetches)}")
    print(f"full load of 1,000 env files (5x):   {ms(loads)}")
    print(f"incremental load (1 file of 1,000):  {incremental * 1000:.1f} ms")
    print(f"commit -> watch_refs yield (20x):    {ms(latencies)}")


def test_local_fetch_follows_loose_and_packed_refs_through_shared_objects(
    work: Path, tmp_path: Path
) -> None:
    src = source(work, tmp_path)
    first = src.fetch()
    mirror = tmp_path / "state" / "repo.git"
    alternates = (mirror / "objects" / "info" / "alternates").read_text().split()
    assert alternates == [str((work / ".git" / "objects").resolve())]
    git(work, "pack-refs", "--all")  # the loose ref is gone: packed-refs has it
    assert not (work / ".git" / "refs" / "heads" / "main").exists()
    assert src.fetch() == first
    second = commit(work, "second", {"envs/staging.yaml": "environment: staging\n# 2\n"})
    assert src.fetch() == second == git(mirror, "rev-parse", "refs/heads/main")
    # The mirror reads the new commit's files through the shared objects.
    assert src.load(first, second).files == {"staging.yaml": b"environment: staging\n# 2\n"}
    git(work, "branch", "-q", "-m", "main", "renamed")
    with pytest.raises(SourceError, match="branch 'main' not found"):
        src.fetch()
    src.close()


# -- the applied commit: kept readable by the mirror alone -----------------------------


def _rewrite_and_prune(repo: Path) -> str:
    """A force push that drops every earlier commit, then a gc that deletes them."""
    git(repo, "checkout", "-q", "--orphan", "rewritten")
    new = commit(repo, "rewritten", {"envs/staging.yaml": "environment: staging-2\n"})
    git(repo, "branch", "-q", "-M", "main")
    git(repo, "reflog", "expire", "--expire=now", "--all")
    git(repo, "gc", "-q", "--prune=now")
    return new


def test_the_applied_commit_survives_a_rewrite_and_gc_of_the_source(
    work: Path, tmp_path: Path
) -> None:
    url = str(work)  # local: the mirror borrows the source's objects (alternates)
    src = source(url, tmp_path)
    applied = src.fetch()
    src.keep(applied)
    new = _rewrite_and_prune(work)
    assert src.fetch() == new  # a refused head still moves the branch of the mirror
    src.close()
    # A fresh process (a restart, or `reconciler status`) reads it from the mirror alone.
    fresh = source(url, tmp_path)
    assert fresh.commit_info(applied).subject == "initial"
    loaded = fresh.load(None, applied)
    assert loaded.files["staging.yaml"] == b"environment: staging\n"
    assert not fresh.is_ancestor(applied, new)
    # Keeping the next commit lets the previous one go, and reads the same.
    fresh.keep(new)
    assert fresh.load(None, new).files["staging.yaml"] == b"environment: staging-2\n"
    assert len(list((tmp_path / "state" / "repo.git" / "objects" / "pack").glob("*.pack"))) == 1
    fresh.close()


def test_a_fetch_that_moves_the_head_recycles_the_cat_file_processes(
    work: Path, tmp_path: Path
) -> None:
    """A long-lived `git cat-file` keeps serving objects of packs deleted since (a gc in
    the source): after a fetch that moves the head, the mirror answers as a restart would."""
    src = source(work, tmp_path)
    old = src.fetch()
    git(work, "gc", "-q")
    assert src.commit_info(old).subject == "initial"  # starts the persistent processes
    new = _rewrite_and_prune(work)
    assert src.fetch() == new
    with pytest.raises(SourceError, match="unknown commit"):
        src.commit_info(old)
    src.close()
