"""Trusted commits: does the head's signature verify with a key in `allowed_signers`?

One git subprocess per new head (``git log -1 --format=%G?…``, which runs ``ssh-keygen
-Y verify`` or ``gpg --verify`` for it), its verdict cached by commit id: a refused head
seen again at every poll is not verified again.

Nothing of the operator's own keyrings is used. For an SSH allowed-signers list, git is
pointed at a copy of the file as read at load; for a GnuPG keyring, the keys are imported
into a private ``GNUPGHOME`` under the state directory (``gnupg/<content digest>``) with
``trust-model always`` (being in the file is what makes a key trusted) and without
starting an agent or fetching keys. Each verification runs with that ``GNUPGHOME`` even
for SSH lists, so that a GnuPG-signed commit is never checked against ``~/.gnupg``.

Only the head is checked, as Flux does: commits before it that are not signed do not
matter, since what is applied is the tree of the head, which its signer vouched for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from reconciler.allowed_signers import AllowedSigners
from reconciler.config import ConfigError
from reconciler.source.gitcmd import GitFailed, GitRunner, SourceError

log = logging.getLogger("reconciler.source")

# Private GnuPG homes: every key in the keyring is trusted, nothing is started or fetched.
GPG_CONF = "trust-model always\nno-autostart\nno-auto-key-retrieve\n"
_READY = ".ready"
_SSH_LIST = "allowed_signers"
_CACHE_SIZE = 256
_GPG_TIMEOUT = 60.0
# %G? (the verdict), the signing key, its fingerprint, the signer (principal or user id).
_FORMAT = "--format=%G?%x00%GK%x00%GF%x00%GS"


@dataclass(frozen=True)
class Verdict:
    """A head's signature, as judged against allowed_signers."""

    trusted: bool
    signer: str | None  # key fingerprint, and "(principal)" when the key is trusted
    reason: str | None = None  # why it is refused ("it is not signed")


def describe(status: str, key: str, signer: str) -> Verdict:
    """git's `%G?` verdict (and the key and signer it names) → trusted, or why not."""
    named = f"{key} ({signer})" if key and signer and status == "G" else key or None
    if status == "G":
        return Verdict(True, named)
    if status == "N":
        return Verdict(False, None, "it is not signed")
    if status in ("U", "E") and key:
        return Verdict(False, named, f"it is signed by {key} which is not in allowed_signers")
    reasons = {
        "B": f"its signature by {key} is bad",
        "X": f"its signature by {key} has expired",
        "Y": f"it is signed by {key} whose key has expired",
        "R": f"it is signed by {key} whose key is revoked",
    }
    return Verdict(False, named, reasons.get(status, "its signature cannot be checked"))


class SignatureVerifier:
    """Verifies commits of the mirror at ``git_dir`` against ``signers``."""

    def __init__(self, signers: AllowedSigners, git_dir: Path, state_dir: Path) -> None:
        self.signers = signers
        self.root = state_dir / "gnupg"
        self.home = self.root / signers.digest[:16]
        self._git = GitRunner(git_dir, "")
        self._git.env["GNUPGHOME"] = str(self.home)
        self._cache: OrderedDict[str, Verdict] = OrderedDict()
        self._lock = threading.Lock()

    def prepare(self) -> None:
        """Make the private home (import a keyring): a ConfigError when the keys cannot be
        used. Called at start and reload, so that a bad keyring is a configuration error."""
        with self._lock:
            self._ensure_home()

    def verify(self, sha: str) -> Verdict:
        """The verdict on ``sha``'s signature (cached by commit id)."""
        with self._lock:
            cached = self._cache.get(sha)
            if cached is not None:
                self._cache.move_to_end(sha)
                return cached
            verdict = self._verify(sha)
            if verdict.reason is None or not verdict.reason.startswith("its signature cannot"):
                self._cache[sha] = verdict
                while len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
            return verdict

    def _verify(self, sha: str) -> Verdict:
        try:
            self._ensure_home()
        except ConfigError as exc:  # the home was removed underneath and cannot be made again
            return Verdict(False, None, f"its signature cannot be checked: {exc}")
        allowed = self.home / _SSH_LIST if self.signers.kind == "ssh" else Path(os.devnull)
        try:
            setting = f"gpg.ssh.allowedSignersFile={allowed}"
            out = self._git.run(["-c", setting, "log", "-1", "--no-walk", _FORMAT, sha, "--"])
        except GitFailed as exc:
            return Verdict(False, None, f"its signature cannot be checked: {exc.line()}")
        except SourceError as exc:
            return Verdict(False, None, f"its signature cannot be checked: {exc}")
        fields = out.decode("utf-8", "replace").strip("\n").split("\x00")
        status, key, fingerprint, signer = [*fields, "", "", "", ""][:4]
        return describe(status.strip() or "N", fingerprint or key, signer)

    # -- the private home --------------------------------------------------------------

    def _ensure_home(self) -> None:
        if (self.home / _READY).is_file():
            return
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            new = Path(tempfile.mkdtemp(prefix=".new-", dir=self.root))
        except OSError as exc:
            raise ConfigError(f"cannot create {self.root}: {exc.strerror or exc}") from None
        try:
            (new / "gpg.conf").write_text(GPG_CONF)
            if self.signers.kind == "ssh":
                (new / _SSH_LIST).write_bytes(self.signers.data)
            else:
                self._import(new)
            (new / _READY).touch()
            try:
                new.rename(self.home)
            except OSError:  # another process made it first (same content): use theirs
                if not (self.home / _READY).is_file():
                    raise
        except OSError as exc:
            raise ConfigError(f"cannot prepare {self.home}: {exc.strerror or exc}") from None
        finally:
            shutil.rmtree(new, ignore_errors=True)
        self._prune()

    def _import(self, home: Path) -> None:
        path = self.signers.path
        gpg = ["gpg", "--batch", "--no-tty", "--no-autostart", "--homedir", str(home)]
        try:
            imported = subprocess.run(
                [*gpg, "--quiet", "--import"],
                input=self.signers.data,
                capture_output=True,
                timeout=_GPG_TIMEOUT,
                check=False,
            )
            listed = subprocess.run(
                [*gpg, "--with-colons", "--list-keys"],
                capture_output=True,
                timeout=_GPG_TIMEOUT,
                check=False,
            )
        except FileNotFoundError:
            raise ConfigError(f"{path} is a GnuPG keyring, but gpg is not installed") from None
        except subprocess.TimeoutExpired:
            raise ConfigError(f"gpg took more than {_GPG_TIMEOUT:g} s to import {path}") from None
        keys = [
            ln for ln in listed.stdout.decode(errors="replace").splitlines() if ln[:4] == "pub:"
        ]
        if not keys:
            said = [
                ln.removeprefix("gpg: ").strip()
                for ln in imported.stderr.decode(errors="replace").splitlines()
                if ln.strip()
            ]
            detail = said[-1] if said else "no public key found"
            raise ConfigError(f"repository.allowed_signers: {path}: {detail}")
        log.info("event=allowed_signers_imported file=%s keys=%d", path, len(keys))

    def _prune(self) -> None:
        """Homes made for earlier contents of the file are not needed any more."""
        with contextlib.suppress(OSError):
            for old in self.root.iterdir():
                if old != self.home and not old.name.startswith(".new-"):
                    shutil.rmtree(old, ignore_errors=True)
