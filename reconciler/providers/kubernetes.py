"""The `kubernetes` provider: patch a workload's container image, then follow the rollout
exactly as `kubectl rollout status` judges it.

Through the official client's asyncio API (`kubernetes.aio`), so a deadline or a
cancellation interrupts a request or a watch at once. Works on Deployments, StatefulSets
and DaemonSets (apps/v1). The rollout is followed by a watch on the one object (field
selector on its name), re-read after each watch ends; the judgement is a port of kubectl's
`pkg/polymorphichelpers/rollout_status.go`.

A run stopped before its rollout completed (deadline or cancellation) patches the image it
replaced back, when the workload still carries the image this run set: a `timed_out` or
`cancelled` record never leaves the target rolling towards a version nobody recorded.
A rollout that Kubernetes itself reports failed (`ProgressDeadlineExceeded`) is left as
Kubernetes leaves it (the old pods keep serving); `on_failure: rollback` restores.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import weakref
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
import yaml
from kubernetes.aio import client as k8s
from kubernetes.aio import config as k8s_config
from kubernetes.aio.client.exceptions import ApiException
from kubernetes.aio.config.config_exception import ConfigException
from pydantic import BaseModel, ConfigDict, Field, field_validator

from desired_state import parse_duration
from reconciler.config import ProviderConfig
from reconciler.providers.base import (
    Check,
    DeployContext,
    DeploymentFailed,
    DeployRequest,
    Problem,
    Provider,
    Validation,
)

Kind = Literal["Deployment", "StatefulSet", "DaemonSet"]
Workload = k8s.V1Deployment | k8s.V1StatefulSet | k8s.V1DaemonSet

_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
# An image tag (distribution/reference): what a version must be to become one.
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_INT_OR_PERCENT = re.compile(r"^(\d+)(%?)$")
SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
CONFLICT_RETRIES = 5
WATCH_SECONDS = 300  # one watch request at most; then the object is read again
_SETTINGS = {"kubeconfig", "context", "namespace", "request_timeout"}
_STRATEGY_KEYS = {"max_surge", "max_unavailable"}


_MODELS: dict[str, type[Workload]] = {
    "Deployment": k8s.V1Deployment,
    "StatefulSet": k8s.V1StatefulSet,
    "DaemonSet": k8s.V1DaemonSet,
}


class KubernetesParams(BaseModel):
    """A service's `params` for a kubernetes provider."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    deployment: str | None = Field(default=None, pattern=_DNS_SUBDOMAIN)
    kind: Kind = "Deployment"
    container: str | None = Field(default=None, pattern=_DNS_LABEL)
    image: str | None = None
    namespace: str | None = Field(default=None, pattern=_DNS_LABEL)

    @field_validator("image")
    @classmethod
    def _repository_only(cls, value: str | None) -> str | None:
        if value is None:
            return None
        repository, tag, digest = split_image(value)
        if not repository or tag is not None or digest is not None or value != value.strip():
            raise ValueError(
                f"'{value}' is not an image repository: give it without a tag or digest "
                "(the version becomes the tag)"
            )
        return value


def split_image(ref: str) -> tuple[str, str | None, str | None]:
    """repository, tag, digest of an image reference (`host:5000/team/app:1.2@sha256:...`)."""
    name, _, digest = ref.partition("@")
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :], digest or None
    return name, None, digest or None


def image_version(ref: str) -> str | None:
    """The version an image reference carries: its tag (`latest` when it has none but a
    name); None for a reference pinned by digest only."""
    _, tag, digest = split_image(ref)
    if tag is not None:
        return tag
    return None if digest else "latest"


def _int_or_percent(value: Any) -> int | str:
    text = str(value).strip()
    match = _INT_OR_PERCENT.match(text)
    if match is None:
        raise ValueError(f"expected a count or a percentage such as 1 or 25%, not '{value}'")
    return text if match.group(2) else int(match.group(1))


# -- the rules of `kubectl rollout status` ---------------------------------------------------


class RolloutFailed(Exception):
    """The platform says the rollout cannot complete (kubectl's error)."""


