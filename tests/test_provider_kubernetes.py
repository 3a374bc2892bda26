"""The `kubernetes` provider through a real Executor and Store, against tests/fake_kube.py
(no API server can run here), with the real `kubernetes` client; the fake itself is held
honest by the real `kubectl` (test_kubectl_*)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from desired_state import EnvironmentSpec
from reconciler.config import ConfigError, ProviderConfig
from reconciler.executor import Executor, Job
from reconciler.providers.kubernetes import (
    KubernetesProvider,
    RolloutFailed,
    image_version,
    rollout_status,
    split_image,
)
from reconciler.store import Store
from tests.fake_kube import FakeKube

pytestmark = pytest.mark.timeout(60)

TOKEN = "kube-token-5f3a9c1e77"
READER = "reader-token-0b1d2e"
REPO = "registry.local:5000/team/api"


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube(tick=0.02, deadline_scale=0.01) as fake:
        yield fake


@pytest.fixture
def kube_token() -> Iterator[FakeKube]:
    with FakeKube(token=TOKEN, readonly_tokens=(READER,), tick=0.02) as fake:
        yield fake


def make_provider(kube: FakeKube, tmp_path: Path, token: str | None = None, **settings: Any):
    config = kube.kubeconfig(tmp_path / f"kubeconfig-{token or 'anon'}", token=token)
    conf = ProviderConfig.model_validate(
        {"type": "kubernetes", "kubeconfig": str(config), **settings}
    )
    return KubernetesProvider("k8s", conf, tmp_path)


def job(
    version: str,
    previous: str | None = "1.0",
    *,
    params: dict[str, Any] | None = None,
    timeout: int = 30,
    strategy: dict[str, Any] | None = None,
    trigger: str = "git",
) -> Job:
    doc: dict[str, Any] = {
        "environment": "staging",
        "provider": "k8s",
        "services": {"api": {"version": version, "params": params or {}}},
        "timeout": timeout,
    }
    if strategy:
        doc["strategy"] = strategy
    return Job(
        spec=EnvironmentSpec.model_validate(doc),
        service="api",
        version=version,
        previous_version=previous,
        trigger=trigger,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.from_url(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        yield s
    finally:
        s.engine.dispose()


def run(store: Store, provider: KubernetesProvider, j: Job, kill_grace: float = 2.0):
    async def main():
        rec = await Executor(store, {"k8s": provider}, kill_grace=kill_grace).run(j)
        return store.get_deployment(rec.id, with_progress=True, with_log=True)

    return asyncio.run(main())


# -- kubectl's rules, from kubectl's own table tests (rollout_status_test.go) ------------------


def deployment(generation: int, spec_replicas: int, **status: Any):
    from kubernetes.aio.client import V1Deployment

    return V1Deployment.from_dict(
        {
            "metadata": {"name": "foo", "namespace": "bar", "generation": generation},
            "spec": {
                "replicas": spec_replicas,
                "selector": {},
                "template": {"spec": {"containers": [{"name": "c", "image": "i:1"}]}},
            },
            "status": status,
        }
    )


@pytest.mark.parametrize(
    ("generation", "replicas", "status", "message", "done"),
    [
        (0, 1, dict(observedGeneration=1, replicas=1, updatedReplicas=0, availableReplicas=1),
         'Waiting for deployment "foo" rollout to finish: 0 out of 1 new replicas have been updated...', False),
        (1, 1, dict(observedGeneration=1, replicas=2, updatedReplicas=1, availableReplicas=2),
         'Waiting for deployment "foo" rollout to finish: 1 old replicas are pending termination...', False),
        (1, 2, dict(observedGeneration=1, replicas=2, updatedReplicas=2, availableReplicas=1, unavailableReplicas=1),
         'Waiting for deployment "foo" rollout to finish: 1 of 2 updated replicas are available...', False),
        (1, 2, dict(observedGeneration=1, replicas=2, updatedReplicas=2, availableReplicas=2),
         'deployment "foo" successfully rolled out', True),
        (2, 2, dict(observedGeneration=1, replicas=2, updatedReplicas=2, availableReplicas=2),
         "Waiting for deployment spec update to be observed...", False),
    ],
)  # fmt: skip
def test_deployment_rules_are_kubectls(generation, replicas, status, message, done):
    state = rollout_status(deployment(generation, replicas, **status))
    assert (state.message, state.done) == (message, done)


def test_progress_deadline_exceeded_fails_with_the_conditions_message():
    d = deployment(
        2,
        3,
        observedGeneration=2,
        replicas=4,
        updatedReplicas=2,
        availableReplicas=2,
        conditions=[
            {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": 'ReplicaSet "foo-7d9" has timed out progressing.',
            }
        ],
    )
    with pytest.raises(RolloutFailed) as err:
        rollout_status(d)
    assert str(err.value) == (
        'deployment "foo" exceeded its progress deadline: '
        'ReplicaSet "foo-7d9" has timed out progressing.'
    )
    # Not yet observed: the old condition does not count (kubectl checks it only after).
    assert not rollout_status(
        deployment(3, 3, observedGeneration=2, conditions=d.status.to_dict()["conditions"])
    ).done


def statefulset(
    generation: int,
    spec_replicas: int,
    partition: int | None,
    strategy: str = "RollingUpdate",
    **status: Any,
):
    from kubernetes.aio.client import V1StatefulSet

    update: dict[str, Any] = {"type": strategy}
    if partition is not None:
        update["rollingUpdate"] = {"partition": partition}
    return V1StatefulSet.from_dict(
        {
            "metadata": {"name": "foo", "namespace": "bar", "generation": generation},
            "spec": {
                "replicas": spec_replicas,
                "selector": {},
                "updateStrategy": update,
                "template": {"spec": {"containers": [{"name": "c", "image": "i:1"}]}},
            },
            "status": {"replicas": spec_replicas, **status},
        }
    )


@pytest.mark.parametrize(
    ("generation", "replicas", "partition", "status", "message", "done"),
    [
        (1, 3, None, dict(observedGeneration=1, readyReplicas=3, updatedReplicas=3, currentRevision="foo", updateRevision="foo", currentReplicas=3),
         "statefulset rolling update complete 3 pods at revision foo...", True),
        (2, 3, None, dict(observedGeneration=1, readyReplicas=3),
         "Waiting for statefulset spec update to be observed...", False),
        (1, 3, None, dict(observedGeneration=1, readyReplicas=2),
         "Waiting for 1 pods to be ready...", False),
        (1, 3, 2, dict(observedGeneration=1, readyReplicas=3, updatedReplicas=0),
         "Waiting for partitioned roll out to finish: 0 out of 1 new pods have been updated...", False),
        (1, 3, 2, dict(observedGeneration=1, readyReplicas=3, updatedReplicas=1),
         "partitioned roll out complete: 1 new pods have been updated...", True),
        (1, 3, None, dict(observedGeneration=1, readyReplicas=3, updatedReplicas=2, currentRevision="foo", updateRevision="bar"),
         "waiting for statefulset rolling update to complete 2 pods at revision bar...", False),
    ],
)  # fmt: skip
def test_statefulset_rules_are_kubectls(generation, replicas, partition, status, message, done):
    state = rollout_status(statefulset(generation, replicas, partition, **status))
    assert (state.message, state.done) == (message, done)
    with pytest.raises(RolloutFailed, match="only available for RollingUpdate"):
        rollout_status(statefulset(1, 3, None, "OnDelete", observedGeneration=1))


@pytest.mark.parametrize(
    ("generation", "status", "message", "done"),
    [
        (0, dict(observedGeneration=1, updatedNumberScheduled=0, desiredNumberScheduled=1, numberAvailable=0),
         'Waiting for daemon set "foo" rollout to finish: 0 out of 1 new pods have been updated...', False),
        (1, dict(observedGeneration=1, updatedNumberScheduled=2, desiredNumberScheduled=2, numberAvailable=1),
         'Waiting for daemon set "foo" rollout to finish: 1 of 2 updated pods are available...', False),
        (1, dict(observedGeneration=1, updatedNumberScheduled=2, desiredNumberScheduled=2, numberAvailable=2),
         'daemon set "foo" successfully rolled out', True),
        (2, dict(observedGeneration=1, updatedNumberScheduled=2, desiredNumberScheduled=2, numberAvailable=2),
         "Waiting for daemon set spec update to be observed...", False),
    ],
)  # fmt: skip
def test_daemonset_rules_are_kubectls(generation, status, message, done):
    from kubernetes.aio.client import V1DaemonSet

    ds = V1DaemonSet.from_dict(
        {
            "metadata": {"name": "foo", "generation": generation},
            "spec": {
                "selector": {},
                "updateStrategy": {"type": "RollingUpdate"},
                "template": {"spec": {"containers": [{"name": "c", "image": "i:1"}]}},
            },
            "status": {
                "currentNumberScheduled": 0,
                "numberMisscheduled": 0,
                "numberReady": 0,
                **status,
            },
        }
    )
    state = rollout_status(ds)
    assert (state.message, state.done) == (message, done)


def test_image_references():
    assert split_image("registry.local:5000/team/api:1.2") == (
        "registry.local:5000/team/api",
        "1.2",
        None,
    )
    assert split_image("registry.local:5000/team/api") == (
        "registry.local:5000/team/api",
        None,
        None,
    )
    assert split_image("api:1.2@sha256:abc") == ("api", "1.2", "sha256:abc")
    assert image_version("nginx") == "latest"
    assert image_version("nginx@sha256:abc") is None
    assert image_version("ghcr.io/o/nginx:1.27-alpine") == "1.27-alpine"


# -- configuration and desired-state checks ---------------------------------------------------


def test_settings_mistakes_are_configuration_errors(kube: FakeKube, tmp_path: Path):
    with pytest.raises(ConfigError, match=r"providers\.k8s\.kube_config: unknown key"):
        make_provider(kube, tmp_path, kube_config="x")
    with pytest.raises(ConfigError, match=r"providers\.k8s\.context: context 'prod' not in"):
        make_provider(kube, tmp_path, context="prod")
    with pytest.raises(ConfigError, match=r"providers\.k8s\.namespace: 'Not_A_Ns'"):
        make_provider(kube, tmp_path, namespace="Not_A_Ns")
    conf = ProviderConfig.model_validate({"type": "kubernetes", "kubeconfig": "missing.yaml"})
    with pytest.raises(ConfigError, match=r"providers\.k8s\.kubeconfig: .*missing\.yaml"):
        KubernetesProvider("k8s", conf, tmp_path)


def test_params_and_strategy_are_checked_as_desired_state(kube: FakeKube, tmp_path: Path):
    provider = make_provider(kube, tmp_path)
    spec = EnvironmentSpec.model_validate(
        {
            "environment": "staging",
            "provider": "k8s",
            "services": {
                "api": {"version": "1", "params": {"image": "repo/api:1.0", "kind": "Job"}},
                "web": {"version": "1", "params": {"replicas": "3"}},
            },
            "strategy": {
                "type": "rolling",
                "max_surge": "lots",
                "max_unavailable": "0",
                "pause": "1",
            },
        }
    )
    problems = {".".join(map(str, loc)): msg for loc, msg in provider.check_spec(spec)}
    assert "not an image repository" in problems["services.api.params.image"]
    assert "Deployment" in problems["services.api.params.kind"]
    assert problems["services.web.params.replicas.[key]"] == "unknown key 'replicas'"
    assert "not 'lots'" in problems["strategy.max_surge"]
    assert "unknown key 'pause'" in problems["strategy.pause.[key]"]
    canary = spec.model_copy(update={"strategy": spec.strategy.model_validate({"type": "canary"})})
    assert any("supports rolling, not canary" in m for _, m in provider.check_spec(canary))
    both_zero = EnvironmentSpec.model_validate(
        {
            "environment": "s",
            "provider": "k8s",
            "services": {"api": {"version": "1"}},
            "strategy": {"type": "rolling", "max_surge": "0", "max_unavailable": "0%"},
        }
    )
    assert [m for _, m in provider.check_spec(both_zero)] == [
        "may not be 0 when max_surge is 0 as well"
    ]


# -- runs through the executor -------------------------------------------------------------


def test_deployment_rolls_out_with_kubectls_messages_and_counted_progress(
    kube: FakeKube, store: Store, tmp_path: Path
):
    kube.add_deployment("api", f"{REPO}:1.0", replicas=4, containers=("sidecar", "app"))
    provider = make_provider(kube, tmp_path)
    rec = run(
        store,
        provider,
        job(
            "1.1",
            params={"container": "app"},
            strategy={"type": "rolling", "max_surge": "1", "max_unavailable": "0"},
        ),
    )
    assert rec.status == "completed", rec.error_message
    obj = kube.get("deployments", "default", "api")
    images = {c["name"]: c["image"] for c in obj["spec"]["template"]["spec"]["containers"]}
    assert images == {"sidecar": f"{REPO}:1.0", "app": f"{REPO}:1.1"}  # only the named one
    assert obj["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert kube.rolled_out("deployments", "default", "api")
    doc = rec.to_json()
    assert f"deployment default/api: setting container image {REPO}:1.0 -> {REPO}:1.1" in doc["log"]
    assert 'deployment "api" successfully rolled out' in doc["log"]
    assert 'Waiting for deployment "api" rollout to finish' in doc["log"]
    steps = [(p["percent"], p["message"]) for p in doc["progress"] if p["status"] == "in_progress"]
    counted = [m for _, m in steps if " updated, " in m]
    assert counted and all(m.endswith(" of 4 available") for m in counted)
    percents = [p for p, _ in steps if p is not None]
    assert percents == sorted(percents) and percents[-1] == 100
    assert doc["validation"]["ok"] and {c["name"] for c in doc["validation"]["checks"]} >= {
        "credentials",
        "permissions",
        "workload",
    }


def test_image_param_sets_the_repository(kube: FakeKube, store: Store, tmp_path: Path):
    kube.add_deployment("web-frontend", "old.example/web:1.0", replicas=2)
    provider = make_provider(kube, tmp_path)
    rec = run(store, provider, job("2.0", params={"deployment": "web-frontend", "image": REPO}))
    assert rec.status == "completed", rec.error_message
    assert kube.image("deployments", "default", "web-frontend") == f"{REPO}:2.0"


@pytest.mark.parametrize("kind", ["StatefulSet", "DaemonSet"])
def test_statefulset_and_daemonset_roll_out(
    kube: FakeKube, store: Store, tmp_path: Path, kind: str
):
    if kind == "StatefulSet":
        kube.add_statefulset("db", f"{REPO}:1.0", replicas=3, namespace="data")
        resource = "statefulsets"
    else:
        kube.add_daemonset("db", f"{REPO}:1.0", namespace="data")
        resource = "daemonsets"
    provider = make_provider(kube, tmp_path, namespace="data")
    rec = run(store, provider, job("1.1", params={"deployment": "db", "kind": kind}))
    assert rec.status == "completed", rec.error_message
    assert kube.image(resource, "data", "db") == f"{REPO}:1.1"
    assert kube.rolled_out(resource, "data", "db")
    done = (
        "partitioned roll out complete: 3 new pods"
        if kind == "StatefulSet"
        else 'daemon set "db" successfully rolled out'
    )
    assert done in rec.to_json()["log"]


def test_platform_failure_keeps_the_previous_version_serving(
    kube: FakeKube, store: Store, tmp_path: Path
):
    kube.add_deployment("api", f"{REPO}:1.0", replicas=4, progress_deadline=30)  # 0.3 s here
    provider = make_provider(kube, tmp_path)
    rec = run(store, provider, job("1.1-fail"))
    assert rec.status == "failed"
    assert rec.error_message.startswith(
        'deployment "api" exceeded its progress deadline: ReplicaSet "api-'
    )
    assert rec.error_message.endswith("has timed out progressing.")
    # Kubernetes keeps the old pods serving (maxUnavailable), as a real cluster does.
    assert kube.serving("default", "api").get(f"{REPO}:1.0", 0) >= 3
    assert f"{REPO}:1.1-fail" not in kube.serving("default", "api")


def test_rollback_restores_the_previous_replicaset(kube: FakeKube, store: Store, tmp_path: Path):
    kube.add_deployment("api", f"{REPO}:1.0", replicas=3, progress_deadline=30)
    provider = make_provider(kube, tmp_path)
    assert run(store, provider, job("1.1-fail")).status == "failed"
    before = {rs["metadata"]["name"] for rs in kube.objects_of("replicasets")}
    rec = run(store, provider, job("1.0", previous="1.1-fail", trigger="rollback"))
    assert rec.status == "completed", rec.error_message
    assert kube.serving("default", "api") == {f"{REPO}:1.0": 3}
    # The ReplicaSet Kubernetes kept for 1.0 is the one scaled back up: no new one was made.
    assert {rs["metadata"]["name"] for rs in kube.objects_of("replicasets")} == before
    assert "rollback: restoring container image" in rec.to_json()["log"]


def test_deadline_mid_rollout_restores_the_image(kube: FakeKube, store: Store, tmp_path: Path):
    kube.add_deployment("api", f"{REPO}:1.0", replicas=3)  # deadline 600 s: 6 s here
    provider = make_provider(kube, tmp_path)
    rec = run(store, provider, job("1.1-fail", timeout=1))
    assert rec.status == "timed_out" and "deadline of 1s" in rec.error_message
    assert kube.image("deployments", "default", "api") == f"{REPO}:1.0"
    assert f"image restored to {REPO}:1.0" in rec.to_json()["log"]
    kube.wait(lambda: kube.rolled_out("deployments", "default", "api"), what="restored")


def test_cancellation_restores_the_image_and_ends_cancelled(
    kube: FakeKube, store: Store, tmp_path: Path
):
    kube.add_deployment("api", f"{REPO}:1.0", replicas=3)
    provider = make_provider(kube, tmp_path)

    async def main():
        started = asyncio.Event()
        ex = Executor(
            store,
            {"k8s": provider},
            kill_grace=2.0,
            listener=lambda ev: started.set() if " updated, " in ev.message else None,
        )
        task = asyncio.create_task(ex.run(job("1.1-fail")))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return store.history()[0]

    rec = asyncio.run(main())
    assert rec.status == "cancelled"
    assert kube.image("deployments", "default", "api") == f"{REPO}:1.0"


def test_a_workload_changed_concurrently_is_read_again(
    kube: FakeKube, store: Store, tmp_path: Path
):
    kube.add_deployment("api", f"{REPO}:1.0", replicas=2)
    provider = make_provider(kube, tmp_path)
    changed = []

    def meddle(method: str, path: str) -> None:  # someone edits the object under our feet
        if method == "PATCH" and not changed:
            changed.append(path)
            kube.set_label("deployments", "default", "api", "touched", "yes")

    kube.before_request = meddle
    rec = run(store, provider, job("1.1"))
    assert rec.status == "completed", rec.error_message
    assert "changed while patching (409 Conflict" in rec.to_json()["log"]
    assert kube.get("deployments", "default", "api")["metadata"]["labels"]["touched"] == "yes"
    assert kube.image("deployments", "default", "api") == f"{REPO}:1.1"


# -- validation refusals: nothing changes on the target --------------------------------------


def test_bad_token_fails_validation_and_patches_nothing(
    kube_token: FakeKube, store: Store, tmp_path: Path
):
    kube_token.add_deployment("api", f"{REPO}:1.0", replicas=2)
    provider = make_provider(kube_token, tmp_path, token="wrong-token-123")
    rec = run(store, provider, job("1.1"))
    assert rec.status == "failed"
    assert rec.error_message == "validation failed: credentials: 401 Unauthorized: Unauthorized"
    assert kube_token.patches() == []
    assert kube_token.image("deployments", "default", "api") == f"{REPO}:1.0"


def test_read_only_identity_fails_validation_on_permissions(
    kube_token: FakeKube, store: Store, tmp_path: Path
):
    kube_token.add_deployment("api", f"{REPO}:1.0", replicas=2)
    provider = make_provider(kube_token, tmp_path, token=READER)
    rec = run(store, provider, job("1.1"))
    assert rec.status == "failed"
    assert "permissions: not allowed to patch deployments in namespace default" in rec.error_message
    assert kube_token.patches() == []


def test_missing_workload_or_container_fails_validation(
    kube: FakeKube, store: Store, tmp_path: Path
):
    kube.add_deployment("api", f"{REPO}:1.0", replicas=1)
    provider = make_provider(kube, tmp_path)
    rec = run(store, provider, job("1.1", params={"deployment": "nope"}))
    assert rec.error_message == "validation failed: workload: deployment default/nope not found"
    rec = run(store, provider, job("1.1", params={"container": "web"}))
    assert rec.error_message == (
        "validation failed: workload: deployment default/api has no container 'web' (has: app)"
    )
    rec = run(store, provider, job("1.1+build.7"))
    assert (
        rec.error_message
        == "validation failed: image tag: version '1.1+build.7' is not a valid image tag"
    )
    assert kube.patches() == []


def test_unreachable_api_server_fails_validation(kube: FakeKube, store: Store, tmp_path: Path):
    provider = make_provider(kube, tmp_path, request_timeout="2s")
    kube.stop()
    rec = run(store, provider, job("1.1"))
    assert rec.status == "failed"
    assert rec.error_message.startswith(
        "validation failed: connection: cannot reach the API server"
    )


# -- drift -------------------------------------------------------------------------------------


def test_current_version_reads_the_spec_after_an_out_of_band_change(
    kube: FakeKube, store: Store, tmp_path: Path
):
    kube.add_deployment("api", f"{REPO}:1.0", replicas=2)
    provider = make_provider(kube, tmp_path)
    assert run(store, provider, job("1.1")).status == "completed"

    def live(params: dict[str, str] | None = None) -> str | None:
        return asyncio.run(provider.current_version("staging", "api", params or {}))

    assert live() == "1.1"
    kube.set_image("deployments", "default", "api", f"{REPO}:1.1-hotfix")
    assert live() == "1.1-hotfix"
    assert live({"deployment": "gone"}) is None


# -- credentials never reach records, logs or errors --------------------------------------------


def test_token_is_used_and_never_recorded(kube_token: FakeKube, store: Store, tmp_path: Path):
    kube_token.add_deployment("api", f"{REPO}:1.0", replicas=2, progress_deadline=30)
    provider = make_provider(kube_token, tmp_path, token=TOKEN)
    assert TOKEN in provider.secrets()
    ok = run(store, provider, job("1.1"))
    bad = run(store, provider, job("1.2-fail", previous="1.1"))
    assert (ok.status, bad.status) == ("completed", "failed")
    for rec in (ok, bad):
        assert TOKEN not in json.dumps(rec.to_json())
    store.engine.dispose()
    assert TOKEN.encode() not in (tmp_path / "state.db").read_bytes()


# -- the fake, held honest by the real kubectl ---------------------------------------------------

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")


def kubectl(kube: FakeKube, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert KUBECTL is not None
    env = {**os.environ, "KUBECONFIG": str(kube.kubeconfig(tmp_path / "kubectl-config"))}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    return subprocess.run([KUBECTL, *args], capture_output=True, text=True, env=env, timeout=60)


@needs_kubectl
def test_kubectl_set_image_rollout_status_and_undo_against_the_fake(kube: FakeKube, tmp_path: Path):
    manifest = tmp_path / "api.json"
    manifest.write_text(
        json.dumps(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "api"},
                "spec": {
                    "replicas": 3,
                    "selector": {"matchLabels": {"app": "api"}},
                    "template": {
                        "metadata": {"labels": {"app": "api"}},
                        "spec": {"containers": [{"name": "app", "image": f"{REPO}:1.0"}]},
                    },
                },
            }
        )
    )
    out = kubectl(kube, tmp_path, "create", "-f", str(manifest), "--validate=false")
    assert out.returncode == 0, out.stderr
    status = kubectl(kube, tmp_path, "rollout", "status", "deployment/api", "--timeout=20s")
    assert status.returncode == 0 and 'deployment "api" successfully rolled out' in status.stdout
    kube.paused = True  # hold the rollout until kubectl watches it
    out = kubectl(kube, tmp_path, "set", "image", "deployment/api", f"app={REPO}:1.1")
    assert out.returncode == 0, out.stderr
    watches = kube.watches
    with ThreadPoolExecutor(1) as pool:
        later = pool.submit(
            kubectl, kube, tmp_path, "rollout", "status", "deployment/api", "--timeout=20s"
        )
        kube.wait(lambda: kube.watches > watches, what="kubectl's watch")
        kube.paused = False
        status = later.result()
    assert status.returncode == 0, status.stderr
    assert "new replicas have been updated" in status.stdout
    assert status.stdout.strip().endswith('deployment "api" successfully rolled out')
    assert kube.serving("default", "api") == {f"{REPO}:1.1": 3}
    undo = kubectl(kube, tmp_path, "rollout", "undo", "deployment/api")
    assert undo.returncode == 0 and "rolled back" in undo.stdout, undo.stderr
    assert (
        kubectl(kube, tmp_path, "rollout", "status", "deployment/api", "--timeout=20s").returncode
        == 0
    )
    assert kube.serving("default", "api") == {f"{REPO}:1.0": 3}
    assert (
        kube.get("deployments", "default", "api")["metadata"]["annotations"][
            "deployment.kubernetes.io/revision"
        ]
        == "3"
    )


@needs_kubectl
def test_kubectl_sees_the_progress_deadline_as_the_provider_does(kube: FakeKube, tmp_path: Path):
    kube.add_deployment("api", f"{REPO}:1.0", replicas=3, progress_deadline=30)
    assert (
        kubectl(kube, tmp_path, "set", "image", "deployment/api", f"app={REPO}:1.1-fail").returncode
        == 0
    )
    status = kubectl(kube, tmp_path, "rollout", "status", "deployment/api", "--timeout=20s")
    assert status.returncode == 1
    assert 'error: deployment "api" exceeded its progress deadline' in status.stderr


@needs_kubectl
def test_kubectl_follows_statefulsets_and_daemonsets_of_the_fake(kube: FakeKube, tmp_path: Path):
    kube.add_statefulset("db", f"{REPO}:1.0", replicas=2)
    kube.add_daemonset("agent", f"{REPO}:1.0")
    final = {}
    for ref in ("statefulset/db", "daemonset/agent"):
        assert kubectl(kube, tmp_path, "set", "image", ref, f"app={REPO}:1.1").returncode == 0
        status = kubectl(kube, tmp_path, "rollout", "status", ref, "--timeout=20s")
        assert status.returncode == 0, status.stderr
        final[ref] = status.stdout.strip().splitlines()[-1]
    assert final == {
        "statefulset/db": "partitioned roll out complete: 2 new pods have been updated...",
        "daemonset/agent": 'daemon set "agent" successfully rolled out',
    }
    assert kube.rolled_out("statefulsets", "default", "db")
    assert kube.image("daemonsets", "default", "agent") == f"{REPO}:1.1"


def test_an_api_server_that_never_answers_is_a_failed_check_after_request_timeout(
    store: Store, tmp_path: Path
):
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never answers
    try:
        fake = FakeKube()  # only for its kubeconfig writer, pointed at the silent port
        fake.url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        fake.server.server_close()
        provider = make_provider(fake, tmp_path, request_timeout="1s")
        rec = run(store, provider, job("1.1"))
    finally:
        silent.close()
    assert rec.status == "failed"
    assert rec.error_message.startswith(
        "validation failed: connection: cannot reach the API server"
    )
    assert rec.duration_seconds is not None and 1.0 <= rec.duration_seconds < 5


def test_a_watch_too_old_is_read_again_and_a_deleted_workload_fails(
    kube: FakeKube, store: Store, tmp_path: Path
):
    kube.add_deployment("api", f"{REPO}:1.0", replicas=3)
    provider = make_provider(kube, tmp_path)
    watch_requests: list[str] = []

    def compact_at_first_watch(method: str, path: str) -> None:
        if method == "GET" and "watch=true" in path:
            watch_requests.append(path)
            if len(watch_requests) == 1:
                kube.compact()  # etcd compacted: this watch's resourceVersion is gone
            else:
                kube.paused = False  # the rollout proceeds under the second watch

    kube.paused = True
    kube.before_request = compact_at_first_watch
    rec = run(store, provider, job("1.1", timeout=10))
    kube.before_request = None
    assert rec.status == "completed", rec.error_message
    assert len(watch_requests) == 2  # the one answered 410 Gone, then one after a fresh read

    kube.add_deployment("doomed", f"{REPO}:1.0", replicas=3)
    seen = kube.watches
    kube.paused = True  # the rollout waits while the workload is deleted under it

    def delete_when_watched() -> None:
        kube.wait(lambda: kube.watches > seen, what="the provider's watch")
        kube.delete("deployments", "default", "doomed")

    deleter = threading.Thread(target=delete_when_watched)
    deleter.start()
    rec = run(store, provider, job("1.1", params={"deployment": "doomed"}, timeout=10))
    deleter.join()
    kube.paused = False
    assert rec.status == "failed"
    assert rec.error_message == "deployment default/doomed was deleted during the rollout"


def test_an_image_changed_by_someone_else_mid_rollout_is_not_restored(
    kube: FakeKube, store: Store, tmp_path: Path
):
    kube.add_deployment("api", f"{REPO}:1.0", replicas=3)
    provider = make_provider(kube, tmp_path)

    async def main():
        started = asyncio.Event()
        ex = Executor(
            store,
            {"k8s": provider},
            kill_grace=2.0,
            listener=lambda ev: started.set() if " updated, " in ev.message else None,
        )
        task = asyncio.create_task(ex.run(job("1.1-fail")))
        await started.wait()
        kube.set_image("deployments", "default", "api", f"{REPO}:1.0-hotfix")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return store.get_deployment(store.history()[0].id, with_log=True)

    rec = asyncio.run(main())
    assert rec.status == "cancelled"
    assert kube.image("deployments", "default", "api") == f"{REPO}:1.0-hotfix"
    assert f"now runs {REPO}:1.0-hotfix; left as it is" in rec.to_json()["log"]


def test_kubeconfig_defaults_to_the_environment(kube: FakeKube, tmp_path: Path, monkeypatch):
    config = kube.kubeconfig(tmp_path / "from-env")
    monkeypatch.setenv("KUBECONFIG", str(config))
    provider = KubernetesProvider(
        "k8s", ProviderConfig.model_validate({"type": "kubernetes"}), tmp_path
    )
    assert provider.kubeconfig == str(config)
    kube.add_deployment("api", f"{REPO}:1.0", replicas=1)
    assert asyncio.run(provider.current_version("e", "api", {})) == "1.0"
    monkeypatch.delenv("KUBECONFIG")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(ConfigError, match="no cluster configured"):
        KubernetesProvider("k8s", ProviderConfig.model_validate({"type": "kubernetes"}), tmp_path)


def test_workloads_whose_rollout_cannot_be_followed_fail_validation(
    kube: FakeKube, store: Store, tmp_path: Path
):
    kube.add_deployment("paused", f"{REPO}:1.0", replicas=1)
    kube.add_deployment("recreate", f"{REPO}:1.0", replicas=1, strategy={"type": "Recreate"})
    kube.add_statefulset("db", f"{REPO}:1.0", replicas=1)
    merge = "application/merge-patch+json"
    with kube.lock:
        kube.patch("deployments", "default", "paused", merge, {"spec": {"paused": True}})
        kube.patch(
            "statefulsets",
            "default",
            "db",
            merge,
            {"spec": {"updateStrategy": {"type": "OnDelete", "rollingUpdate": None}}},
        )
    provider = make_provider(kube, tmp_path)
    errors = [
        run(store, provider, j).error_message
        for j in (
            job("1.1", params={"deployment": "paused"}),
            job(
                "1.1",
                params={"deployment": "recreate"},
                strategy={"type": "rolling", "max_surge": "1"},
            ),
            job("1.1", params={"deployment": "db", "kind": "StatefulSet"}),
        )
    ]
    assert errors == [
        "validation failed: workload: deployment default/paused is paused (kubectl rollout resume)",
        "validation failed: workload: deployment default/recreate uses strategy Recreate: "
        "max_surge/max_unavailable need RollingUpdate",
        "validation failed: workload: statefulset default/db uses updateStrategy OnDelete: "
        "only RollingUpdate rollouts can be followed",
    ]
    assert kube.patches() == []
    # Without strategy parameters a Recreate Deployment deploys (kubectl's rules still hold).
    rec = run(store, provider, job("1.1", params={"deployment": "recreate"}))
    assert rec.status == "completed", rec.error_message


def test_the_fake_answers_the_official_client(kube: FakeKube, tmp_path: Path):
    """The fake's discovery and write semantics, as the real client sees them."""
    from kubernetes.aio import client, config

    kube.add_deployment("api", f"{REPO}:1.0", replicas=1)

    async def main():
        conf = client.Configuration()
        await config.load_kube_config(
            config_file=str(kube.kubeconfig(tmp_path / "kc")), client_configuration=conf
        )
        async with client.ApiClient(conf) as api:
            version = await client.VersionApi(api).get_code()
            apps = client.AppsV1Api(api)
            stale = await apps.read_namespaced_deployment("api", "default")
            merged = await apps.patch_namespaced_deployment(
                "api",
                "default",
                {"metadata": {"labels": {"team": "shop"}}},
                _content_type="application/merge-patch+json",
            )
            stale.spec.replicas = 2
            with pytest.raises(client.ApiException) as conflict:
                await apps.replace_namespaced_deployment("api", "default", stale)
            merged.spec.replicas = 2
            replaced = await apps.replace_namespaced_deployment("api", "default", merged)
            patched = await apps.patch_namespaced_deployment(
                "api",
                "default",
                [
                    {
                        "op": "replace",
                        "path": "/spec/template/spec/containers/0/image",
                        "value": "x:2",
                    }
                ],
                _content_type="application/json-patch+json",
            )
            listed = await apps.list_namespaced_replica_set("default", label_selector="app=api")
            return version, merged, conflict.value, replaced, patched, listed

    version, merged, conflict, replaced, patched, listed = asyncio.run(main())
    assert (version.major, version.minor, version.git_version) == ("1", "32", "v1.32.4")
    assert merged.metadata.labels["team"] == "shop"
    assert conflict.status == 409 and "the object has been modified" in conflict.body
    assert replaced.spec.replicas == 2 and replaced.metadata.generation == 2
    assert patched.spec.template.spec.containers[0].image == "x:2"
    assert patched.metadata.generation == 3
    revisions = {
        rs.metadata.annotations["deployment.kubernetes.io/revision"] for rs in listed.items
    }
    assert "1" in revisions  # (the image patch may have made revision 2 already)
    assert all(rs.metadata.owner_references[0].controller for rs in listed.items)


def test_credentials_in_the_kubeconfig_are_redacted(kube: FakeKube, tmp_path: Path):
    (tmp_path / "sa-token").write_text("token-from-file-4e1f\n")
    doc = json.loads(kube.kubeconfig(tmp_path / "kc").read_text())
    doc["users"] = [
        {"name": "fake-user", "user": {"tokenFile": "sa-token"}},
        {"name": "other", "user": {"username": "ada", "password": "pa55word-9"}},
    ]
    (tmp_path / "kc").write_text(json.dumps(doc))
    conf = ProviderConfig.model_validate({"type": "kubernetes", "kubeconfig": "kc"})
    secrets = KubernetesProvider("k8s", conf, tmp_path).secrets()
    assert "token-from-file-4e1f" in secrets and "pa55word-9" in secrets
