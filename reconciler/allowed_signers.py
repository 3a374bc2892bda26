"""The `repository.allowed_signers` file: whose signed commits may be applied.

Two formats, told apart by content (not by name):

- git's SSH allowed-signers list (ssh-keygen(1), ALLOWED SIGNERS): text lines
  ``principals [options] keytype base64-key [comment]``, ``#`` comments;
- a GnuPG keyring of public keys: binary OpenPGP packets (``gpg --export``) or ASCII
  armour (``gpg --export --armor``, ``-----BEGIN PGP PUBLIC KEY BLOCK-----``).

The file is read whole here, at start and at each reload, and checked enough that a typo
is a configuration error naming the file and line, not a refusal of every commit later.
Its content is kept (`AllowedSigners.data`): what verifies commits is the file as read
then, not whatever it says when a commit arrives.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

MAX_BYTES = 4 * 1024 * 1024

#: Key types ssh-keygen signs and verifies with (sshkey.c), certificates' CAs included.
SSH_KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ssh-dss",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
SSH_OPTIONS = ("cert-authority", "namespaces", "valid-after", "valid-before")
_ARMOR_PUBLIC = b"-----BEGIN PGP PUBLIC KEY BLOCK-----"
_ARMOR_SECRET = b"-----BEGIN PGP PRIVATE KEY BLOCK-----"
_PUBLIC_KEY_TAG = 6
_SECRET_KEY_TAGS = (5, 7)


class SignersError(ValueError):
    """The file is missing, unreadable or malformed; one line naming it (and the line)."""


@dataclass(frozen=True)
class AllowedSigners:
    path: Path
    kind: Literal["ssh", "gpg"]
    data: bytes
    keys: int  # SSH: lines with a key; GnuPG: not known before the import (0)

    @property
    def digest(self) -> str:
        """Names the content: a changed file gets a new private GnuPG home."""
        return hashlib.sha256(self.data).hexdigest()


def read_allowed_signers(path: Path) -> AllowedSigners:
    """The file at ``path``, its format decided and checked."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise SignersError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise SignersError(f"{path} is a directory, not a file") from None
    except OSError as exc:
        raise SignersError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise SignersError(f"{path} is larger than {MAX_BYTES // (1024 * 1024)} MiB")
    if not data.strip():
        raise SignersError(f"{path} is empty: it must list at least one key")
    if data[0] & 0x80:
        _check_openpgp_packet(path, data)
        return AllowedSigners(path, "gpg", data, 0)
    if data[8:12] == b"KBXf":
        raise SignersError(
            f"{path} is a GnuPG keybox (pubring.kbx): export the keys with "
            "`gpg --export KEYID > FILE` and name that file"
        )
    stripped = data.lstrip()
    if stripped.startswith(_ARMOR_SECRET):
        raise SignersError(f"{path} holds a secret key: export only public keys (gpg --export)")
    if stripped.startswith(_ARMOR_PUBLIC):
        return AllowedSigners(path, "gpg", data, 0)
    return AllowedSigners(path, "ssh", data, _check_ssh(path, data))


def _check_openpgp_packet(path: Path, data: bytes) -> None:
    """The first packet of a binary keyring must be a public key (RFC 4880 §4.2)."""
    first = data[0]
    tag = first & 0x3F if first & 0x40 else (first >> 2) & 0x0F
    if tag in _SECRET_KEY_TAGS:
        raise SignersError(f"{path} holds a secret key: export only public keys (gpg --export)")
    if tag != _PUBLIC_KEY_TAG:
        raise SignersError(
            f"{path} is neither an SSH allowed-signers list nor an OpenPGP public keyring"
        )


def _check_ssh(path: Path, data: bytes) -> int:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = data[: exc.start].count(b"\n") + 1
        raise SignersError(f"{path}:{where}: not UTF-8 text") from None
    keys = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        problem = _ssh_line_problem(line)
        if problem is not None:
            raise SignersError(f"{path}:{number}: {problem}")
        keys += 1
    if keys == 0:
        raise SignersError(f"{path} lists no key (only comments or blank lines)")
    return keys


def _fields(line: str) -> list[str]:
    """Space-separated fields; double quotes keep spaces (``namespaces="git,file"``)."""
    fields: list[str] = []
    current: list[str] = []
    quoted = False
    for char in line:
        if char == '"':
            quoted = not quoted
        if char in " \t" and not quoted:
            if current:
                fields.append("".join(current))
                current = []
            continue
        current.append(char)
    if quoted:
        raise ValueError("a double quote is not closed")
    if current:
        fields.append("".join(current))
    return fields


def _ssh_line_problem(line: str) -> str | None:
    """What is wrong with one ``principals [options] keytype key`` line, or None."""
    try:
        fields = _fields(line)
    except ValueError as exc:
        return str(exc)
    if len(fields) < 3:
        return "expected `principals [options] keytype base64-key`"
    if fields[1] in SSH_KEY_TYPES:
        at = 1
    elif fields[2] in SSH_KEY_TYPES:
        at = 2
    else:  # the type is the second field, or the third after options
        named = fields[2] if "=" in fields[1] or fields[1] in SSH_OPTIONS else fields[1]
        return f"unknown key type '{named}' (expected one of ssh-ed25519, ssh-rsa, ecdsa-sha2-…)"
    if at == 2:
        for option in _fields(fields[1].replace(",", " ")):
            name = option.split("=", 1)[0].lower()
            if name not in SSH_OPTIONS:
                return f"unknown option '{name}' (known: {', '.join(SSH_OPTIONS)})"
    if len(fields) <= at + 1:
        return f"the {fields[at]} key is missing"
    keytype, encoded = fields[at], fields[at + 1]
    try:
        blob = base64.b64decode(encoded, validate=True)
        (size,) = struct.unpack(">I", blob[:4])
        inner = blob[4 : 4 + size].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError, ValueError):
        return f"the {keytype} key is not valid base64 key data"
    if inner != keytype:
        return f"the key says it is {inner or 'nothing'}, not {keytype}"
    return None
