"""A small, honest stand-in for a Kubernetes API server (apps/v1), for the provider's tests.

No API server can be installed on these machines, so the tests run the real `kubernetes`
client (and the real `kubectl`) against this threaded HTTP server on 127.0.0.1. It follows
the documented API where the provider and kubectl touch it:

- discovery: ``/version`` (every field the client's models require), ``/api``, ``/apis``,
  ``/api/v1``, ``/apis/apps/v1``, ``/apis/authorization.k8s.io/v1``;
- Deployments, StatefulSets, DaemonSets, ReplicaSets: GET, LIST (label and field
  selectors), WATCH (chunked, one JSON event per line, from a resourceVersion), POST, PUT
  and PATCH (strategic-merge, merge and JSON patch) with resourceVersion preconditions
  (409 Conflict), ``metadata.generation`` bumped on spec changes, API-server defaults;
- SelfSubjectAccessReview;
- auth: anonymous (kubectl refuses to send a bearer token over plain http), or a token
  (401 without it), plus read-only tokens (403 on writes, like an RBAC Role without patch);
- a rollout controller driven by time (one step per ``tick``): Deployments get
  ReplicaSets with ``deployment.kubernetes.io/revision`` and roll by maxSurge /
  maxUnavailable; StatefulSets replace pods one at a time from the highest ordinal;
  DaemonSets one node at a time. Pods of an image whose tag ends in ``-fail`` or
  ``-hang`` never become available, and a Deployment that stops progressing gets the
  ``ProgressDeadlineExceeded`` condition after ``progressDeadlineSeconds`` multiplied by
  ``deadline_scale`` (the two differ only in how long a test lets the deadline be).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonpatch

Obj = dict[str, Any]

HASH_LABEL = "pod-template-hash"
REVISION = "deployment.kubernetes.io/revision"

# resource -> (kind, short names)
APPS: dict[str, tuple[str, list[str]]] = {
    "deployments": ("Deployment", ["deploy"]),
    "statefulsets": ("StatefulSet", ["sts"]),
    "daemonsets": ("DaemonSet", ["ds"]),
    "replicasets": ("ReplicaSet", ["rs"]),
}
WORKLOADS = ("deployments", "statefulsets", "daemonsets")

# Strategic merge: the merge key of each list the tests' patches reach (k8s.io/api tags).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "ports": "containerPort",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "conditions": "type",
}


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def image_tag(image: str) -> str:
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[colon + 1 :] if colon > slash else "latest"


def failing(image: str) -> bool:
    """Pods of this image never become available (crash-looping, or stuck pulling)."""
    return image_tag(image).endswith(("-fail", "-hang"))


def scaled(value: Any, total: int, round_up: bool) -> int:
    """intstr.GetScaledValueFromIntOrPercent."""
    if isinstance(value, str) and value.endswith("%"):
        exact = int(value[:-1]) * total / 100
        return math.ceil(exact) if round_up else math.floor(exact)
    return int(value)


def strategic_merge(target: Obj, patch: Obj) -> None:
    """Apply a strategic-merge patch (the parts kubectl and clients send for pod templates)."""
    for key, value in patch.items():
        if key.startswith("$setElementOrder/") or key in ("$retainKeys", "$patch"):
            continue
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            if value.get("$patch") == "replace":
                target[key] = _clean(value)
            else:
                strategic_merge(target[key], value)
        elif isinstance(value, list) and key in MERGE_KEYS and isinstance(target.get(key), list):
            merge_key = MERGE_KEYS[key]
            items: list[Any] = target[key]
            for item in value:
                match = next(
                    (
                        x
                        for x in items
                        if isinstance(x, dict) and x.get(merge_key) == item.get(merge_key)
                    ),
                    None,
                )
                if item.get("$patch") == "delete":
                    if match is not None:
                        items.remove(match)
                elif match is not None:
                    strategic_merge(match, item)
                else:
                    items.append(_clean(item))
        else:
            target[key] = _clean(value)


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if not k.startswith("$") and v is not None}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def template_hash(template: Obj) -> str:
    t = copy.deepcopy(template)
    t.get("metadata", {}).get("labels", {}).pop(HASH_LABEL, None)
    return hashlib.sha256(json.dumps(t, sort_keys=True).encode()).hexdigest()[:10]


def same_template(a: Obj, b: Obj) -> bool:
    return template_hash(a) == template_hash(b)


def first_image(obj: Obj) -> str:
    return str(obj["spec"]["template"]["spec"]["containers"][0]["image"])


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> Obj:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


class FakeKube:
    """The API server and its controllers. Thread-safe; start() / stop() or `with`."""

    def __init__(
        self,
        *,
        token: str | None = None,
        readonly_tokens: tuple[str, ...] = (),
        tick: float = 0.05,
        deadline_scale: float = 0.01,
        nodes: int = 3,
    ) -> None:
        self.token = token
        self.readonly_tokens = set(readonly_tokens)
        self.tick = tick
        self.deadline_scale = deadline_scale
        self.nodes = nodes
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.rv = 1000
        self.objects: dict[tuple[str, str, str], Obj] = {}
        self.events: list[tuple[int, str, str, Obj]] = []  # (rv, resource, type, object)
        self.requests: list[tuple[str, str, str]] = []  # (method, path, content type)
        self.paused = False  # the controllers stop stepping (a test freezes a rollout)
        self.watches = 0  # watch requests received so far
        self.compacted = 0  # watches from an older resourceVersion get 410 Gone (etcd compaction)
        # Called with (method, path?query) before each request is handled: a test's hook to act
        # between a client's calls (e.g. change an object between its read and its patch).
        self.before_request: Callable[[str, str], None] | None = None
        self._pods: dict[tuple[str, str, str], list[Obj]] = {}  # sts/ds pods: rev, ready
        self._progress: dict[tuple[str, str], float] = {}  # deployment: last progress time
        self._closing = threading.Event()
        fake = self

        class Handler(_Handler):
            kube = fake

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> FakeKube:
        for target in (self.server.serve_forever, self._controller_loop):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._closing.set()
        with self.lock:
            self.changed.notify_all()
        self.server.shutdown()
        self.server.server_close()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> FakeKube:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kubeconfig(self, path: Path, token: str | None = None, namespace: str = "default") -> Path:
        user: Obj = {"token": token} if token else {}
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake-user", "user": user}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "fake-user", "namespace": namespace},
                }
            ],
            "current-context": "fake",
        }
        path.write_text(json.dumps(doc, indent=1))  # JSON is YAML
        return path

    # -- objects for tests ------------------------------------------------------------

    def add_deployment(
        self,
        name: str,
        image: str,
        *,
        replicas: int = 3,
        namespace: str = "default",
        containers: tuple[str, ...] = ("app",),
        progress_deadline: int = 600,
        strategy: Obj | None = None,
    ) -> Obj:
        spec: Obj = {
            "replicas": replicas,
            "progressDeadlineSeconds": progress_deadline,
            "selector": {"matchLabels": {"app": name}},
            "template": self._template(name, image, containers),
        }
        if strategy is not None:
            spec["strategy"] = strategy
        return self._seed("deployments", namespace, name, spec)

    def add_statefulset(
        self, name: str, image: str, *, replicas: int = 3, namespace: str = "default"
    ) -> Obj:
        spec: Obj = {
            "replicas": replicas,
            "serviceName": name,
            "selector": {"matchLabels": {"app": name}},
            "template": self._template(name, image, ("app",)),
        }
        return self._seed("statefulsets", namespace, name, spec)

    def add_daemonset(self, name: str, image: str, *, namespace: str = "default") -> Obj:
        spec: Obj = {
            "selector": {"matchLabels": {"app": name}},
            "template": self._template(name, image, ("app",)),
        }
        return self._seed("daemonsets", namespace, name, spec)

    @staticmethod
    def _template(name: str, image: str, containers: tuple[str, ...]) -> Obj:
        return {
            "metadata": {"labels": {"app": name}},
            "spec": {"containers": [{"name": c, "image": image} for c in containers]},
        }

    def _seed(self, resource: str, namespace: str, name: str, spec: Obj) -> Obj:
        """Create a workload and let it roll out completely, as if it had been running."""
        body = {"metadata": {"name": name, "namespace": namespace}, "spec": spec}
        with self.lock:
            self.create(resource, namespace, body)
        self.wait(lambda: self.rolled_out(resource, namespace, name), what=f"{name} rolled out")
        return self.get(resource, namespace, name)

    def get(self, resource: str, namespace: str, name: str) -> Obj:
        with self.lock:
            return copy.deepcopy(self.objects[(resource, namespace, name)])

    def image(self, resource: str, namespace: str, name: str, container: int = 0) -> str:
        obj = self.get(resource, namespace, name)
        return str(obj["spec"]["template"]["spec"]["containers"][container]["image"])

    def set_image(self, resource: str, namespace: str, name: str, image: str) -> None:
        """An out-of-band change (someone ran `kubectl set image`)."""
        with self.lock:
            obj = copy.deepcopy(self.objects[(resource, namespace, name)])
            obj["spec"]["template"]["spec"]["containers"][0]["image"] = image
            self._store(resource, obj, "MODIFIED", spec_changed=True)

    def set_label(self, resource: str, namespace: str, name: str, key: str, value: str) -> None:
        """A metadata-only change (new resourceVersion, same generation)."""
        with self.lock:
            obj = copy.deepcopy(self.objects[(resource, namespace, name)])
            obj["metadata"].setdefault("labels", {})[key] = value
            self._store(resource, obj, "MODIFIED")

    def delete(self, resource: str, namespace: str, name: str) -> None:
        with self.lock:
            obj = copy.deepcopy(self.objects[(resource, namespace, name)])
            self._store(resource, obj, "DELETED")

    def compact(self) -> None:
        """Forget the history so far, as etcd compaction does: older watches get 410."""
        with self.lock:
            self._next_rv()  # other writes happened since, and their history is gone too
            self.compacted = self.rv

    def objects_of(self, resource: str) -> list[Obj]:
        with self.lock:
            return [
                copy.deepcopy(o) for (r, _, _), o in sorted(self.objects.items()) if r == resource
            ]

    def serving(self, namespace: str, name: str) -> dict[str, int]:
        """Available pods of a Deployment per image: what actually serves traffic."""
        with self.lock:
            out: dict[str, int] = {}
            for rs in self._owned(namespace, name):
                n = int(rs.get("status", {}).get("availableReplicas", 0))
                if n:
                    out[first_image(rs)] = out.get(first_image(rs), 0) + n
            return out

    def rolled_out(self, resource: str, namespace: str, name: str) -> bool:
        with self.lock:
            obj = self.objects.get((resource, namespace, name))
            if obj is None:
                return False
            st = obj.get("status", {})
            if st.get("observedGeneration", 0) < obj["metadata"]["generation"]:
                return False
            if resource == "deployments":
                want = obj["spec"]["replicas"]
                return bool(
                    st.get("updatedReplicas", 0) == want
                    and st.get("replicas", 0) == want
                    and st.get("availableReplicas", 0) == want
                )
            if resource == "statefulsets":
                return bool(
                    st.get("updatedReplicas", 0) == obj["spec"]["replicas"]
                    and st.get("readyReplicas", 0) == obj["spec"]["replicas"]
                )
            return bool(
                st.get("updatedNumberScheduled", 0) == self.nodes
                and st.get("numberAvailable", 0) == self.nodes
            )

    def patches(self) -> list[tuple[str, str, str]]:
        with self.lock:
            return [
                r
                for r in self.requests
                if r[0] in ("PATCH", "PUT", "POST") and "selfsubjectaccessreviews" not in r[1]
            ]

    def wait(self, predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"fake kube: timed out waiting for {what or predicate}")
                self.changed.wait(left)

    # -- the store ----------------------------------------------------------------------

    def _next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    def _store(self, resource: str, obj: Obj, event: str, *, spec_changed: bool = False) -> Obj:
        meta = obj["metadata"]
        if spec_changed:
            meta["generation"] = int(meta.get("generation", 1)) + 1
        meta["resourceVersion"] = self._next_rv()
        key = (resource, meta["namespace"], meta["name"])
        if event == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        self.events.append((self.rv, resource, event, copy.deepcopy(obj)))
        self.changed.notify_all()
        return obj

    def create(self, resource: str, namespace: str, body: Obj) -> Obj:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        name = meta.get("name")
        if not name:
            raise ApiError(
                422, "Invalid", f"{resource}.apps is invalid: metadata.name: Required value"
            )
        if (resource, namespace, name) in self.objects:
            raise ApiError(409, "AlreadyExists", f'{resource}.apps "{name}" already exists')
        obj["apiVersion"] = "apps/v1"
        obj["kind"] = APPS[resource][0]
        meta.update(
            namespace=namespace,
            uid=str(uuid.uuid4()),
            generation=1,
            creationTimestamp=now_iso(),
        )
        meta.setdefault("labels", {})
        meta.setdefault("annotations", {})
        self._defaults(resource, obj)
        obj["status"] = (
            {"replicas": 0}
            if resource == "statefulsets"
            else {
                "currentNumberScheduled": 0,
                "desiredNumberScheduled": 0,
                "numberMisscheduled": 0,
                "numberReady": 0,
            }
            if resource == "daemonsets"
            else {}
        )
        return self._store(resource, obj, "ADDED")

    @staticmethod
    def _defaults(resource: str, obj: Obj) -> None:
        """What the API server's defaulting adds (so clients see complete objects)."""
        spec = obj.setdefault("spec", {})
        spec.setdefault("revisionHistoryLimit", 10)
        pod = spec.setdefault("template", {}).setdefault("spec", {})
        pod.setdefault("restartPolicy", "Always")
        pod.setdefault("terminationGracePeriodSeconds", 30)
        pod.setdefault("dnsPolicy", "ClusterFirst")
        pod.setdefault("schedulerName", "default-scheduler")
        pod.setdefault("securityContext", {})
        for c in pod.get("containers", []):
            c.setdefault("resources", {})
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            c.setdefault("terminationMessagePolicy", "File")
            c.setdefault(
                "imagePullPolicy",
                "Always" if image_tag(c.get("image", "")) == "latest" else "IfNotPresent",
            )
        if resource in ("deployments", "statefulsets", "replicasets"):
            spec.setdefault("replicas", 1)
        if resource == "deployments":
            spec.setdefault("progressDeadlineSeconds", 600)
            strategy = spec.setdefault("strategy", {"type": "RollingUpdate"})
            if strategy.get("type", "RollingUpdate") == "RollingUpdate":
                strategy["type"] = "RollingUpdate"
                ru = strategy.setdefault("rollingUpdate", {})
                ru.setdefault("maxSurge", "25%")
                ru.setdefault("maxUnavailable", "25%")
        elif resource == "statefulsets":
            spec.setdefault("podManagementPolicy", "OrderedReady")
            us = spec.setdefault("updateStrategy", {"type": "RollingUpdate"})
            if us.get("type", "RollingUpdate") == "RollingUpdate":
                us["type"] = "RollingUpdate"
                us.setdefault("rollingUpdate", {}).setdefault("partition", 0)
        elif resource == "daemonsets":
            us = spec.setdefault("updateStrategy", {"type": "RollingUpdate"})
            if us.get("type", "RollingUpdate") == "RollingUpdate":
                us["type"] = "RollingUpdate"
                ru = us.setdefault("rollingUpdate", {})
                ru.setdefault("maxUnavailable", 1)
                ru.setdefault("maxSurge", 0)

    def _current(self, resource: str, namespace: str, name: str) -> Obj:
        obj = self.objects.get((resource, namespace, name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{resource}.apps "{name}" not found')
        return obj

    def update(self, resource: str, namespace: str, name: str, new: Obj, check_rv: bool) -> Obj:
        """Store a patched or replaced object: preconditions, immutables, generation."""
        cur = self._current(resource, namespace, name)
        meta = new.setdefault("metadata", {})
        rv = meta.get("resourceVersion")
        if check_rv and rv and rv != cur["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {resource}.apps "{name}": the object has '
                "been modified; please apply your changes to the latest version and try again",
            )
        for key in ("name", "namespace", "uid", "creationTimestamp", "generation"):
            meta[key] = cur["metadata"][key]
        new["status"] = cur.get("status", {})
        new["apiVersion"], new["kind"] = cur["apiVersion"], cur["kind"]
        self._defaults(resource, new)
        changed = new["spec"] != cur["spec"]
        if new == cur:
            return cur
        return self._store(resource, new, "MODIFIED", spec_changed=changed)

    def patch(self, resource: str, namespace: str, name: str, content_type: str, body: Any) -> Obj:
        cur = copy.deepcopy(self._current(resource, namespace, name))
        if content_type == "application/strategic-merge-patch+json":
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "strategic merge patch must be an object")
            strategic_merge(cur, body)
            new = cur
        elif content_type == "application/merge-patch+json":
            new = merge_patch(cur, body)
        elif content_type == "application/json-patch+json":
            try:
                new = jsonpatch.apply_patch(cur, body)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise ApiError(422, "Invalid", f"the server rejected our request: {exc}") from None
        else:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml ({content_type})",
            )
        return self.update(resource, namespace, name, new, check_rv=True)

    def select(self, resource: str, namespace: str | None, query: dict[str, str]) -> list[Obj]:
        return [
            obj
            for (res, ns, _), obj in sorted(self.objects.items())
            if res == resource and (namespace is None or ns == namespace) and _matches(obj, query)
        ]

    # -- controllers --------------------------------------------------------------------

    def _controller_loop(self) -> None:
        while not self._closing.wait(self.tick):
            with self.lock:
                if self.paused:
                    continue
                for (resource, ns, name), obj in list(self.objects.items()):
                    if resource == "deployments":
                        self._step_deployment(ns, name, obj)
                    elif resource == "statefulsets":
                        self._step_statefulset(ns, name, obj)
                    elif resource == "daemonsets":
                        self._step_daemonset(ns, name, obj)

    def _owned(self, namespace: str, name: str) -> list[Obj]:
        owner = self.objects.get(("deployments", namespace, name))
        if owner is None:
            return []
        uid = owner["metadata"]["uid"]
        return [
            rs
            for (res, ns, _), rs in self.objects.items()
            if res == "replicasets"
            and ns == namespace
            and any(
                r.get("uid") == uid and r.get("controller")
                for r in rs["metadata"].get("ownerReferences", [])
            )
        ]

    def _step_deployment(self, ns: str, name: str, d: Obj) -> None:
        spec, st, meta = d["spec"], copy.deepcopy(d.get("status", {})), d["metadata"]
        desired = int(spec["replicas"])
        key = (ns, name)
        rss = self._owned(ns, name)
        new_rs = next(
            (rs for rs in rss if same_template(rs["spec"]["template"], spec["template"])), None
        )
        now = time.monotonic()
        touched: list[Obj] = []
        new_meta = copy.deepcopy(meta)
        if st.get("observedGeneration", 0) < meta["generation"]:
            top = max(
                (int(rs["metadata"]["annotations"].get(REVISION, "0")) for rs in rss), default=0
            )
            if new_rs is None:
                h = template_hash(spec["template"])
                template = copy.deepcopy(spec["template"])
                template["metadata"].setdefault("labels", {})[HASH_LABEL] = h
                new_rs = {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "metadata": {
                        "name": f"{name}-{h}",
                        "namespace": ns,
                        "uid": str(uuid.uuid4()),
                        "generation": 1,
                        "creationTimestamp": now_iso(),
                        "labels": {**template["metadata"]["labels"]},
                        "annotations": {REVISION: str(top + 1)},
                        "ownerReferences": [
                            {
                                "apiVersion": "apps/v1",
                                "kind": "Deployment",
                                "name": name,
                                "uid": meta["uid"],
                                "controller": True,
                                "blockOwnerDeletion": True,
                            }
                        ],
                    },
                    "spec": {
                        "replicas": 0,
                        "selector": {
                            "matchLabels": {**spec["selector"]["matchLabels"], HASH_LABEL: h}
                        },
                        "template": template,
                    },
                    "status": {"replicas": 0, "availableReplicas": 0, "readyReplicas": 0},
                }
                reason, message = "NewReplicaSetCreated", f'Created new replica set "{name}-{h}"'
                touched.append(new_rs)
            else:
                if int(new_rs["metadata"]["annotations"].get(REVISION, "0")) != top:
                    new_rs["metadata"]["annotations"][REVISION] = str(top + 1)
                    touched.append(new_rs)
                reason, message = (
                    "FoundNewReplicaSet",
                    f'Found new replica set "{new_rs["metadata"]["name"]}"',
                )
            new_meta.setdefault("annotations", {})[REVISION] = new_rs["metadata"]["annotations"][
                REVISION
            ]
            st["observedGeneration"] = meta["generation"]
            _set_condition(st, "Progressing", "True", reason, message)
            self._progress[key] = now
        if new_rs is None:  # its template has no ReplicaSet yet and is not observed
            return
        olds = [rs for rs in rss if rs is not new_rs]
        everything = [new_rs, *olds]
        progressed = False
        # Pods created at the previous step become available now (unless their image fails).
        for rs in everything:
            rst = rs.setdefault("status", {})
            created, avail = int(rst.get("replicas", 0)), int(rst.get("availableReplicas", 0))
            if avail < created and not failing(first_image(rs)):
                rst["availableReplicas"] = rst["readyReplicas"] = created
                touched.append(rs)
                progressed = True
        if not spec.get("paused"):
            strategy = spec.get("strategy", {})
            if strategy.get("type") == "Recreate":
                if any(rs["spec"]["replicas"] for rs in olds):
                    for rs in olds:
                        if rs["spec"]["replicas"]:
                            rs["spec"]["replicas"] = 0
                            touched.append(rs)
                elif new_rs["spec"]["replicas"] != desired:
                    new_rs["spec"]["replicas"] = desired
                    touched.append(new_rs)
            else:
                ru = strategy.get("rollingUpdate", {})
                surge = scaled(ru.get("maxSurge", "25%"), desired, True)
                unavailable = scaled(ru.get("maxUnavailable", "25%"), desired, False)
                if surge == 0 and unavailable == 0:
                    unavailable = 1
                total = sum(int(rs["spec"]["replicas"]) for rs in everything)
                if new_rs["spec"]["replicas"] < desired:
                    grow = min(desired - new_rs["spec"]["replicas"], desired + surge - total)
                    if grow > 0:
                        new_rs["spec"]["replicas"] += grow
                        touched.append(new_rs)
                elif new_rs["spec"]["replicas"] > desired:
                    new_rs["spec"]["replicas"] = desired
                    touched.append(new_rs)
                # reconcileOldReplicaSets: unhealthy old pods first, then available ones
                all_pods = sum(int(rs["spec"]["replicas"]) for rs in everything)
                min_available = desired - unavailable
                new_unavailable = new_rs["spec"]["replicas"] - int(
                    new_rs["status"].get("availableReplicas", 0)
                )
                budget = all_pods - min_available - new_unavailable
                for rs in olds:
                    if budget <= 0:
                        break
                    unhealthy = rs["spec"]["replicas"] - int(
                        rs["status"].get("availableReplicas", 0)
                    )
                    cut = min(budget, max(unhealthy, 0))
                    if cut:
                        rs["spec"]["replicas"] -= cut
                        budget -= cut
                        touched.append(rs)
                available = sum(int(rs["status"].get("availableReplicas", 0)) for rs in everything)
                room = min(budget, available - min_available)
                for rs in olds:
                    if room <= 0:
                        break
                    cut = min(room, rs["spec"]["replicas"])
                    if cut:
                        rs["spec"]["replicas"] -= cut
                        room -= cut
                        touched.append(rs)
        # Pods follow the ReplicaSets' spec (created now, available at the next step).
        for rs in everything:
            rst = rs["status"]
            if rst.get("replicas", 0) != rs["spec"]["replicas"]:
                rst["replicas"] = rs["spec"]["replicas"]
                rst["availableReplicas"] = rst["readyReplicas"] = min(
                    int(rst.get("availableReplicas", 0)), rs["spec"]["replicas"]
                )
                touched.append(rs)
                progressed = True
        for rs in {id(r): r for r in touched}.values():
            rs["status"]["observedGeneration"] = rs["metadata"].get("generation", 1)
            rs["status"]["fullyLabeledReplicas"] = rs["status"]["replicas"]
            self._store("replicasets", rs, "MODIFIED" if any(rs is r for r in rss) else "ADDED")
        replicas = sum(int(rs["status"].get("replicas", 0)) for rs in everything)
        available = sum(int(rs["status"].get("availableReplicas", 0)) for rs in everything)
        updated = int(new_rs["status"].get("replicas", 0))
        st.update(
            replicas=replicas,
            updatedReplicas=updated,
            readyReplicas=available,
            availableReplicas=available,
        )
        if replicas - available > 0:
            st["unavailableReplicas"] = replicas - available
        else:
            st.pop("unavailableReplicas", None)
        ru = spec.get("strategy", {}).get("rollingUpdate", {})
        min_ok = desired - scaled(ru.get("maxUnavailable", 0), desired, False)
        if available >= min_ok:
            _set_condition(
                st,
                "Available",
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.",
            )
        else:
            _set_condition(
                st,
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
            )
        rs_name = new_rs["metadata"]["name"]
        if updated == desired and replicas == desired and available == desired:
            _set_condition(
                st,
                "Progressing",
                "True",
                "NewReplicaSetAvailable",
                f'ReplicaSet "{rs_name}" has successfully progressed.',
            )
        elif progressed:
            self._progress[key] = now
            _set_condition(
                st,
                "Progressing",
                "True",
                "ReplicaSetUpdated",
                f'ReplicaSet "{rs_name}" is progressing.',
            )
        elif (
            now - self._progress.get(key, now)
            > spec["progressDeadlineSeconds"] * self.deadline_scale
        ):
            _set_condition(
                st,
                "Progressing",
                "False",
                "ProgressDeadlineExceeded",
                f'ReplicaSet "{rs_name}" has timed out progressing.',
            )
        if st != d.get("status") or new_meta != meta:
            new = {**d, "metadata": new_meta, "status": st}
            self._store("deployments", new, "MODIFIED")

    def _pod_set(self, resource: str, ns: str, name: str, count: int, rev: str) -> list[Obj]:
        pods = self._pods.setdefault((resource, ns, name), [])
        while len(pods) < count:
            pods.append({"rev": rev, "ready": True})
        del pods[count:]
        return pods

    def _step_statefulset(self, ns: str, name: str, s: Obj) -> None:
        spec, st = s["spec"], copy.deepcopy(s["status"])
        update_rev = f"{name}-{template_hash(spec['template'])}"
        image = spec["template"]["spec"]["containers"][0]["image"]
        first = "currentRevision" not in st
        st["observedGeneration"] = s["metadata"]["generation"]
        st["updateRevision"] = update_rev
        current_rev = st.setdefault("currentRevision", update_rev)
        pods = self._pod_set("statefulsets", ns, name, int(spec["replicas"]), current_rev)
        ok = not failing(image)
        for i, p in enumerate(pods):  # pods created or replaced at the previous step start now
            if not p["ready"] and p["rev"] != update_rev:  # a broken pod of a reverted template
                pods[i] = {"rev": update_rev, "ready": False}
            elif not p["ready"] and ok:
                p["ready"] = True
        partition = int(spec["updateStrategy"].get("rollingUpdate", {}).get("partition", 0))
        if all(p["ready"] for p in pods):
            for ordinal in range(len(pods) - 1, partition - 1, -1):
                if pods[ordinal]["rev"] != update_rev:
                    pods[ordinal] = {"rev": update_rev, "ready": False}
                    break
        updated = sum(p["rev"] == update_rev for p in pods)
        ready = sum(p["ready"] for p in pods)
        if (updated == len(pods) and ready == len(pods)) or first:
            st["currentRevision"] = update_rev
        st.update(
            replicas=len(pods),
            readyReplicas=ready,
            availableReplicas=ready,
            updatedReplicas=updated,
            currentReplicas=sum(p["rev"] == st["currentRevision"] for p in pods),
        )
        if st != s["status"]:
            self._store("statefulsets", {**s, "status": st}, "MODIFIED")

    def _step_daemonset(self, ns: str, name: str, d: Obj) -> None:
        spec, st = d["spec"], copy.deepcopy(d["status"])
        rev = template_hash(spec["template"])
        image = spec["template"]["spec"]["containers"][0]["image"]
        st["observedGeneration"] = d["metadata"]["generation"]
        pods = self._pod_set("daemonsets", ns, name, self.nodes, rev)
        for i, p in enumerate(pods):
            if not p["ready"] and p["rev"] != rev:
                pods[i] = {"rev": rev, "ready": False}
            elif not p["ready"] and not failing(image):
                p["ready"] = True
        max_unavailable = scaled(
            spec["updateStrategy"].get("rollingUpdate", {}).get("maxUnavailable", 1),
            self.nodes,
            True,
        )
        unavailable = sum(not p["ready"] for p in pods)
        for i, p in enumerate(pods):
            if unavailable >= max_unavailable:
                break
            if p["rev"] != rev:
                pods[i] = {"rev": rev, "ready": False}
                unavailable += 1
        ready = sum(p["ready"] for p in pods)
        st.update(
            desiredNumberScheduled=self.nodes,
            currentNumberScheduled=self.nodes,
            numberMisscheduled=0,
            numberReady=ready,
            numberAvailable=ready,
            updatedNumberScheduled=sum(p["rev"] == rev for p in pods),
        )
        if self.nodes - ready:
            st["numberUnavailable"] = self.nodes - ready
        else:
            st.pop("numberUnavailable", None)
        if st != d["status"]:
            self._store("daemonsets", {**d, "status": st}, "MODIFIED")


