"""Running git: one-shot subprocesses that never prompt and die whole at their timeout.

Git never prompts: ``GIT_TERMINAL_PROMPT=0``, no askpass, ``ssh -o BatchMode=yes``; and
variables that would point git at another repository (a daemon started from a git hook)
are dropped.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

DEFAULT_TIMEOUT = 120.0

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


SHA = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")  # SHA-1 or SHA-256 object names


class SourceError(Exception):
    """One-line, user-facing message (no traceback).

    For example ``cannot fetch /srv/x (branch main): repository not found``.
    """


def redact_url(url: str) -> str:
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


# A credential helper that answers from the environment git runs in (see credentials).
_ENV_HELPER = (
    '!f() { test "$1" = get && printf "username=%s\\npassword=%s\\n" '
    '"$RECONCILER_GIT_USERNAME" "$RECONCILER_GIT_PASSWORD"; }; f'
)


def credentials(url: str, env: dict[str, str]) -> str:
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


def local_path(url: str) -> Path | None:
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


def check_branch(branch: str) -> None:
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


def git_env() -> dict[str, str]:
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


class GitFailed(Exception):
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


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


class GitRunner:
    """Runs git on one repository (``git_dir``) with a timeout, its errors scrubbed of the
    URL's credentials."""

    def __init__(self, git_dir: Path, url: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.git_dir = git_dir
        self.url = url
        self.timeout = timeout
        self.display_url = redact_url(url)
        self.env = git_env()
        self.git_url = credentials(url, self.env)  # what git's command line shows

    def run(
        self,
        args: Sequence[str],
        *,
        input: bytes | None = None,
        git_dir: bool = True,
    ) -> bytes:
        """Run git (on ``git_dir`` unless ``git_dir`` is False); stdout, or raise GitFailed."""
        cmd = ["git", f"--git-dir={self.git_dir}", *args] if git_dir else ["git", *args]
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.env,
                start_new_session=True,  # so that a timeout kills ssh & co. too
            )
        except OSError as exc:
            raise SourceError(f"cannot run git: {exc.strerror or exc}") from None
        try:
            out, err = proc.communicate(input, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=5)
            raise GitFailed(-9, f"timed out after {self.timeout:g} s", timed_out=True) from None
        except BaseException:
            kill_group(proc)
            proc.wait()
            raise
        if proc.returncode != 0:
            raise GitFailed(proc.returncode, err.decode("utf-8", "replace"))
        return out

    def error(self, action: str, exc: GitFailed) -> SourceError:
        detail = "timed out" if exc.timed_out else exc.line()
        return SourceError(f"{action}: {self.scrub(detail)}")

    def scrub(self, text: str) -> str:
        return text.replace(self.url, self.display_url) if self.url else text
