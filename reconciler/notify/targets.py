"""Notification targets: the `[[notifications]]` of the configuration, checked and named."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from urllib.parse import urlsplit

from reconciler.config import Config, ConfigError, NotificationConfig


@dataclass(frozen=True)
class Target:
    """One configured notification target, its secret read."""

    name: str
    config: NotificationConfig
    secret: bytes | None

    def wants(self, event: str, environment: str | None) -> bool:
        if event not in self.config.events:
            return False
        envs = self.config.environments
        return environment is None or not envs or environment in envs


def default_target_name(cfg: NotificationConfig) -> str:
    """``type:host:hash``: stable across reloads, and never the URL (Slack's path is a secret)."""
    host = urlsplit(cfg.url).hostname or "unknown"
    digest = hashlib.sha256(cfg.url.encode()).hexdigest()[:6]
    return f"{cfg.type}:{host}:{digest}"


def build_targets(config: Config) -> dict[str, Target]:
    """The targets of ``config``; a `ConfigError` for a bad URL, secret or duplicate name."""
    targets: dict[str, Target] = {}
    for index, cfg in enumerate(config.notifications):
        where = f"notifications[{index}]"
        parts = urlsplit(cfg.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}.url: expected an http:// or https:// URL")
        name = cfg.name or default_target_name(cfg)
        if name in targets:
            raise ConfigError(f"{where}: a second notification target named '{name}'")
        if len(name) > 255:
            raise ConfigError(f"{where}.name: at most 255 characters")
        secret = None
        if cfg.secret_file is not None:
            secret = config.read_secret(cfg.secret_file).encode()
        targets[name] = Target(name=name, config=cfg, secret=secret)
    return targets
