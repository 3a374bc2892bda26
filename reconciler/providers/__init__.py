"""Provider types behind one interface; `build_providers` turns configuration into instances."""

from __future__ import annotations

from pathlib import Path

from reconciler.config import Config, ConfigError
from reconciler.providers.base import (
    Check,
    DeployContext,
    DeploymentFailed,
    DeployRequest,
    Provider,
    Redactor,
    Validation,
)
from reconciler.providers.command import CommandProvider

PROVIDER_CLASSES: dict[str, type[Provider]] = {
    CommandProvider.type: CommandProvider,
}

__all__ = [
    "PROVIDER_CLASSES",
    "Check",
    "CommandProvider",
    "DeployContext",
    "DeployRequest",
    "DeploymentFailed",
    "Provider",
    "Redactor",
    "Validation",
    "build_providers",
]


def build_providers(config: Config, base_dir: Path | None = None) -> dict[str, Provider]:
    """Instantiate every `[providers.NAME]`; a mistake raises ConfigError naming the key."""
    out: dict[str, Provider] = {}
    for name, pconf in config.providers.items():
        cls = PROVIDER_CLASSES.get(pconf.type)
        if cls is None:
            raise ConfigError(
                f"providers.{name}.type: provider type '{pconf.type}' is not available in this "
                f"version (available: {', '.join(sorted(PROVIDER_CLASSES))})"
            )
        out[name] = cls(name, pconf, base_dir or config.base_dir)
    return out