@dataclass(frozen=True)
class Rollout:
    """kubectl's verdict on one observation of the workload, with the counts behind it."""

    message: str
    done: bool
    desired: int
    updated: int
    available: int
    observed: bool

    @property
    def percent(self) -> int:
        if self.done:
            return 100
        if not self.observed or self.desired <= 0:
            return 0
        share = (min(self.updated, self.desired) + min(self.available, self.desired)) / (
            2 * self.desired
        )
        return min(99, int(100 * share))

    @property
    def summary(self) -> str:
        return (
            f"{self.updated} of {self.desired} updated, {self.available} of {self.desired} "
            "available"
        )


def rollout_status(obj: Workload) -> Rollout:
    """kubectl's StatusViewer.Status (revision 0) for the three workload kinds."""
    if isinstance(obj, k8s.V1Deployment):
        return _deployment_status(obj)
    if isinstance(obj, k8s.V1StatefulSet):
        return _statefulset_status(obj)
    return _daemonset_status(obj)


def _deployment_status(d: k8s.V1Deployment) -> Rollout:
    name = d.metadata.name if d.metadata else ""
    generation = (d.metadata.generation if d.metadata else None) or 0
    st = d.status or k8s.V1DeploymentStatus()
    spec_replicas = d.spec.replicas if d.spec else None
    updated, replicas = st.updated_replicas or 0, st.replicas or 0
    available = st.available_replicas or 0
    desired = spec_replicas if spec_replicas is not None else replicas
    # Replicas of the new ReplicaSet that are available (old pods are counted first).
    new_available = max(0, min(updated, available - (replicas - updated)))

    def verdict(message: str, done: bool = False, observed: bool = True) -> Rollout:
        return Rollout(message, done, desired, updated, new_available, observed)

    if generation <= (st.observed_generation or 0):
        cond = next((c for c in st.conditions or () if c.type == "Progressing"), None)
        if cond is not None and cond.reason == "ProgressDeadlineExceeded":
            detail = f": {cond.message}" if cond.message else ""
            raise RolloutFailed(f'deployment "{name}" exceeded its progress deadline{detail}')
        if spec_replicas is not None and updated < spec_replicas:
            return verdict(
                f'Waiting for deployment "{name}" rollout to finish: {updated} out of '
                f"{spec_replicas} new replicas have been updated..."
            )
        if replicas > updated:
            return verdict(
                f'Waiting for deployment "{name}" rollout to finish: {replicas - updated} old '
                "replicas are pending termination..."
            )
        if available < updated:
            return verdict(
                f'Waiting for deployment "{name}" rollout to finish: {available} of {updated} '
                "updated replicas are available..."
            )
        return verdict(f'deployment "{name}" successfully rolled out', done=True)
    return verdict("Waiting for deployment spec update to be observed...", observed=False)


def _statefulset_status(s: k8s.V1StatefulSet) -> Rollout:
    st = s.status or k8s.V1StatefulSetStatus(replicas=0)
    strategy = s.spec.update_strategy if s.spec else None
    spec_replicas = s.spec.replicas if s.spec else None
    generation = (s.metadata.generation if s.metadata else None) or 0
    observed_gen = st.observed_generation or 0
    ready, updated = st.ready_replicas or 0, st.updated_replicas or 0
    desired = spec_replicas if spec_replicas is not None else st.replicas

    def verdict(message: str, done: bool = False, observed: bool = True) -> Rollout:
        return Rollout(message, done, desired, updated, ready, observed)

    if strategy is not None and (strategy.type or "RollingUpdate") != "RollingUpdate":
        raise RolloutFailed("rollout status is only available for RollingUpdate strategy type")
    if observed_gen == 0 or generation > observed_gen:
        return verdict("Waiting for statefulset spec update to be observed...", observed=False)
    if spec_replicas is not None and ready < spec_replicas:
        return verdict(f"Waiting for {spec_replicas - ready} pods to be ready...")
    rolling = strategy.rolling_update if strategy is not None else None
    if rolling is not None:
        if spec_replicas is not None and rolling.partition is not None:
            want = spec_replicas - rolling.partition
            if updated < want:
                return verdict(
                    f"Waiting for partitioned roll out to finish: {updated} out of {want} new "
                    "pods have been updated..."
                )
        return verdict(
            f"partitioned roll out complete: {updated} new pods have been updated...", True
        )
    if st.update_revision != st.current_revision:
        return verdict(
            f"waiting for statefulset rolling update to complete {updated} pods at revision "
            f"{st.update_revision}..."
        )
    return verdict(
        f"statefulset rolling update complete {st.current_replicas or 0} pods at revision "
        f"{st.current_revision}...",
        True,
    )


