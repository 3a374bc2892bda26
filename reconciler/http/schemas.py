"""Pydantic models of what the HTTP API takes and returns.

They are the source of the OpenAPI document's schemas; the tests validate real responses
against them, so the document cannot drift from what the handlers send.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from reconciler.store.records import Status, Trigger

State = Literal[
    "synced",
    "out_of_sync",
    "deploying",
    "failed",
    "waiting",
    "suspended",
    "invalid",
    "drifted",
]


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProgressEvent(_Out):
    """One progress event of a deployment (SPEC §5 `progress` items)."""

    status: Status
    message: str
    percent: int | None = Field(ge=0, le=100)
    details: dict[str, Any]
    at: AwareDatetime


class Deployment(_Out):
    """A deployment record, SPEC §5."""

    id: int
    environment: str
    service: str
    version: str
    previous_version: str | None
    provider: str
    provider_type: str
    strategy: dict[str, Any]
    status: Status
    error_message: str | None
    trigger: Trigger
    commit: str | None
    commit_author: str | None
    attempt: int
    timeout_seconds: int
    validation: dict[str, Any] | None
    started_at: AwareDatetime | None
    completed_at: AwareDatetime | None
    duration_seconds: float | None


class UnconfirmedResult(_Out):
    """A terminal result a replica recorded after it had lost the environment's lease
    (docs/scaling.md): kept beside the deployment, whose status stays the new holder's."""

    replica: str
    generation: int
    status: Status
    message: str | None
    error_message: str | None
    at: AwareDatetime


class DeploymentDetail(Deployment):
    """A deployment record with its progress timeline (chronological) and the tail of its
    captured log (the whole log: `log_url`)."""

    progress: list[ProgressEvent]
    unconfirmed: list[UnconfirmedResult] | None = Field(
        default=None,
        description="Late results of a replica that had lost the lease; absent when none.",
    )
    log: str = Field(description="The last lines of the run's log (at most 200 / 64 KiB).")
    log_lines: int = Field(ge=0, description="How many lines the whole log has.")
    log_truncated: bool = Field(description="True when `log` is not the whole log.")
    log_url: str = Field(description="Where the whole log is paged: GET it with offset, limit.")


class LogLine(_Out):
    stream: Literal["stdout", "stderr", "system"]
    line: str
    at: AwareDatetime


class LogPage(_Out):
    """Lines ``offset`` .. ``offset + len(lines)`` of a run's log, in order."""

    deployment_id: int
    offset: int = Field(ge=0)
    lines: list[LogLine]
    next_offset: int | None = Field(description="The next page's offset; null at the end.")


class StatusEntry(_Out):
    """One service's state, exactly as `reconciler status --json` prints it."""

    environment: str
    service: str
    desired: str | None
    deployed: str | None
    state: State
    commit: str | None
    last_deployment_id: int | None
    message: str | None


class Error(_Out):
    error: str = Field(description="One sentence saying what is wrong.")


class Health(_Out):
    status: Literal["ok"]


class Ready(_Out):
    status: Literal["ready", "unavailable"]
    database: str = Field(description='"ok" or why the database does not answer.')
    repository: str = Field(description='"ok" or why the repository is not fetched.')
    error: str | None = Field(default=None, description="The first failing check, if any.")
    last_fetch_error: str | None = Field(
        default=None, description="The latest fetch error after a first good fetch."
    )


class SyncRequest(BaseModel):
    """Body of POST /api/v1/sync (optional): with `service`, a given-up service is retried."""

    model_config = ConfigDict(extra="forbid")

    environment: str | None = None
    service: str | None = None


class Accepted(_Out):
    status: Literal["accepted"]


_VERSION = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$"


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(
        default=None, max_length=1000, description="Kept with the operator action."
    )


class DeployRequest(_In):
    """Body of POST /api/v1/deploy: deploy a version now (trigger `manual`)."""

    environment: str = Field(min_length=1, max_length=63)
    service: str = Field(min_length=1, max_length=255)
    version: str = Field(pattern=_VERSION)


class RollbackRequest(_In):
    """Body of POST /api/v1/rollback: the previous completed version, or `to`."""

    environment: str = Field(min_length=1, max_length=63)
    service: str = Field(min_length=1, max_length=255)
    to: str | None = Field(default=None, pattern=_VERSION)


class SuspendRequest(_In):
    """Body of POST /api/v1/environments/{env}/suspend and /resume (optional)."""


class ActionAccepted(_Out):
    """The daemon accepted an operator action; deployments run on (follow them with
    GET /api/v1/deployments and their /events)."""

    status: Literal["accepted"]
    message: str
    warnings: list[str] = Field(
        description="Such as: the environment is not suspended, so git wins at the next sync."
    )


class WebhookReply(_Out):
    status: Literal["accepted", "ignored", "duplicate"]
    reason: str | None = Field(default=None, description="Why a delivery was ignored.")


class BlameSync(_Out):
    sync_id: int
    seen_at: AwareDatetime = Field(description="When that sync started.")


class BlameDeployment(_Out):
    id: int
    status: Status
    trigger: Trigger
    created_at: AwareDatetime
    completed_at: AwareDatetime | None
    error_message: str | None


class Blame(_Out):
    """Who set a service's desired version, and what became of it (as `blame --json`)."""

    environment: str
    service: str
    version: str = Field(description="The desired version (of the last valid state applied).")
    commit: str = Field(description="The oldest commit since which the file says `version`.")
    author: str | None = Field(description="`Name <email>` of that commit.")
    subject: str | None
    committed_at: AwareDatetime | None = Field(description="Its author date.")
    file: str = Field(description="The environment's file, relative to the repository.")
    first_seen: BlameSync | None = Field(
        description="The first sync that applied that commit or a later one."
    )
    applied: bool = Field(description="`deployment` completed.")
    deployment: BlameDeployment | None = Field(
        description=(
            "The first completed deployment of `version` since `first_seen` (or the one that "
            "deployed it before, see `reason`); otherwise the latest one, not completed."
        )
    )
    deployed_version: str | None
    reason: str | None = Field(description="Why it is not applied, or how it was.")


class Replica(_Out):
    """A daemon sharing the database (PostgreSQL), as its heartbeat row says."""

    id: str
    host: str
    pid: int
    state_dir: str
    version: str
    started_at: AwareDatetime
    heartbeat_at: AwareDatetime
    heartbeat_age_seconds: float = Field(description="Since its last heartbeat (database clock).")
    live: bool = Field(description="Its heartbeat is younger than `lease_ttl`.")
    leases: int = Field(ge=0, description="Environments it holds an unexpired lease on.")


class Lease(_Out):
    """Which replica may deploy an environment, until when; `generation` fences its writes."""

    environment: str
    holder: str | None
    generation: int
    expires_at: AwareDatetime
    expired: bool


class Replicas(_Out):
    """The replicas sharing the database and every environment's lease (as `status
    --replicas --json`); on SQLite (single-replica), both lists are empty."""

    replicated: bool
    lease_ttl_seconds: float
    replicas: list[Replica]
    leases: list[Lease]


RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    Blame,
    Replicas,
    Replica,
    Lease,
    UnconfirmedResult,
    ProgressEvent,
    Deployment,
    DeploymentDetail,
    LogLine,
    LogPage,
    StatusEntry,
    Error,
    Health,
    Ready,
    Accepted,
    ActionAccepted,
    WebhookReply,
)
REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    SyncRequest,
    DeployRequest,
    RollbackRequest,
    SuspendRequest,
)
