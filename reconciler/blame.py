"""`reconciler blame` and `GET /api/v1/blame`: who set a service's desired version.

The desired version is the one of the last valid desired state applied
(`environment_state`). The commit that set it is the oldest commit since which the
environment's file has said that version: the file's history (`git log` over it, from
the last applied commit, in the mirror) is walked back while the version stays the same,
skipping commits where the file did not parse (the environment kept its last valid state
then) and unrelated changes to the file. That commit's first sync says when the
reconciler saw it, and the deployments of the version since then which one applied it.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

from desired_state import parse_environment_file
from reconciler.source.mirror import GitSource
from reconciler.store import DeploymentRecord, Store, SyncRecord, format_time


class BlameError(Exception):
    """A blame that cannot be answered; ``code`` is the CLI's exit status (2: unknown
    environment or service, 1: nothing to answer from yet)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Blame:
    environment: str
    service: str
    version: str
    file: str
    commit: str
    author: str | None
    subject: str | None
    committed_at: str | None
    first_seen: SyncRecord | None
    applied: bool
    deployment: DeploymentRecord | None
    deployed_version: str | None
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        dep = self.deployment
        seen = self.first_seen
        return {
            "environment": self.environment,
            "service": self.service,
            "version": self.version,
            "commit": self.commit,
            "author": self.author,
            "subject": self.subject,
            "committed_at": self.committed_at,
            "file": self.file,
            "first_seen": None
            if seen is None
            else {"sync_id": seen.id, "seen_at": format_time(seen.seen_at)},
            "applied": self.applied,
            "deployment": None
            if dep is None
            else {
                "id": dep.id,
                "status": dep.status,
                "trigger": dep.trigger,
                "created_at": format_time(dep.created_at),
                "completed_at": format_time(dep.completed_at),
                "error_message": dep.error_message,
            },
            "deployed_version": self.deployed_version,
            "reason": self.reason,
        }


def _version_at(source: GitSource, sha: str, path: str, env: str, service: str) -> str | None:
    """The service's version in the file at ``sha``; "" when the file does not parse (the
    environment kept its last valid state), None when it says no version of it."""
    data = source.read_repo_file(sha, path)
    if data is None:
        return None
    spec = parse_environment_file(path, data).environment
    if spec is None:
        return ""
    if spec.environment != env or service not in spec.services:
        return None
    return spec.services[service].version


def setting_commit(
    source: GitSource, applied: str, path: str, env: str, service: str, version: str
) -> str | None:
    """The oldest commit, walking back from ``applied``, since which ``path`` has said
    ``version`` for the service (None if the file at ``applied`` does not)."""
    found: str | None = None
    for sha in source.file_commits(applied, path):
        seen = _version_at(source, sha, path, env, service)
        if seen == "":
            continue
        if seen != version:
            break
        found = sha
    return found


def blame(store: Store, source: GitSource, environment: str, service: str) -> Blame:
    """Who set the desired version of ``environment``/``service``, and what became of it."""
    states = store.environment_states()
    applied = store.last_synced_commit()
    if not states or applied is None:
        raise BlameError("no sync recorded yet: run `reconciler sync` or start the daemon")
    state = states.get(environment)
    if state is None:
        raise BlameError(
            f"unknown environment '{environment}' (known: {', '.join(sorted(states))})", code=2
        )
    services = state.spec.get("services") or {}
    if service not in services:
        raise BlameError(f"environment '{environment}' has no service '{service}'", code=2)
    version = str(services[service]["version"])
    path = posixpath.normpath(state.source_path)  # as shown: `path` may start with ./
    sha = setting_commit(source, applied, path, environment, service, version)
    if sha is None:
        raise BlameError(
            f"{path} at the applied commit {applied[:12]} does not set {service} to "
            f"{version}: the history of the file was rewritten or moved"
        )
    info = source.commit_info(sha)
    first = store.first_sync_of([sha, *source.descendants(sha, applied)])
    completed, latest = store.version_deployments(
        environment, service, version, since=first.seen_at if first else None
    )
    st = store.service_states([environment]).get((environment, service))
    deployed = st.deployed_version if st else None
    deployment, reason = completed, None
    if deployment is None and deployed == version and st and st.deployed_deployment_id:
        deployment = store.get_deployment(st.deployed_deployment_id)
        reason = "deployed before this commit was synced"
    if deployment is None:
        deployment = latest
        reason = _why_not(store, environment, state.spec, version, latest)
    return Blame(
        environment=environment,
        service=service,
        version=version,
        file=path,
        commit=info.sha,
        author=info.author,
        subject=info.subject,
        committed_at=format_time(info.authored_at),
        first_seen=first,
        applied=deployment is not None and deployment.status == "completed",
        deployment=deployment,
        deployed_version=deployed,
        reason=reason,
    )


def _why_not(
    store: Store,
    environment: str,
    spec: dict[str, Any],
    version: str,
    latest: DeploymentRecord | None,
) -> str:
    if latest is not None:
        why = f": {latest.error_message}" if latest.error_message else ""
        return f"deployment {latest.id} of {version} is {latest.status}{why}"
    if spec.get("suspended") or environment in store.suspended_environments():
        return f"{environment} is suspended"
    return f"no deployment of {version} yet (see `reconciler status` for what it waits on)"
