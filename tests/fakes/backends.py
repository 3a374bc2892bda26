"""Backends of the conformance suite for the built-in types (tests/conformance.py)."""

from __future__ import annotations

import contextlib
import time
import uuid
from pathlib import Path
from typing import Any

from docker.errors import NotFound

from tests.aws_support import ACCOUNT, REGION, SECRET_KEY, EcsScheduler, LambdaUpdates, Moto
from tests.dockerd import Dockerd
from tests.fake_kube import FakeKube, image_tag
from tests.fakes.hosted import FakeNetlify, FakeRailway, FakeServer, FakeVercel, make_zip
from tests.support import DEPLOY_SCRIPT, alive

TOKEN = "tok-s3cr3t-9f8e7d6c5b4a"

# What is live, as the deploy script's log says: the last version that ended "ok" for
# this environment and service (the command type's `current_version_command`).
PROBE_SCRIPT = r"""#!/bin/sh
awk -v env="$RECONCILER_ENVIRONMENT" -v svc="$RECONCILER_SERVICE" \
  '$1 == "end" && $2 == env && $3 == svc && $NF == "ok" { v = $4 } END { if (v) print v }' \
  "$DEPLOY_LOG"
"""


class CommandBackend:
    """The `command` type with the deploy script of tests/support.py; the live version is
    read by `current_version_command` (a script reading the deploy log)."""

    secret = "hunter2-secret"
    failure_text = "exit status 3"
    reads_live_version = True

    def __init__(self, tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.log, self.pids = tmp / "deploy.log", tmp / "deploy.pids"
        self.log.touch()
        self.script = tmp / "deploy.sh"
        self.script.write_text(DEPLOY_SCRIPT)
        self.script.chmod(0o755)
        self.probe = tmp / "live.sh"
        self.probe.write_text(PROBE_SCRIPT)
        self.probe.chmod(0o755)

    def provider_settings(self, *, valid: bool = True) -> dict[str, Any]:
        script = str(self.script) if valid else str(self.script.parent / "missing.sh")
        return {
            "type": "command",
            "command": [script, "{environment}", "{service}", "{version}"],
            "current_version_command": [str(self.probe)],
            "env": {
                "DEPLOY_LOG": str(self.log),
                "DEPLOY_PIDS": str(self.pids),
                "DEPLOY_GATE": "/nonexistent",
                "SECRET_TOKEN": self.secret,
            },
        }

    def params(self) -> dict[str, str]:
        return {}

    def prepare(self, version: str) -> None:
        pass

    def _lines(self) -> list[list[str]]:
        return [line.split() for line in self.log.read_text().splitlines()]

    def live_version(self) -> str | None:
        done = [r[3] for r in self._lines() if r[0] == "end" and r[-1] == "ok"]
        return done[-1] if done else None

    def set_live(self, version: str) -> None:
        with self.log.open("a") as f:
            f.write(f"end staging api {version} ok\n")

    def deployments_seen(self) -> int:
        return sum(1 for r in self._lines() if r[0] == "start")

    def nothing_running(self) -> bool:
        if not self.pids.exists():
            return True
        return not any(alive(int(p)) for p in self.pids.read_text().split())


class HostedBackend:
    """A fake hosted platform (tests/fakes/hosted.py) with the provider type that drives it."""

    secret = TOKEN
    reads_live_version = True

    def __init__(self, kind: str, fake: FakeServer, tmp: Path, **settings: Any) -> None:
        self.kind, self.fake, self.tmp = kind, fake, tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.token_file = tmp / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.bad_token_file = tmp / "bad-token"
        self.bad_token_file.write_text("tok-wrong-0000\n")
        self.settings = settings
        self.failure_text = {
            "vercel": 'Command "npm run build" exited with 1',
            "netlify": "deploy directory 'dist' does not exist",
            "railway": "health check failed",
        }[kind]

    def provider_settings(self, *, valid: bool = True) -> dict[str, Any]:
        return {
            "type": self.kind,
            "token_file": str(self.token_file if valid else self.bad_token_file),
            "api_url": self.fake.url,
            "poll_interval": 0.05,
            "request_timeout": 5,
            **self.settings,
        }

    def params(self) -> dict[str, str]:
        if self.kind == "vercel":
            return {"project": "web", "repo": "acme/web"}
        if self.kind == "netlify":
            return {"site": "5a1e-site", "artifact": str(self.tmp / "dist" / "site-{version}.zip")}
        return {
            "service_id": "svc-7f3a",
            "environment_id": "env-prod-1",
            "image": "ghcr.io/acme/web",
        }

    def prepare(self, version: str) -> None:
        if self.kind == "netlify":
            make_zip(self.tmp / "dist" / f"site-{version}.zip", f"<h1>{version}</h1>")

    def live_version(self) -> str | None:
        return self.fake.live_version()  # type: ignore[attr-defined,no-any-return]

    def set_live(self, version: str) -> None:
        self.fake.set_live(version)  # type: ignore[attr-defined]

    def deployments_seen(self) -> int:
        return len(self.fake.runs)

    def nothing_running(self) -> bool:
        return not self.fake.in_flight()  # type: ignore[attr-defined]


FAKES = {"vercel": FakeVercel, "netlify": FakeNetlify, "railway": FakeRailway}


class DockerBackend:
    """The `docker` type on the session's Docker Engine (tests/dockerd.py). The engine is
    shared, so each backend deploys a container name of its own. A version's image is
    tagged by `prepare` from the test images: `-fail` from app:2.0-exits (exits 3 at once),
    `-hang` from app:2.0-slow (never healthy), anything else from app:1.0 (healthy)."""

    # The type's one credential is the registry password (`password_file`): the images
    # are all local (pull = missing), so it is held but never sent; it must still never be
    # recorded.
    secret = "s3cret-registry-pw-7c1d"
    failure_text = "boom: cannot start"  # its output; "exited with code 3" or "restarted"
    reads_live_version = True

    def __init__(self, dockerd: Dockerd, tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.dockerd = dockerd
        self.prefix = f"cf{uuid.uuid4().hex[:10]}"
        self.name = f"{self.prefix}-api"  # the container of service api
        self.password = tmp / "registry-password"
        self.password.write_text(self.secret + "\n")
        self.since = f"{time.time() - 1:.9f}"

    def provider_settings(self, *, valid: bool = True) -> dict[str, Any]:
        return {
            "type": "docker",
            "host": self.dockerd.host if valid else "unix:///nonexistent/docker.sock",
            "poll_interval": 0.05,
            "ready_seconds": 0.3,
            "username": "deployer",
            "password_file": str(self.password),
            "registry": "registry.example:5000",
        }

    def params(self) -> dict[str, str]:
        return {"image": "app", "container": self.prefix + "-{service}"}

    def prepare(self, version: str) -> None:
        source = "app:1.0"
        if version.endswith("-fail"):
            source = "app:2.0-exits"
        elif version.endswith("-hang"):
            source = "app:2.0-slow"
        self.dockerd.api.tag(source, "app", version)

    def live_version(self) -> str | None:
        info = self.dockerd.container(self.name)
        if info is None or not info["State"]["Running"]:
            return None
        version = (info["Config"].get("Labels") or {}).get("reconciler.version")
        return str(version) if version is not None else None

    def set_live(self, version: str) -> None:
        """Someone replaced the container by hand (`docker run` with the label)."""
        self.dockerd.cli("rm", "-f", self.name)
        label = f"reconciler.version={version}"
        self.dockerd.cli("run", "-d", "--name", self.name, "--label", label, "app:1.0")

    def deployments_seen(self) -> int:
        """Containers a deployment made (every one carries the service's container label),
        from the engine's own event log."""
        events = self.dockerd.api.events(
            since=self.since,
            until=f"{time.time():.9f}",
            filters={
                "type": "container",
                "event": "create",
                "label": [f"reconciler.container={self.name}"],
            },
            decode=True,
        )
        return sum(1 for _ in events)

    def nothing_running(self) -> bool:
        return not [n for n in self.dockerd.names(self.name) if ".next-" in n]

    def close(self) -> None:
        for name in self.dockerd.names(self.name):
            with contextlib.suppress(NotFound):
                self.dockerd.api.remove_container(name, force=True)


KUBE_TOKEN = "kube-conformance-token-3e8b1f"
KUBE_REPO = "registry.local:5000/team/api"
# The fake API server's clock for progress deadlines: Deployment `api` has
# progressDeadlineSeconds 30, i.e. 0.3 s at FAIL_SCALE, so a `-fail` rollout is reported
# failed at once; at HANG_SCALE it is 30 s, so a `-hang` rollout (pods that never become
# available, like `-fail`) outlives every deadline and cancellation of the suite, as a
# rollout stuck for good does on a real cluster until its progress deadline.
FAIL_SCALE, HANG_SCALE = 0.01, 1.0


class KubernetesBackend:
    """The `kubernetes` type against tests/fake_kube.py: Deployment default/api (2 replicas,
    running 0.9 before the first deployment), the provider authenticated by a token."""

    secret = KUBE_TOKEN
    failure_text = "exceeded its progress deadline"
    reads_live_version = True

    def __init__(self, kube: FakeKube, tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.kube = kube
        kube.add_deployment("api", f"{KUBE_REPO}:0.9", replicas=2, progress_deadline=30)
        self.kubeconfig = kube.kubeconfig(tmp / "kubeconfig", token=KUBE_TOKEN)
        self.wrong = kube.kubeconfig(tmp / "kubeconfig-wrong", token="kube-wrong-token-000")

    def provider_settings(self, *, valid: bool = True) -> dict[str, Any]:
        return {
            "type": "kubernetes",
            "kubeconfig": str(self.kubeconfig if valid else self.wrong),
            "request_timeout": "5s",
        }

    def params(self) -> dict[str, str]:
        return {"container": "app", "image": KUBE_REPO}

    def prepare(self, version: str) -> None:
        self.kube.deadline_scale = HANG_SCALE if version.endswith("-hang") else FAIL_SCALE

    def live_version(self) -> str | None:
        """What the available pods serve. Not the spec: Kubernetes leaves a rollout that
        exceeded its progress deadline where it stopped, the spec on the new image while
        the old ReplicaSet keeps serving (the provider reports the failure and leaves it
        so; `on_failure: rollback` puts the spec back)."""
        serving = self.kube.serving("default", "api")
        if len(serving) != 1:  # mid-rollout, or nothing available
            return None
        return image_tag(next(iter(serving)))

    def set_live(self, version: str) -> None:
        self.kube.set_image("deployments", "default", "api", f"{KUBE_REPO}:{version}")

    def deployments_seen(self) -> int:
        return sum(1 for r in self.kube.patches() if "/deployments/api" in r[1])

    def nothing_running(self) -> bool:
        """The workload is rolled out (the image a stopped run set was put back, and the
        cluster converged on it): no pod of another version is left."""
        try:
            self.kube.wait(
                lambda: self.kube.rolled_out("deployments", "default", "api"),
                timeout=10,
                what="api rolled out",
            )
        except AssertionError:
            return False
        serving = self.kube.serving("default", "api")
        return set(serving) == {self.kube.image("deployments", "default", "api")}


ECS_CLUSTER = "prod"
ECS_REPO = "repo/api"


class EcsBackend:
    """The `ecs` type against moto, with `EcsScheduler` as ECS's deployment scheduler
    (tests/aws_support.py): cluster prod, service api (2 tasks) on repo/api:0.9. The
    credentials are the fake AWS keys of the environment (the standard chain)."""

    secret = SECRET_KEY
    failure_text = "ECS deployment circuit breaker: tasks failed to start."
    reads_live_version = True

    def __init__(self, moto: Moto, scheduler: EcsScheduler) -> None:
        self.moto, self.scheduler = moto, scheduler
        self.ecs = moto.client("ecs")
        self.ecs.create_cluster(clusterName=ECS_CLUSTER)
        self.ecs.register_task_definition(
            family="api",
            containerDefinitions=[{"name": "api", "image": f"{ECS_REPO}:0.9", "memory": 128}],
        )
        self.ecs.create_service(
            cluster=ECS_CLUSTER,
            serviceName="api",
            taskDefinition="api:1",
            desiredCount=2,
            launchType="EC2",
        )
        scheduler.settle(ECS_CLUSTER, "api")

    def provider_settings(self, *, valid: bool = True) -> dict[str, Any]:
        return {
            "type": "ecs",
            "region": REGION,
            "cluster": ECS_CLUSTER,
            "endpoint_url": self.moto.url if valid else "http://127.0.0.1:9",
            "poll_interval": 0.05,
            "max_attempts": 1,
        }

    def params(self) -> dict[str, str]:
        return {"container": "api"}

    def prepare(self, version: str) -> None:
        pass

    def _service(self) -> Any:
        return self.scheduler.service(ECS_CLUSTER, "api")

    def live_version(self) -> str | None:
        """The image tag of the service's task definition, from moto's objects (a
        DescribeServices call would move the rollouts: it is the scheduler's clock)."""
        backend = self.scheduler.backend()
        td = backend.describe_task_definition(self._service().task_definition)
        return str(td.container_definitions[0]["image"]).rsplit(":", 1)[-1]

    def _steady(self) -> bool:
        """Let ECS's scheduler run (each DescribeServices is a step) until the service has
        one deployment, completed; False if it never gets there."""
        for _ in range(20):
            svc = self.ecs.describe_services(cluster=ECS_CLUSTER, services=["api"])["services"][0]
            deployments = svc["deployments"]
            if len(deployments) == 1 and deployments[0]["rolloutState"] == "COMPLETED":
                return True
        return False

    def set_live(self, version: str) -> None:
        """Someone registered a revision and updated the service in the console."""
        td = self.ecs.register_task_definition(
            family="api",
            containerDefinitions=[{"name": "api", "image": f"{ECS_REPO}:{version}", "memory": 128}],
        )["taskDefinition"]["taskDefinitionArn"]
        self.ecs.update_service(cluster=ECS_CLUSTER, service="api", taskDefinition=td)
        assert self._steady()

    def deployments_seen(self) -> int:
        return sum(
            "has started 0 tasks: deployment" in e["message"] for e in self._service().events
        )

    def nothing_running(self) -> bool:
        return self._steady()


LAMBDA_REPO = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/api"


class LambdaBackend:
    """The `lambda` type against moto, with `LambdaUpdates` as Lambda's asynchronous code
    update (tests/aws_support.py): image function api, version 1 described 0.9, alias
    staging on it. The credentials are the fake AWS keys of the environment."""

    secret = SECRET_KEY
    failure_text = f"{LambdaUpdates.REASON_CODE} {LambdaUpdates.REASON}"
    reads_live_version = True

    def __init__(self, moto: Moto, updates: LambdaUpdates) -> None:
        self.moto, self.updates = moto, updates
        self.lam = moto.client("lambda")
        role = moto.client("iam").create_role(RoleName="api", AssumeRolePolicyDocument="{}")
        self.lam.create_function(
            FunctionName="api",
            Role=role["Role"]["Arn"],
            PackageType="Image",
            Code={"ImageUri": f"{LAMBDA_REPO}:0.9"},
        )
        first = self.lam.publish_version(FunctionName="api", Description="0.9")["Version"]
        self.lam.create_alias(FunctionName="api", Name="staging", FunctionVersion=first)
        self.started = updates.code_updates

    def provider_settings(self, *, valid: bool = True) -> dict[str, Any]:
        return {
            "type": "lambda",
            "region": REGION,
            "endpoint_url": self.moto.url if valid else "http://127.0.0.1:9",
            "poll_interval": 0.05,
            "max_attempts": 1,
        }

    def params(self) -> dict[str, str]:
        return {"image": LAMBDA_REPO}

    def prepare(self, version: str) -> None:
        pass

    def _alias(self) -> dict[str, Any]:
        got: dict[str, Any] = self.lam.get_alias(FunctionName="api", Name="staging")
        return got

    def live_version(self) -> str | None:
        version = self._alias()["FunctionVersion"]
        cfg = self.lam.get_function_configuration(FunctionName="api", Qualifier=version)
        return str(cfg["Description"]) or None

    def set_live(self, version: str) -> None:
        """Someone published a version by hand and pointed the alias at it."""
        self.lam.update_function_code(FunctionName="api", ImageUri=f"{LAMBDA_REPO}:{version}")
        new = self.lam.publish_version(FunctionName="api", Description=version)["Version"]
        self.lam.update_alias(FunctionName="api", Name="staging", FunctionVersion=new)

    def deployments_seen(self) -> int:
        return self.updates.code_updates - self.started

    def nothing_running(self) -> bool:
        """No traffic shift left on the alias. (A code update Lambda is still applying to
        $LATEST, as `-hang` leaves, cannot be stopped through any API, and serves nothing
        until a version is published and aliased.)"""
        weights = self._alias().get("RoutingConfig", {}).get("AdditionalVersionWeights", {})
        return not weights
