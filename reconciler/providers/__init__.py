"""Provider types behind one interface; `build_providers` turns configuration into instances.

Built-in types are imported only when a configuration names them, so a `command`-only
install never imports a cloud SDK, and a missing optional extra is a configuration error
that names the extra to install. Types from other packages load from the
`reconciler.providers` entry-point group.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from importlib.metadata import entry_points
from pathlib import Path

from desired_state import EnvironmentSpec, SpecCheck
from reconciler import DISTRIBUTION
from reconciler.config import Config, ConfigError
from reconciler.providers.base import (
    Check,
    DeployContext,
    DeploymentFailed,
    DeployRequest,
    Problem,
    Provider,
    Redactor,
    Validation,
)
from reconciler.providers.command import CommandProvider

ENTRY_POINT_GROUP = "reconciler.providers"

# type -> ("module:Class", the extra that brings its client library, or None)
BUILTIN_TYPES: dict[str, tuple[str, str | None]] = {
    "command": ("reconciler.providers.command:CommandProvider", None),
    "docker": ("reconciler.providers.docker:DockerProvider", "docker"),
    "kubernetes": ("reconciler.providers.kubernetes:KubernetesProvider", "kubernetes"),
    "ecs": ("reconciler.providers.ecs:EcsProvider", "aws"),
    "lambda": ("reconciler.providers.aws_lambda:LambdaProvider", "aws"),
    "vercel": ("reconciler.providers.vercel:VercelProvider", None),
    "netlify": ("reconciler.providers.netlify:NetlifyProvider", None),
    "railway": ("reconciler.providers.railway:RailwayProvider", None),
}

__all__ = [
    "BUILTIN_TYPES",
    "ENTRY_POINT_GROUP",
    "Check",
    "CommandProvider",
    "DeployContext",
    "DeployRequest",
    "DeploymentFailed",
    "Problem",
    "Provider",
    "Redactor",
    "Validation",
    "build_providers",
    "provider_class",
    "spec_check",
]


def _builtin(kind: str, target: str, extra: str | None) -> type[Provider]:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (
            exc.name == module_name or not exc.name.startswith("reconciler")
        ):
            if exc.name == module_name:
                raise ConfigError(
                    f"provider type '{kind}' is not available in this version"
                ) from None
            hint = f"pip install '{DISTRIBUTION}[{extra}]'" if extra else f"install {exc.name}"
            raise ConfigError(
                f"provider type '{kind}' needs the Python package '{exc.name}', which is not "
                f"installed: {hint}"
            ) from None
        raise
    cls: type[Provider] = getattr(module, attr)
    return cls


def _entry_point(kind: str) -> type[Provider] | None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == kind:
            try:
                cls = ep.load()
            except Exception as exc:  # a third-party package that fails to import
                raise ConfigError(
                    f"provider type '{kind}' from {ep.value} failed to load: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            if not (isinstance(cls, type) and issubclass(cls, Provider)):
                raise ConfigError(
                    f"provider type '{kind}' from {ep.value} is not a reconciler Provider"
                )
            return cls
    return None


def provider_class(kind: str) -> type[Provider]:
    """The class of a provider type: built in, or from the entry-point group."""
    if kind in BUILTIN_TYPES:
        return _builtin(kind, *BUILTIN_TYPES[kind])
    cls = _entry_point(kind)
    if cls is None:
        known = sorted({*BUILTIN_TYPES, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})
        raise ConfigError(f"unknown provider type '{kind}' (known: {', '.join(known)})")
    return cls


def build_providers(config: Config, base_dir: Path | None = None) -> dict[str, Provider]:
    """Instantiate every `[providers.NAME]`; a mistake raises ConfigError naming the key."""
    out: dict[str, Provider] = {}
    for name, pconf in config.providers.items():
        try:
            cls = provider_class(pconf.type)
        except ConfigError as exc:
            raise ConfigError(f"providers.{name}.type: {exc}") from None
        out[name] = cls(name, pconf, base_dir or config.base_dir)
    return out


def spec_check(providers: Mapping[str, Provider]) -> SpecCheck:
    """The desired-state check of the provider each environment file names."""

    def check(spec: EnvironmentSpec) -> Iterable[Problem]:
        provider = providers.get(spec.provider)
        return provider.check_spec(spec) if provider is not None else ()

    return check