def _set_condition(status: Obj, kind: str, value: str, reason: str, message: str) -> None:
    conds: list[Obj] = status.setdefault("conditions", [])
    now = now_iso()
    for c in conds:
        if c["type"] == kind:
            if (c["status"], c["reason"], c["message"]) != (value, reason, message):
                if c["status"] != value:
                    c["lastTransitionTime"] = now
                c.update(status=value, reason=reason, message=message, lastUpdateTime=now)
            return
    conds.append(
        {
            "type": kind,
            "status": value,
            "reason": reason,
            "message": message,
            "lastUpdateTime": now,
            "lastTransitionTime": now,
        }
    )


def _matches(obj: Obj, query: dict[str, str]) -> bool:
    labels = obj["metadata"].get("labels", {})
    for term in filter(None, query.get("labelSelector", "").split(",")):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.split("=", 1)
            if labels.get(k) != v.lstrip("="):
                return False
        elif labels.get(term) is None:
            return False
    for term in filter(None, query.get("fieldSelector", "").split(",")):
        k, _, v = term.partition("=")
        v = v.lstrip("=")
        field = {
            "metadata.name": obj["metadata"]["name"],
            "metadata.namespace": obj["metadata"]["namespace"],
        }.get(k)
        if field != v:
            return False
    return True