def _daemonset_status(ds: k8s.V1DaemonSet) -> Rollout:
    name = ds.metadata.name if ds.metadata else ""
    generation = (ds.metadata.generation if ds.metadata else None) or 0
    st = ds.status
    desired = st.desired_number_scheduled if st else 0
    updated = (st.updated_number_scheduled if st else None) or 0
    available = (st.number_available if st else None) or 0

    def verdict(message: str, done: bool = False, observed: bool = True) -> Rollout:
        return Rollout(message, done, desired, updated, available, observed)

    strategy = ds.spec.update_strategy if ds.spec else None
    if strategy is not None and (strategy.type or "RollingUpdate") != "RollingUpdate":
        raise RolloutFailed("rollout status is only available for RollingUpdate strategy type")
    if generation <= ((st.observed_generation if st else None) or 0):
        if updated < desired:
            return verdict(
                f'Waiting for daemon set "{name}" rollout to finish: {updated} out of {desired} '
                "new pods have been updated..."
            )
        if available < desired:
            return verdict(
                f'Waiting for daemon set "{name}" rollout to finish: {available} of {desired} '
                "updated pods are available..."
            )
        return verdict(f'daemon set "{name}" successfully rolled out', True)
    return verdict("Waiting for daemon set spec update to be observed...", observed=False)


# -- the provider -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    kind: Kind
    namespace: str
    name: str
    container: str | None
    repository: str | None

    def __str__(self) -> str:
        return f"{self.kind.lower()} {self.namespace}/{self.name}"

    @property
    def resource(self) -> str:
        return {"Deployment": "deployments", "StatefulSet": "statefulsets"}.get(
            self.kind, "daemonsets"
        )


def api_error(exc: ApiException) -> str:
    """The API server's own message (its Status `message`), in one line, no headers."""
    message = ""
    if exc.body:
        try:
            body = json.loads(exc.body)
            message = str(body.get("message", "")) if isinstance(body, dict) else ""
        except ValueError:
            message = str(exc.body).strip().splitlines()[0][:300] if str(exc.body).strip() else ""
    head = f"{exc.status} {exc.reason}".strip()
    return f"{head}: {message}" if message else head


def _tls(c: k8s.Configuration) -> tuple[Any, ...]:
    """What an ApiClient fixes at construction (its TLS context, the endpoint)."""
    return (c.host, c.ssl_ca_cert, c.cert_file, c.key_file, c.verify_ssl, c.tls_server_name)


async def _close_at_loop_end(api_client: k8s.ApiClient) -> None:
    """Hold a shared client open until the loop shuts down (asyncio.run cancels this task)."""
    try:
        await asyncio.Event().wait()
    finally:
        await api_client.close()  # type: ignore[no-untyped-call]  # untyped in the client


