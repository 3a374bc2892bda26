"""The daemon configuration (SPEC §3): one TOML file, overridable by environment variables.

Every mistake becomes a :class:`ConfigError` with one sentence naming the file and the key,
so that the CLI can print it and exit 2.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from desired_state import format_duration, parse_duration
from reconciler.allowed_signers import AllowedSigners, SignersError, read_allowed_signers
from reconciler.configfile import config_path

# git's scp-like syntax, [user@]host:path (a relative path with a colon must start with ./).
_SCP_LIKE = re.compile(r"^(?:[\w.+-]+@)?[\w.-]+:(?!//)")
ENV_PREFIX = "RECONCILER_"
PROVIDER_TYPES = (
    "command",
    "docker",
    "kubernetes",
    "ecs",
    "lambda",
    "vercel",
    "netlify",
    "railway",
)


class ConfigError(Exception):
    """A configuration mistake, worded for the operator (exit status 2)."""


# Every duration here ends up in a timer or a sleep: nan and inf make no sense there, and a
# year is longer than any of them needs while far from what the event loop can schedule.
MAX_SECONDS = 365 * 86400
MAX_CONFIG_BYTES = 1024 * 1024


def _seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 2h")
    if isinstance(value, int | float):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ValueError(f"expected a duration such as 30s, 5m or 2h, not {value}")
        if seconds < 0:
            raise ValueError("a duration cannot be negative")
    elif isinstance(value, str):
        try:
            seconds = float(parse_duration(value))
        except ValueError as exc:
            raise ValueError(str(exc)) from None
    else:
        raise ValueError("expected a duration such as 30s, 5m or 2h")
    if seconds > MAX_SECONDS:
        raise ValueError(f"a duration must be at most {format_duration(MAX_SECONDS)}")
    return seconds


# git check-ref-format's rules for a branch name (git-check-ref-format(1)).
_BAD_REF_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def _check_branch(name: str) -> str:
    """A name git accepts as a branch (``git check-ref-format --branch``), checked here so
    that a typo is a configuration error at start, not a failing fetch later."""
    parts = name.split("/")
    if (
        not name
        or name.startswith("-")
        or name == "@"
        or ".." in name
        or "@{" in name
        or _BAD_REF_CHARS.search(name)
        or name.endswith(".")
        or any(not p or p.startswith(".") or p.endswith(".lock") for p in parts)
    ):
        raise ValueError(f"'{name}' is not a valid git branch name")
    return name


def _check_database_url(url: str | None) -> str | None:
    """Only the databases this package has drivers for (SQLite, PostgreSQL with psycopg 3)."""
    if url is None:
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ValueError(
            "not a database URL: use sqlite:///path or postgresql+psycopg://user@host/db"
        ) from None
    scheme = parsed.drivername
    if scheme == "postgresql" or scheme.startswith("postgresql+"):
        if scheme != "postgresql+psycopg":
            raise ValueError(f"use postgresql+psycopg:// (the installed driver), not {scheme}://")
    elif scheme not in ("sqlite", "sqlite+pysqlite"):
        raise ValueError(
            f"unknown database scheme '{scheme}': use sqlite:/// or postgresql+psycopg://"
        )
    return url


Seconds = Annotated[float, BeforeValidator(_seconds)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RepositoryConfig(_Section):
    url: str
    branch: Annotated[str, AfterValidator(_check_branch)] = "main"
    path: str = "."
    poll_interval: Seconds = 30.0
    watch: bool = True
    allowed_signers: str | None = None
    allow_force_push: bool = False


class DatabaseConfig(_Section):
    # default: SQLite in the state directory
    url: Annotated[str | None, AfterValidator(_check_database_url)] = None


class DaemonConfig(_Section):
    state_dir: str = "state"
    max_parallel: int = Field(default=4, ge=1, le=256)
    retries: int = Field(default=3, ge=1, le=100)
    retry_backoff: Seconds = 30.0
    shutdown_grace: Seconds = 60.0
    # How long a stopped command gets between SIGTERM and SIGKILL (SPEC §4 rule 7: 10 s).
    kill_grace: Seconds = 10.0
    # What a run's log keeps (SPEC §6): head and tail, the rest counted. "1MiB", "512kB", bytes.
    log_cap: Annotated[ByteSize, Field(ge=4096)] = ByteSize(1024 * 1024)
    timezone: str | None = None  # windows without `timezone:`; default: the host's
    # How often the live versions are read from the targets (reconciler/drift.py); 0: off.
    drift_interval: Seconds = 300.0
    # Several replicas on one PostgreSQL (docs/scaling.md): an environment's lease lasts this
    # long without renewal (a killed replica's environments move on within it) ...
    lease_ttl: Seconds = Field(default=30.0, ge=0.5)
    # ... and is renewed this often (default: a third of lease_ttl), with the heartbeat.
    lease_renew: Seconds | None = Field(default=None, gt=0)

    @property
    def lease_renew_seconds(self) -> float:
        return self.lease_renew if self.lease_renew is not None else self.lease_ttl / 3

    @model_validator(mode="after")
    def _lease_renewed_in_time(self) -> DaemonConfig:
        if self.lease_renew is not None and self.lease_renew * 2 > self.lease_ttl:
            raise ValueError(
                f"lease_renew = {format_duration(self.lease_renew)} must be at most half of "
                f"lease_ttl = {format_duration(self.lease_ttl)}: one missed renewal must not "
                "lose the leases"
            )
        return self

    @model_validator(mode="after")
    def _longest_wait(self) -> DaemonConfig:
        # The backoff doubles after each failed attempt: the wait before the last attempt
        # is retry_backoff * 2**(retries - 2), which must stay a date (and a sane one).
        longest = self.retry_backoff * 2 ** max(self.retries - 2, 0)
        if longest > MAX_SECONDS:
            raise ValueError(
                f"retries = {self.retries} with retry_backoff = "
                f"{format_duration(self.retry_backoff)} would wait more than "
                f"{format_duration(MAX_SECONDS)} before the last attempt: use fewer retries"
                " or a shorter backoff"
            )
        return self


class ServerConfig(_Section):
    listen: str = "127.0.0.1:8080"  # "" turns the HTTP server off
    token_file: str | None = None  # bearer token for the endpoints that change anything
    # Who holds that token: the actor recorded for the operator actions asked with it.
    token_holder: str = Field(default="api", min_length=1, max_length=255, pattern=r"^\S+$")
    webhook_secret_file: str | None = None  # HMAC key / GitLab token for POST /hooks/git
    webhook_max_bytes: int = Field(default=1_048_576, ge=1024, le=1024**3)
    webhook_replay_window: Seconds = 600.0  # a delivery seen within this window is ignored
    # Connections: each holds a file descriptor (capped lower if the fd limit is low).
    max_connections: int = Field(default=1000, ge=1)
    header_timeout: Seconds = Field(default=10.0, gt=0)  # a request's headers, within this
    body_timeout: Seconds = Field(default=30.0, gt=0)  # its body, within this after them
    write_timeout: Seconds = Field(default=30.0, gt=0)  # a client not reading is dropped


NotificationEvent = Literal[
    "started", "completed", "failed", "timed_out", "rolled_back", "sync_error", "drifted"
]
NOTIFICATION_EVENTS: tuple[NotificationEvent, ...] = (
    "started",
    "completed",
    "failed",
    "timed_out",
    "rolled_back",
    "sync_error",
    "drifted",
)


class NotificationConfig(_Section):
    """One `[[notifications]]` target."""

    name: str | None = None  # for logs and metrics; default: type and host
    type: Literal["webhook", "slack"]
    url: str
    secret_file: str | None = None  # webhook: key of the X-Reconciler-Signature-256 HMAC
    environments: list[str] = Field(default_factory=list)  # empty: every environment
    events: list[NotificationEvent] = Field(default_factory=lambda: list(NOTIFICATION_EVENTS))
    timeout: Seconds = 10.0
    retry_backoff: Seconds = 5.0  # doubled after each failed delivery, up to max_backoff
    max_backoff: Seconds = 600.0
    max_attempts: int = Field(default=20, ge=1, le=1000)  # 2**attempts stays a float
    suppress_repeats: Seconds = 3600.0  # identical failure notices within this are dropped


#: Retention may be long (years of history); it is never a timer, so the cap is wide.
MAX_KEEP_SECONDS = 100 * 365 * 86400


def _keep(value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, str) or isinstance(value, bool):
        raise ValueError('expected a duration such as "400d"')
    try:
        seconds = float(parse_duration(value))
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    if seconds <= 0:
        raise ValueError("keep must be longer than 0s (leave it out to keep everything)")
    if seconds > MAX_KEEP_SECONDS:
        raise ValueError("keep must be at most 100 years (leave it out to keep everything)")
    return seconds


def _head_target(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("expected a file path or an http(s) URL")
    if value is not None and "://" in value and not value.startswith(("http://", "https://")):
        raise ValueError(f"'{value}': publish the head to a file path or an http(s) URL")
    return value


class AuditConfig(_Section):
    """`[audit]`: the tamper-evident ledger's published head, and retention."""

    # Where the chain head ({"seq", "hash", "at"}) is written at each sync and at stop: a
    # file path, or an http(s) URL it is POSTed to. None: not published.
    head: Annotated[str | None, AfterValidator(_head_target)] = None
    # Prune progress events and logs of deployments that ended longer ago than this
    # (deployment rows stay, a checkpoint entry records what went). None: keep everything.
    keep: Annotated[float | None, BeforeValidator(_keep)] = None
    # How often the daemon walks the whole chain (`audit verify`) for the dashboard's badge
    # and its log; "0" turns it off. A million entries cost about 30 s of CPU.
    verify_interval: Seconds = 21600.0