# -- HTTP ---------------------------------------------------------------------------------

VERSION = {
    "major": "1",
    "minor": "32",
    "emulationMajor": "1",
    "emulationMinor": "32",
    "minCompatibilityMajor": "1",
    "minCompatibilityMinor": "31",
    "gitVersion": "v1.32.4",
    "gitCommit": "59526cd4867447956156ae3a602fcbac10a2c335",
    "gitTreeState": "clean",
    "buildDate": "2025-04-22T16:02:27Z",
    "goVersion": "go1.23.6",
    "compiler": "gc",
    "platform": "linux/amd64",
}
ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


def _resource_list() -> Obj:
    resources: list[Obj] = []
    for name, (kind, short) in APPS.items():
        resources.append(
            {
                "name": name,
                "singularName": kind.lower(),
                "namespaced": True,
                "kind": kind,
                "verbs": ALL_VERBS,
                "shortNames": short,
                "categories": ["all"],
            }
        )
        resources.append(
            {
                "name": f"{name}/status",
                "singularName": "",
                "namespaced": True,
                "kind": kind,
                "verbs": ["get", "patch", "update"],
            }
        )
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": "apps/v1",
        "resources": resources,
    }


DISCOVERY: dict[str, Obj] = {
    "/version": VERSION,
    "/api": {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}
        ],
    },
    "/apis": {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [
            {
                "name": g,
                "versions": [{"groupVersion": f"{g}/v1", "version": "v1"}],
                "preferredVersion": {"groupVersion": f"{g}/v1", "version": "v1"},
            }
            for g in ("apps", "authorization.k8s.io")
        ],
    },
    "/api/v1": {
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            {
                "name": "namespaces",
                "singularName": "namespace",
                "namespaced": False,
                "kind": "Namespace",
                "verbs": ["get", "list"],
                "shortNames": ["ns"],
            },
        ],
    },
    "/apis/apps/v1": _resource_list(),
    "/apis/authorization.k8s.io/v1": {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": "authorization.k8s.io/v1",
        "resources": [
            {
                "name": "selfsubjectaccessreviews",
                "singularName": "selfsubjectaccessreview",
                "namespaced": False,
                "kind": "SelfSubjectAccessReview",
                "verbs": ["create"],
            },
        ],
    },
}