class KubernetesProvider(Provider):
    type = "kubernetes"
    params_model = KubernetesParams
    strategies = frozenset({"rolling"})

    def __init__(self, name: str, config: ProviderConfig, base_dir: Path) -> None:
        super().__init__(name, config, base_dir)
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, k8s.ApiClient] = (
            weakref.WeakKeyDictionary()
        )
        self._closers: set[asyncio.Task[None]] = set()
        s = config.settings
        unknown = set(s) - _SETTINGS
        if unknown:
            raise self.config_error(sorted(unknown)[0], "unknown key for a kubernetes provider")
        for key in ("kubeconfig", "context", "namespace"):
            if key in s and (not isinstance(s[key], str) or not s[key]):
                raise self.config_error(key, "expected a non-empty string")
        self.namespace: str = s.get("namespace", "default")
        if not re.match(_DNS_LABEL, self.namespace):
            raise self.config_error("namespace", f"'{self.namespace}' is not a namespace name")
        self.context: str | None = s.get("context")
        try:
            self.request_timeout = float(parse_duration(s.get("request_timeout", 30)))
        except ValueError as exc:
            raise self.config_error("request_timeout", str(exc)) from None
        if self.request_timeout <= 0:
            raise self.config_error("request_timeout", "must be at least 1s")
        # Where the cluster and credentials come from: the setting, $KUBECONFIG, the
        # in-cluster service account, and last ~/.kube/config (for use outside a cluster).
        self.kubeconfig: str | None = None
        if "kubeconfig" in s:
            self.kubeconfig = str(self.resolve(s["kubeconfig"]))
            self._check_kubeconfig("kubeconfig")
        elif os.environ.get("KUBECONFIG"):
            self.kubeconfig = os.environ["KUBECONFIG"]
            self._check_kubeconfig("kubeconfig", source=" (from $KUBECONFIG)")
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            try:  # checked now (service account token, CA), loaded again per operation
                k8s_config.load_incluster_config(client_configuration=k8s.Configuration())  # type: ignore[no-untyped-call]  # untyped in the client
            except ConfigException as exc:
                raise self.config_error("kubeconfig", f"in-cluster configuration: {exc}") from None
            self._register_file_secret(SERVICE_ACCOUNT_TOKEN)
        elif Path("~/.kube/config").expanduser().is_file():
            self.kubeconfig = str(Path("~/.kube/config").expanduser())
            self._check_kubeconfig("kubeconfig", source=" (~/.kube/config)")
        else:
            raise self.config_error(
                "kubeconfig",
                "no cluster configured: set kubeconfig, or $KUBECONFIG, or run in a cluster",
            )

    # -- configuration -----------------------------------------------------------------

    def _check_kubeconfig(self, key: str, source: str = "") -> None:
        """Read the kubeconfig now: a missing file or context is a configuration error, and
        the credentials in it are registered for redaction."""
        assert self.kubeconfig is not None
        try:
            contexts, current = k8s_config.list_kube_config_contexts(self.kubeconfig)  # type: ignore[no-untyped-call]  # untyped in the client
        except (ConfigException, OSError, yaml.YAMLError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise self.config_error(key, f"{self.kubeconfig}{source}: {reason}") from None
        names = [c.get("name") for c in contexts or []]
        wanted = self.context or (current or {}).get("name")
        if wanted not in names:
            what = f"context '{wanted}'" if wanted else "no current-context"
            raise self.config_error(
                "context" if self.context else key,
                f"{what} not in {self.kubeconfig}{source} (has: {', '.join(map(str, names))})",
            )
        for path in self.kubeconfig.split(os.pathsep):
            self._register_kubeconfig_secrets(Path(path))

    def _register_kubeconfig_secrets(self, path: Path) -> None:
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return
        for entry in (doc or {}).get("users") or []:
            user = (entry or {}).get("user") or {}
            for key in ("token", "password", "client-key-data"):
                if isinstance(user.get(key), str):
                    self._secret_values.append(user[key])
            if isinstance(user.get("tokenFile"), str):
                self._register_file_secret(path.parent / user["tokenFile"])

    def _register_file_secret(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            value = path.read_text(encoding="utf-8").strip()
            if value:
                self._secret_values.append(value)

    def check_strategy(self, strategy: Mapping[str, Any]) -> list[Problem]:
        problems: list[Problem] = []
        values: dict[str, int | str] = {}
        for key, value in strategy.items():
            if key == "type":
                continue
            if key not in _STRATEGY_KEYS:
                problems.append(
                    (
                        ("strategy", key, "[key]"),
                        f"unknown key '{key}' (rolling takes max_surge, max_unavailable)",
                    )
                )
                continue
            try:
                values[key] = _int_or_percent(value)
            except ValueError as exc:
                problems.append((("strategy", key), str(exc)))
        if values.get("max_surge") in (0, "0%") and values.get("max_unavailable") in (0, "0%"):
            problems.append(
                (("strategy", "max_unavailable"), "may not be 0 when max_surge is 0 as well")
            )
        return problems

    def _rolling(self, strategy: Mapping[str, Any]) -> dict[str, int | str]:
        out: dict[str, int | str] = {}
        for key, field in (("max_surge", "maxSurge"), ("max_unavailable", "maxUnavailable")):
            if strategy.get(key) is not None:
                out[field] = _int_or_percent(strategy[key])
        return out

    def target(self, service: str, params: Mapping[str, Any]) -> Target:
        p: KubernetesParams = self.params(params)
        return Target(
            kind=p.kind,
            namespace=p.namespace or self.namespace,
            name=p.deployment or service,
            container=p.container,
            repository=p.image,
        )

    # -- the API --------------------------------------------------------------------------

    async def _load(self, configuration: k8s.Configuration) -> None:
        try:
            if self.kubeconfig is not None:
                await k8s_config.load_kube_config(  # type: ignore[no-untyped-call]  # untyped in the client
                    config_file=self.kubeconfig,
                    context=self.context,
                    client_configuration=configuration,
                    persist_config=False,
                )
            else:
                k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]  # untyped in the client
        except (ConfigException, OSError) as exc:
            raise DeploymentFailed(f"kubernetes configuration: {exc}") from None

    @contextlib.asynccontextmanager
    async def _api(self) -> AsyncIterator[k8s.AppsV1Api]:
        """The API for one operation. Credentials are loaded afresh each time (tokens rotate,
        exec plugins renew them); the HTTP client, its TLS context (~0.1 s to build) and its
        keep-alive connections are kept per event loop, and closed when that loop ends."""
        configuration = k8s.Configuration()
        await self._load(configuration)
        loop = asyncio.get_running_loop()
        api_client = self._clients.get(loop)
        if api_client is None or _tls(api_client.configuration) != _tls(configuration):
            api_client = k8s.ApiClient(configuration)
            self._clients[loop] = api_client
            closer = loop.create_task(_close_at_loop_end(api_client))
            self._closers.add(closer)  # a reference, so the task lives until the loop ends
            closer.add_done_callback(self._closers.discard)
        else:  # same endpoint and TLS material: take the fresh credentials
            api_client.configuration = api_client.rest_client.configuration = configuration
        yield k8s.AppsV1Api(api_client)

    def _timeout(self, ctx: DeployContext | None = None) -> float:
        if ctx is None:
            return self.request_timeout
        return max(0.1, min(self.request_timeout, ctx.remaining()))

    async def _read(self, apps: k8s.AppsV1Api, t: Target, timeout: float) -> Workload:
        if t.kind == "Deployment":
            return await apps.read_namespaced_deployment(
                t.name, t.namespace, _request_timeout=timeout
            )
        if t.kind == "StatefulSet":
            return await apps.read_namespaced_stateful_set(
                t.name, t.namespace, _request_timeout=timeout
            )
        return await apps.read_namespaced_daemon_set(t.name, t.namespace, _request_timeout=timeout)

    async def _patch(
        self, apps: k8s.AppsV1Api, t: Target, body: dict[str, Any], timeout: float
    ) -> Workload:
        kwargs: dict[str, Any] = {
            "_content_type": "application/strategic-merge-patch+json",
            "_request_timeout": timeout,
        }
        if t.kind == "Deployment":
            return await apps.patch_namespaced_deployment(t.name, t.namespace, body, **kwargs)
        if t.kind == "StatefulSet":
            return await apps.patch_namespaced_stateful_set(t.name, t.namespace, body, **kwargs)
        return await apps.patch_namespaced_daemon_set(t.name, t.namespace, body, **kwargs)

    async def _list_one(
        self, apps: k8s.AppsV1Api, t: Target, timeout: float
    ) -> tuple[Workload | None, str | None]:
        """The workload (None: gone) and the collection's current resourceVersion."""
        kwargs: dict[str, Any] = {
            "field_selector": f"metadata.name={t.name}",
            "_request_timeout": timeout,
        }
        listed: k8s.V1DeploymentList | k8s.V1StatefulSetList | k8s.V1DaemonSetList
        if t.kind == "Deployment":
            listed = await apps.list_namespaced_deployment(t.namespace, **kwargs)
        elif t.kind == "StatefulSet":
            listed = await apps.list_namespaced_stateful_set(t.namespace, **kwargs)
        else:
            listed = await apps.list_namespaced_daemon_set(t.namespace, **kwargs)
        rv = listed.metadata.resource_version if listed.metadata else None
        return (listed.items[0] if listed.items else None), rv

    async def _watch(
        self, apps: k8s.AppsV1Api, t: Target, resource_version: str | None, seconds: int
    ) -> AsyncIterator[tuple[str, Workload | None]]:
        """Watch events of the one workload: (type, object), one JSON event per line. On the
        shared client (the client's Watch helper builds a client of its own each time)."""
        kwargs: dict[str, Any] = {
            "field_selector": f"metadata.name={t.name}",
            "resource_version": resource_version,
            "timeout_seconds": seconds,  # the server ends the watch; then it is read again
            "watch": True,
            "_request_timeout": seconds + self.request_timeout,
        }
        if t.kind == "Deployment":
            resp = await apps.list_namespaced_deployment_without_preload_content(
                t.namespace, **kwargs
            )
        elif t.kind == "StatefulSet":
            resp = await apps.list_namespaced_stateful_set_without_preload_content(
                t.namespace, **kwargs
            )
        else:
            resp = await apps.list_namespaced_daemon_set_without_preload_content(
                t.namespace, **kwargs
            )
        try:
            if resp.status >= 400:
                raise ApiException(status=resp.status, reason=resp.reason, body=await resp.text())
            async for line in resp.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, raw = str(event.get("type", "")), event.get("object")
                if kind == "ERROR":  # e.g. 410 Gone: the resourceVersion is too old
                    status = raw if isinstance(raw, dict) else {}
                    raise ApiException(
                        status=status.get("code"),
                        reason=status.get("reason"),
                        body=json.dumps(status),
                    )
                model = _MODELS[t.kind]
                yield kind, (model.from_dict(raw) if kind in ("ADDED", "MODIFIED") else None)
        finally:
            resp.release()

    @staticmethod
    def _containers(obj: Workload) -> list[k8s.V1Container]:
        spec = obj.spec
        template = spec.template if spec is not None else None
        pod = template.spec if template is not None else None
        return list(pod.containers) if pod is not None else []

    def _container(self, obj: Workload, t: Target) -> k8s.V1Container:
        containers = self._containers(obj)
        if not containers:
            raise DeploymentFailed(f"{t} has no containers")
        if t.container is None:
            return containers[0]
        for c in containers:
            if c.name == t.container:
                return c
        raise DeploymentFailed(
            f"{t} has no container '{t.container}' (has: {', '.join(c.name for c in containers)})"
        )

    def _image_for(self, current: str | None, t: Target, version: str) -> str:
        repository = t.repository
        if repository is None:
            if not current:
                raise DeploymentFailed(
                    f"{t}: the container has no image to take the repository from"
                )
            repository = split_image(current)[0]
        return f"{repository}:{version}"

    def _patch_body(
        self, obj: Workload, t: Target, container: str, image: str, strategy: Mapping[str, Any]
    ) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "template": {"spec": {"containers": [{"name": container, "image": image}]}}
        }
        rolling = self._rolling(strategy)
        if rolling and t.kind == "Deployment":
            spec["strategy"] = {"type": "RollingUpdate", "rollingUpdate": rolling}
        elif rolling:
            spec["updateStrategy"] = {"type": "RollingUpdate", "rollingUpdate": rolling}
        rv = obj.metadata.resource_version if obj.metadata else None
        return {"metadata": {"resourceVersion": rv}, "spec": spec}

    # -- validate ---------------------------------------------------------------------------

    async def validate(self, request: DeployRequest) -> Validation:
        checks = list((await super().validate(request)).checks)
        t = self.target(request.service, request.params)
        ok_tag = bool(_TAG.match(request.version))
        checks.append(
            Check(
                "image tag",
                ok_tag,
                "" if ok_tag else f"version '{request.version}' is not a valid image tag",
            )
        )
        try:
            async with self._api() as apps:
                try:
                    obj = await self._read(apps, t, self._timeout())
                except ApiException as exc:
                    return Validation((*checks, *self._access_problem(exc, t)))
                checks.append(Check("credentials", True))
                checks.extend(await self._permissions(apps, t))
                checks.append(self._workload_check(obj, t, request))
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            checks.append(Check("connection", False, self._connection_error(exc)))
        except DeploymentFailed as exc:
            checks.append(Check("configuration", False, str(exc)))
        return Validation(tuple(checks))

    def _access_problem(self, exc: ApiException, t: Target) -> tuple[Check, ...]:
        if exc.status == 401:
            return (Check("credentials", False, api_error(exc)),)
        if exc.status == 403:
            return (Check("credentials", True), Check("permissions", False, api_error(exc)))
        if exc.status == 404:
            return (Check("credentials", True), Check("workload", False, f"{t} not found"))
        return (Check("workload", False, f"reading {t}: {api_error(exc)}"),)

    def _connection_error(self, exc: BaseException) -> str:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"cannot reach the API server: {text}"

    async def _permissions(self, apps: k8s.AppsV1Api, t: Target) -> list[Check]:
        """What RBAC allows this identity on the workload (SelfSubjectAccessReview)."""
        authz = k8s.AuthorizationV1Api(apps.api_client)
        denied: list[str] = []
        for verb in ("patch", "list", "watch"):
            review = k8s.V1SelfSubjectAccessReview(
                spec=k8s.V1SelfSubjectAccessReviewSpec(
                    resource_attributes=k8s.V1ResourceAttributes(
                        namespace=t.namespace,
                        verb=verb,
                        group="apps",
                        resource=t.resource,
                        name=t.name,
                    )
                )
            )
            try:
                result = await authz.create_self_subject_access_review(
                    review, _request_timeout=self._timeout()
                )
            except ApiException as exc:  # cannot ask: the run itself will tell
                return [Check("permissions", True, f"not checked: {api_error(exc)}")]
            if result.status is None or not result.status.allowed:
                denied.append(verb)
        if denied:
            return [
                Check(
                    "permissions",
                    False,
                    f"not allowed to {', '.join(denied)} {t.resource} in namespace {t.namespace}",
                )
            ]
        return [Check("permissions", True)]

    def _workload_check(self, obj: Workload, t: Target, request: DeployRequest) -> Check:
        try:
            self._container(obj, t)
        except DeploymentFailed as exc:
            return Check("workload", False, str(exc))
        spec = obj.spec
        if isinstance(obj, k8s.V1Deployment) and spec is not None:
            if obj.spec.paused:
                return Check("workload", False, f"{t} is paused (kubectl rollout resume)")
            kind = obj.spec.strategy.type if obj.spec.strategy else None
            if kind == "Recreate" and self._rolling(request.strategy):
                return Check(
                    "workload",
                    False,
                    f"{t} uses strategy Recreate: max_surge/max_unavailable need RollingUpdate",
                )
        if isinstance(obj, k8s.V1StatefulSet | k8s.V1DaemonSet):
            us = obj.spec.update_strategy if obj.spec else None
            kind = (us.type if us else None) or "RollingUpdate"
            if kind != "RollingUpdate":
                return Check(
                    "workload",
                    False,
                    f"{t} uses updateStrategy {kind}: only RollingUpdate rollouts can be followed",
                )
            if isinstance(obj, k8s.V1StatefulSet) and "max_surge" in request.strategy:
                return Check("workload", False, f"{t}: a StatefulSet takes no max_surge")
        return Check("workload", True)

    # -- deploy -----------------------------------------------------------------------------

    async def deploy(self, ctx: DeployContext) -> None:
        req = ctx.request
        t = self.target(req.service, req.params)
        try:
            async with self._api() as apps:
                await self._deploy(apps, t, ctx)
        except ApiException as exc:
            raise DeploymentFailed(f"{t}: {api_error(exc)}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise DeploymentFailed(self._connection_error(exc)) from None

    async def _deploy(self, apps: k8s.AppsV1Api, t: Target, ctx: DeployContext) -> None:
        req = ctx.request
        before, image, sent = "", "", False
        try:
            for attempt in range(CONFLICT_RETRIES):
                current = await self._read(apps, t, self._timeout(ctx))
                container = self._container(current, t)
                before = container.image or ""
                image = self._image_for(before, t, req.version)
                body = self._patch_body(current, t, container.name, image, req.strategy)
                sent = True  # from here a stop may find the patch applied
                try:
                    obj = await self._patch(apps, t, body, self._timeout(ctx))
                    break
                except ApiException as exc:
                    if exc.status != 409 or attempt == CONFLICT_RETRIES - 1:
                        raise
                    ctx.log(f"{t} changed while patching ({api_error(exc)}); reading it again")
            verb = "rollback: restoring" if req.trigger == "rollback" else "setting"
            ctx.log(f"{t}: {verb} container image {before} -> {image}")
            await ctx.report_progress(
                0, f"{t}: image {image}", {"image": image, "previous": before}
            )
            await self._follow(apps, t, ctx, obj)
        except asyncio.CancelledError:
            if sent and before != image:
                await self._undo(apps, t, ctx, image, before)
            raise

    async def _undo(
        self, apps: k8s.AppsV1Api, t: Target, ctx: DeployContext, image: str, before: str
    ) -> None:
        """The run is stopped mid-rollout: put the image it replaced back, unless someone
        changed the workload's image since (within kill_grace; never raises)."""
        try:
            async with asyncio.timeout(max(ctx.kill_grace, 1.0)):
                current = await self._read(apps, t, self.request_timeout)
                container = self._container(current, t)
                if container.image != image:
                    ctx.log(f"run stopped: {t} now runs {container.image}; left as it is")
                    return
                body = self._patch_body(current, t, container.name, before, {})
                await self._patch(apps, t, body, self.request_timeout)
                ctx.log(f"run stopped before the rollout completed: {t} image restored to {before}")
        except Exception as exc:  # the run is ending anyway: say what could not be undone
            reason = api_error(exc) if isinstance(exc, ApiException) else type(exc).__name__
            ctx.log(f"run stopped: could not restore {t} image {before}: {reason}", "stderr")

    async def _follow(
        self, apps: k8s.AppsV1Api, t: Target, ctx: DeployContext, obj: Workload
    ) -> None:
        """Watch the workload until kubectl's rules say done (or failed). After a watch ends
        it is listed again, as an informer does: the list's resourceVersion is current,
        where the object's own may be older than the server's watch history (410)."""
        seen: dict[str, Any] = {}
        rv = obj.metadata.resource_version if obj.metadata else None
        while True:
            if await self._judge(obj, t, ctx, seen):
                return
            seconds = max(1, min(WATCH_SECONDS, int(ctx.remaining()) + 1))
            try:
                async for kind, event in self._watch(apps, t, rv, seconds):
                    if kind == "DELETED":
                        raise DeploymentFailed(f"{t} was deleted during the rollout")
                    if event is not None and await self._judge(event, t, ctx, seen):
                        return
            except ApiException as exc:
                if exc.status != 410:  # 410 Gone: too old a resourceVersion; list again
                    raise
            listed, rv = await self._list_one(apps, t, self._timeout(ctx))
            if listed is None:
                raise DeploymentFailed(f"{t} was deleted during the rollout")
            obj = listed

    async def _judge(
        self, obj: Workload, t: Target, ctx: DeployContext, seen: dict[str, Any]
    ) -> bool:
        """Apply kubectl's rules to one observation; log what changed, report progress."""
        for cond in getattr(obj.status, "conditions", None) or ():
            line = f"{cond.type}={cond.status} {cond.reason or ''}: {cond.message or ''}"
            if seen.get(f"cond:{cond.type}") != line:
                seen[f"cond:{cond.type}"] = line
                ctx.log(f"{t} condition {line}")
        try:
            state = rollout_status(obj)
        except RolloutFailed as exc:
            ctx.log(str(exc), "stderr")
            raise DeploymentFailed(str(exc)) from None
        if seen.get("message") != state.message:
            seen["message"] = state.message
            ctx.log(state.message)
        key = (state.percent, state.summary)
        if seen.get("progress") != key and (state.observed or state.done):
            seen["progress"] = key
            await ctx.report_progress(
                state.percent,
                state.summary if not state.done else state.message,
                {
                    "kind": t.kind,
                    "desired": state.desired,
                    "updated": state.updated,
                    "available": state.available,
                },
            )
        return state.done

    # -- drift ------------------------------------------------------------------------------

    async def current_version(
        self, environment: str, service: str, params: Mapping[str, Any]
    ) -> str | None:
        """The tag of the container's image in the workload's spec (None: no such workload
        or container, or an image pinned by digest only)."""
        t = self.target(service, params)
        try:
            async with self._api() as apps:
                obj = await self._read(apps, t, self.request_timeout)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise DeploymentFailed(f"{t}: {api_error(exc)}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise DeploymentFailed(self._connection_error(exc)) from None
        try:
            image = self._container(obj, t).image
        except DeploymentFailed:
            return None
        return image_version(image) if image else None