class ProviderConfig(BaseModel):
    """One provider instance. Type-specific keys stay in `settings` for the provider to check."""

    model_config = ConfigDict(extra="allow", frozen=True)

    # A built-in type (PROVIDER_TYPES) or one from the `reconciler.providers` entry points;
    # which exist is checked when the providers are built.
    type: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,62}$")

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    repository: RepositoryConfig
    database: DatabaseConfig = DatabaseConfig()
    daemon: DaemonConfig = DaemonConfig()
    server: ServerConfig = ServerConfig()
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    notifications: list[NotificationConfig] = Field(default_factory=list)
    audit: AuditConfig = AuditConfig()
    # Where the file lives: relative paths inside it are resolved against this folder.
    base_dir: Path = Path(".")
    # repository.allowed_signers as read when the configuration was loaded (start, reload).
    _signers: AllowedSigners | None = PrivateAttr(default=None)

    @property
    def allowed_signers(self) -> AllowedSigners | None:
        """The trusted keys, as read at load; None when commits are not verified."""
        if self.repository.allowed_signers is None:
            return None
        if self._signers is None:
            self._signers = read_signers(self)
        return self._signers

    def resolve(self, path: str) -> Path:
        """A path from the file: `~` and `${VARS}` (e.g. `${CREDENTIALS_DIRECTORY}`, where
        systemd's LoadCredential= puts secrets) expanded, relative to the file's folder."""
        p = Path(os.path.expandvars(path)).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    def read_secret(self, path: str) -> str:
        """A secret kept in a file (one line; surrounding whitespace dropped)."""
        file = self.resolve(path)
        try:
            value = file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read secret file {file}: {exc.strerror}") from None
        if not value:
            raise ConfigError(f"secret file {file} is empty")
        return value

    @property
    def state_dir(self) -> Path:
        return self.resolve(self.daemon.state_dir)

    @property
    def database_url(self) -> str:
        url = self.database.url
        if url is None:
            return f"sqlite:///{self.state_dir / 'reconciler.db'}"
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix:
            return prefix + str(self.resolve(url[len(prefix) :]))
        return url

    @property
    def audit_head(self) -> str | None:
        """Where the ledger head is published: a URL, or the file path resolved."""
        target = self.audit.head
        if target is None or target.startswith(("http://", "https://")):
            return target
        return str(self.resolve(target))

    @property
    def repository_url(self) -> str:
        url = self.repository.url
        if "://" in url or _SCP_LIKE.match(url):
            return url
        return str(self.resolve(url))