class _Handler(BaseHTTPRequestHandler):
    kube: FakeKube
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms stalls

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, code: int, body: Obj) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        try:
            return json.loads(self.raw_body or b"null")
        except ValueError:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types include: application/json",
            ) from None

    def _auth(self, verb: str, resource: str, name: str, namespace: str | None) -> None:
        kube = self.kube
        if kube.token is None:
            return
        header = self.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else None
        if token != kube.token and token not in kube.readonly_tokens:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        if token in kube.readonly_tokens and verb not in ("get", "list", "watch"):
            where = f' in the namespace "{namespace}"' if namespace else ""
            raise ApiError(
                403,
                "Forbidden",
                f'{resource}.apps "{name}" is forbidden: User "system:serviceaccount:ci:reader" '
                f'cannot {verb} resource "{resource}" in API group "apps"{where}',
            )

    def _allowed(self, verb: str) -> bool:
        kube = self.kube
        if kube.token is None:
            return True
        token = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        return token == kube.token or (
            token in kube.readonly_tokens and verb in ("get", "list", "watch")
        )

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip()
        kube = self.kube
        length = int(self.headers.get("Content-Length") or 0)
        self.raw_body = self.rfile.read(length) if length else b""  # read even when refused
        with kube.lock:
            kube.requests.append((method, url.path, ctype))
        if kube.before_request is not None:
            kube.before_request(method, self.path)  # the path with its query
        try:
            self._route(method, url.path.rstrip("/") or "/", query, ctype)
        except ApiError as exc:
            self._send(exc.code, exc.status())
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _route(self, method: str, path: str, query: dict[str, str], ctype: str) -> None:
        kube = self.kube
        parts = path.strip("/").split("/")
        if path in DISCOVERY and method == "GET":
            self._auth("get", "", "", None)
            self._send(200, DISCOVERY[path])
            return
        if path == "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews" and method == "POST":
            self._auth("get", "selfsubjectaccessreviews", "", None)  # every identity may ask
            body = self._body()
            attrs = body.get("spec", {}).get("resourceAttributes", {})
            allowed = self._allowed(attrs.get("verb", ""))
            body["status"] = {"allowed": allowed}
            if not allowed:
                body["status"]["reason"] = "no RBAC policy matched"
            self._send(201, body)
            return
        if parts[:2] == ["api", "v1"] and len(parts) == 4 and parts[2] == "namespaces":
            self._auth("get", "namespaces", parts[3], None)
            self._send(
                200,
                {
                    "kind": "Namespace",
                    "apiVersion": "v1",
                    "metadata": {"name": parts[3]},
                    "spec": {"finalizers": ["kubernetes"]},
                    "status": {"phase": "Active"},
                },
            )
            return
        # /apis/apps/v1[/namespaces/NS]/RESOURCE[/NAME[/SUB]]
        if parts[:3] != ["apis", "apps", "v1"]:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        rest = parts[3:]
        namespace: str | None = None
        if len(rest) >= 2 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest or rest[0] not in APPS:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        resource, name = rest[0], (rest[1] if len(rest) > 1 else "")
        sub = rest[2] if len(rest) > 2 else ""
        if sub and sub != "status":
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        watching = query.get("watch") in ("true", "1")
        verb = {
            "GET": "watch" if watching else ("get" if name else "list"),
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
        }[method]
        self._auth(verb, resource, name, namespace)
        if watching:
            self._watch(resource, namespace, query)
            return
        with kube.lock:
            if method == "GET" and name:
                assert namespace is not None
                self._send(200, copy.deepcopy(kube._current(resource, namespace, name)))
            elif method == "GET":
                items = copy.deepcopy(kube.select(resource, namespace, query))
                self._send(
                    200,
                    {
                        "kind": APPS[resource][0] + "List",
                        "apiVersion": "apps/v1",
                        "metadata": {"resourceVersion": str(kube.rv)},
                        "items": items,
                    },
                )
            elif method == "POST" and not name and namespace:
                if ctype != "application/json":
                    raise ApiError(
                        415,
                        "UnsupportedMediaType",
                        f"the body of the request was in an unknown format - accepted media types include: application/json, application/yaml ({ctype})",
                    )
                self._send(201, copy.deepcopy(kube.create(resource, namespace, self._body())))
            elif method == "PUT" and name and namespace:
                self._send(
                    200,
                    copy.deepcopy(
                        kube.update(resource, namespace, name, self._body(), check_rv=True)
                    ),
                )
            elif method == "PATCH" and name and namespace:
                self._send(
                    200, copy.deepcopy(kube.patch(resource, namespace, name, ctype, self._body()))
                )
            else:
                raise ApiError(
                    405,
                    "MethodNotAllowed",
                    f"the server does not allow this method on the requested resource ({method})",
                )

    def _client_gone(self) -> bool:
        readable, _, _ = select.select([self.connection], [], [], 0)
        return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)

    def _watch(self, resource: str, namespace: str | None, query: dict[str, str]) -> None:
        kube = self.kube
        timeout = float(query.get("timeoutSeconds") or 1800)
        end = time.monotonic() + timeout
        since = query.get("resourceVersion", "")
        with kube.lock:
            if since in ("", "0"):  # legacy semantics: start with the current objects
                backlog = [
                    (kube.rv, "ADDED", copy.deepcopy(o))
                    for o in kube.select(resource, namespace, query)
                ]
                cursor = kube.rv
            else:
                cursor = int(since)
                backlog = []
                if cursor < kube.compacted:
                    gone = ApiError(
                        410, "Expired", f"too old resource version: {cursor} ({kube.compacted})"
                    )
                    backlog = [(kube.rv, "ERROR", gone.status())]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        with kube.lock:
            kube.watches += 1
            kube.changed.notify_all()
        try:
            for _, kind, obj in backlog:
                chunk(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
            expired = any(kind == "ERROR" for _, kind, _ in backlog)
            while not expired and not kube._closing.is_set():
                with kube.lock:
                    fresh = [
                        (rv, kind, obj)
                        for rv, res, kind, obj in _after(kube.events, cursor)
                        if res == resource
                        and (namespace is None or obj["metadata"]["namespace"] == namespace)
                        and _matches(obj, query)
                    ]
                    cursor = kube.rv
                    if not fresh:
                        left = end - time.monotonic()
                        if left <= 0:
                            break
                        kube.changed.wait(min(left, 0.5))
                        if self._client_gone():
                            break
                        continue
                for _, kind, obj in fresh:
                    chunk(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
            chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True


def _after(
    events: list[tuple[int, str, str, Obj]], cursor: int
) -> Iterator[tuple[int, str, str, Obj]]:
    """Events with a resourceVersion greater than cursor (the list is in rv order)."""
    lo, hi = 0, len(events)
    while lo < hi:
        mid = (lo + hi) // 2
        if events[mid][0] <= cursor:
            lo = mid + 1
        else:
            hi = mid
    return iter(events[lo:])
