"""Real signing keys and signed commits for the trusted-commit tests (allowed_signers).

SSH keys are made with ``ssh-keygen -t ed25519 -N ''``; GnuPG keys in a temporary
``GNUPGHOME`` with ``gpg --quick-gen-key`` (its agent is stopped at the end).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support import Repo, World, env_yaml, git


@dataclass(frozen=True)
class SshKey:
    private: Path
    principal: str

    @property
    def public_line(self) -> str:
        """`keytype base64` of the public key."""
        return " ".join(Path(f"{self.private}.pub").read_text().split()[:2])

    @property
    def fingerprint(self) -> str:
        out = subprocess.run(
            ["ssh-keygen", "-l", "-f", f"{self.private}.pub"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.split()[1]  # "256 SHA256:... comment (ED25519)"


def ssh_key(folder: Path, principal: str) -> SshKey:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / principal.split("@")[0]
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", principal, "-f", str(path)],
        check=True,
    )
    return SshKey(path, principal)


def allowed_signers(path: Path, *keys: SshKey) -> Path:
    lines = ["# who may change what is deployed"]
    lines += [f'{key.principal} namespaces="git" {key.public_line}' for key in keys]
    path.write_text("\n".join(lines) + "\n")
    return path


def ssh_commit(repo: Repo, key: SshKey, message: str) -> str:
    git(repo.path, "add", "-A")
    git(
        repo.path,
        "-c",
        "gpg.format=ssh",
        "-c",
        f"user.signingkey={key.private}",
        "commit",
        "-q",
        "-S",
        "-m",
        message,
    )
    return git(repo.path, "rev-parse", "HEAD")


def set_env_signed(repo: Repo, key: SshKey, name: str, services: dict[str, str]) -> str:
    repo.write(f"{name}.yaml", env_yaml(name, services))
    return ssh_commit(repo, key, f"{name}: {services}")


def trust(world: World, file: str) -> None:
    """Set `repository.allowed_signers = file` (relative to the configuration)."""
    text = world.config.read_text()
    world.config.write_text(
        text.replace("[repository]\n", f'[repository]\nallowed_signers = "{file}"\n', 1)
    )


def applied_ref(world: World) -> str:
    return git(
        world.tmp,
        "--git-dir",
        str(world.tmp / "state" / "repo.git"),
        "rev-parse",
        "refs/reconciler/applied",
    )


# ---- GnuPG -------------------------------------------------------------------------


@dataclass(frozen=True)
class GpgHome:
    home: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "GNUPGHOME": str(self.home)}

    def gpg(self, *args: str, input: bytes | None = None) -> bytes:
        out = subprocess.run(
            ["gpg", "--batch", "--no-tty", *args],
            env=self.env(),
            input=input,
            capture_output=True,
            check=True,
        )
        return out.stdout

    def new_key(self, uid: str) -> str:
        """A signing key without passphrase; its fingerprint."""
        self.gpg("--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never")
        for line in self.gpg("--with-colons", "--list-keys", uid).decode().splitlines():
            if line.startswith("fpr:"):
                return line.split(":")[9]
        raise AssertionError(f"no fingerprint for {uid}")

    def commit(self, repo: Repo, fingerprint: str, message: str) -> str:
        git(repo.path, "add", "-A")
        subprocess.run(
            ["git", "-c", f"user.signingkey={fingerprint}", "commit", "-q", "-S", "-m", message],
            cwd=repo.path,
            env={
                **self.env(),
                "GIT_AUTHOR_NAME": "Ada",
                "GIT_AUTHOR_EMAIL": "ada@example.com",
                "GIT_COMMITTER_NAME": "Ada",
                "GIT_COMMITTER_EMAIL": "ada@example.com",
            },
            check=True,
            capture_output=True,
        )
        return git(repo.path, "rev-parse", "HEAD")


@contextlib.contextmanager
def gpg_home() -> Iterator[GpgHome]:
    """A throw-away GNUPGHOME (short path: the agent's socket lives in it), agent stopped
    at the end."""
    home = Path(tempfile.mkdtemp(prefix="gh-", dir="/tmp"))
    home.chmod(0o700)
    try:
        yield GpgHome(home)
    finally:
        subprocess.run(
            ["gpgconf", "--homedir", str(home), "--kill", "all"],
            capture_output=True,
            check=False,
        )
        shutil.rmtree(home, ignore_errors=True)