def _parse_override(raw: str) -> Any:
    """An override's value is read as a TOML value when it is one (4, true, ["a"]), else as text."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """`RECONCILER_<SECTION>__<KEY>=value` overrides `[section] key` (nested with more `__`).

    Section and key are lower-cased; in provider names `_` stays `_` (write the name as declared).
    """
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if len(parts) < 2 or not all(parts):
            continue
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: cannot override '{part}', it is not a section")
            node = child
        node[parts[-1]] = _parse_override(raw)
    return data


def _format_error(source: str, exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "missing":
        msg = "required key missing"
    elif err["type"] == "extra_forbidden":
        msg = "unknown key"
    else:
        msg = str(err["msg"]).removeprefix("Value error, ")
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {loc}: {msg}{suffix}"


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    writable_state: bool = True,
) -> Config:
    """The configuration at ``path`` (or ``$RECONCILER_CONFIG``, or the default), checked.

    ``writable_state=False`` is for commands that never touch the state directory
    (``validate DIR`` only reads provider names): its write access is then not probed.
    """
    environ = os.environ if environ is None else environ
    file = config_path(path, environ)
    text = _read_text(file)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{file}: arrays or tables nested too deeply") from None
    data = apply_env_overrides(data, environ)
    data.pop("base_dir", None)
    try:
        config = Config.model_validate({**data, "base_dir": file.resolve().parent})
    except ValidationError as exc:
        raise ConfigError(_format_error(str(file), exc)) from None
    _check(config, file, writable_state)
    return config


def _read_text(file: Path) -> str:
    """The file's text: UTF-8 (as TOML requires), of a sensible size (a pipe, as from
    ``--config <(...)``, is fine; ``/dev/zero`` is not read forever)."""
    try:
        with file.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {file} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {file}: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"configuration file {file} is larger than 1 MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{file}:{line}: not UTF-8 text (TOML files are UTF-8)") from None


def _check_state_dir(path: Path, file: Path, writable: bool) -> None:
    """The state directory, or the folder it will be made in, must be a writable folder.

    Probed with a real (unnamed, at once removed) file: permission bits do not tell about
    read-only mounts, nor about root."""
    where = path
    while not where.exists() and where.parent != where:
        if where.is_symlink():  # a dangling link: mkdir would fail on it
            break
        where = where.parent
    if where.exists() and not where.is_dir():
        raise ConfigError(f"{file}: daemon.state_dir: {where} is not a directory")
    if not writable:
        return
    try:
        tempfile.TemporaryFile(dir=where).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{file}: daemon.state_dir: cannot write in {where}: {reason}") from None


def read_signers(config: Config, file: Path | None = None) -> AllowedSigners:
    """Read and check `repository.allowed_signers` (a ConfigError naming the file)."""
    setting = config.repository.allowed_signers
    assert setting is not None
    where = f"{file}: " if file is not None else ""
    if not setting.strip():
        raise ConfigError(f"{where}repository.allowed_signers: empty path")
    try:
        return read_allowed_signers(config.resolve(setting))
    except SignersError as exc:
        raise ConfigError(f"{where}repository.allowed_signers: {exc}") from None


def _check(config: Config, file: Path, writable_state: bool) -> None:
    if config.repository.allowed_signers is not None:
        config._signers = read_signers(config, file)
    _check_state_dir(config.state_dir, file, writable_state)
    if config.daemon.timezone is not None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(config.daemon.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(
                f"{file}: daemon.timezone: unknown time zone '{config.daemon.timezone}'"
            ) from None
