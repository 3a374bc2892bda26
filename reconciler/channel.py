"""The daemon's local control channel: JSON lines over a unix socket in the state directory.

The CLI sends one request line; the daemon answers with message lines (an acceptance,
progress, a sync outcome) and ends with `done` or `error`. One pydantic model per line,
so a malformed or foreign line is refused in one sentence, never half-understood. The
socket is mode 0600 in a 0700 directory: only the daemon's user (and root) can open it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import TypedDict  # pydantic needs it before Python 3.12

from reconciler.lock import SOCKET_NAME as SOCKET_NAME
from reconciler.plan import Decision

LINE_LIMIT = 1024 * 1024  # one message line at most (a request is far smaller)
NAME = Field(min_length=1, max_length=255)
VERSION = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
REASON = Field(default=None, max_length=1000)


class Refused(Exception):
    """An action the daemon will not carry out, worded for the operator.

    `code` is the CLI's exit status (2: unknown name, bad usage), `status` the HTTP one."""

    def __init__(self, message: str, code: int = 1, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status if status is not None else (404 if code == 2 else 409)


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- requests (CLI -> daemon) ---------------------------------------------------------


class SyncAction(_Msg):
    action: Literal["sync"] = "sync"
    environment: str | None = Field(default=None, max_length=63)
    service: str | None = Field(default=None, max_length=255)
    reason: str | None = REASON
    wait: bool = False


class DeployAction(_Msg):
    action: Literal["deploy"] = "deploy"
    environment: Annotated[str, NAME]
    version: Annotated[str, VERSION]
    services: list[Annotated[str, NAME]] | None = None  # None: every service
    reason: str | None = REASON
    wait: bool = False


class RollbackAction(_Msg):
    action: Literal["rollback"] = "rollback"
    environment: Annotated[str, NAME]
    service: Annotated[str, NAME]
    to: Annotated[str, VERSION] | None = None  # None: the previous completed version
    reason: str | None = REASON
    wait: bool = False


class SuspendAction(_Msg):
    action: Literal["suspend", "resume"]
    environment: Annotated[str, NAME]
    reason: str | None = REASON
    wait: bool = False


class StatusQuery(_Msg):
    """A read: the daemon answers from its fleet summary, records nothing, logs nothing."""

    action: Literal["status"] = "status"
    environment: str | None = Field(default=None, max_length=255)


Action = Annotated[
    SyncAction | DeployAction | RollbackAction | SuspendAction | StatusQuery,
    Field(discriminator="action"),
]
ACTION = TypeAdapter[Action](Action)


# ---- answers (daemon -> CLI) ----------------------------------------------------------


class Accepted(_Msg):
    type: Literal["accepted"] = "accepted"
    message: str
    warnings: list[str] = []


class Progress(_Msg):
    type: Literal["progress"] = "progress"
    deployment_id: int
    environment: str
    service: str
    version: str
    trigger: str
    status: str
    message: str
    percent: int | None = None


class SyncResult(_Msg):
    type: Literal["sync"] = "sync"
    sync_id: int | None
    commit: str | None
    result: str
    environments_changed: list[str] = []
    errors: list[str] = []
    message: str | None = None


class StatusEntry(TypedDict):
    """One entry of `status --json` and GET /api/v1/status (SPEC §5), in its key order.

    A TypedDict, not a model: validated into plain dicts, 20,000 of them cost ~10x less
    than as model instances (on both ends), and the CLI prints dicts anyway."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    environment: str
    service: str
    desired: str | None
    deployed: str | None
    state: str
    commit: str | None
    last_deployment_id: int | None
    message: str | None


class StatusReport(_Msg):
    """The daemon's answer to a `StatusQuery` (the only line it sends for one)."""

    type: Literal["status"] = "status"
    commit: str | None  # the commit the daemon plans from; None before its first sync
    refusal: str | None = None  # why the branch head is not applied, while it is refused
    reasons: dict[str, str | None] = {}  # the suspended environments' reasons
    services: list[StatusEntry]

    def decisions(self) -> list[Decision]:
        """The entries as the decisions the CLI's table shows (what the entries keep)."""
        return [
            Decision(
                environment=e["environment"],
                service=e["service"],
                desired=e["desired"],
                deployed=e["deployed"],
                state=e["state"],
                message=e["message"] or "",
                last_deployment_id=e["last_deployment_id"],
            )
            for e in self.services
        ]

    def entries(self) -> list[dict[str, Any]]:
        """The entries as `status --json` prints them."""
        return cast(list[dict[str, Any]], self.services)


class Done(_Msg):
    type: Literal["done"] = "done"
    deployment_ids: list[int] = []  # the deployments followed, oldest first


class Failed(_Msg):
    type: Literal["error"] = "error"
    message: str
    code: int = 1


Answer = Annotated[
    Accepted | Progress | SyncResult | StatusReport | Done | Failed, Field(discriminator="type")
]
ANSWER = TypeAdapter[Answer](Answer)


class ChannelError(Exception):
    """The channel itself failed: no daemon answers, or it spoke nonsense."""


class NotListening(ChannelError):
    """Nobody answers on the socket (yet): nothing was sent, asking again is safe."""


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


def reachable(path: Path) -> str:
    """A name for `path` that fits a unix socket address (108 bytes): the path itself, or
    the same file through an O_PATH descriptor of its folder when the path is too long.
    (The descriptor is kept open for the life of the process: one per long state dir.)"""
    if len(os.fsencode(path)) < 100:
        return str(path)
    fd = _dir_fds.get(path.parent)
    if fd is None:
        fd = _dir_fds[path.parent] = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    return f"/proc/self/fd/{fd}/{path.name}"


_dir_fds: dict[Path, int] = {}


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json().encode() + b"\n"


def parse(line: bytes, adapter: TypeAdapter[Any]) -> Any:
    """One line as its model, or ValueError with one sentence."""
    try:
        return adapter.validate_json(line)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{where + ': ' if where else ''}{first['msg']}") from None


async def ask(path: Path, request: BaseModel) -> AsyncIterator[Answer]:
    """Send one request, yield the daemon's answers until `done` or `error`."""
    import asyncio  # not at the top: `status` asks without an event loop, and starts fast

    try:
        reader, writer = await asyncio.open_unix_connection(reachable(path), limit=LINE_LIMIT)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise NotListening(f"the daemon does not answer at {path}: {exc.strerror or exc}") from None
    except PermissionError:
        raise ChannelError(
            f"only the daemon's user may use its control socket {path}: run the command as "
            "that user (sudo -u ...)"
        ) from None
    except OSError as exc:
        raise ChannelError(f"cannot reach the daemon at {path}: {exc.strerror or exc}") from None
    try:
        writer.write(encode(request))
        await writer.drain()
        while True:
            line = await reader.readline()
            if not line:
                raise ChannelError("the daemon closed the control channel before answering")
            try:
                answer: Answer = parse(line, ANSWER)
            except ValueError as exc:
                raise ChannelError(f"the daemon answered nonsense: {exc}") from None
            yield answer
            if isinstance(answer, Done | Failed | StatusReport):
                return
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


STATUS_WAIT_SECONDS = 60.0  # a daemon that has not answered by then is treated as absent


def ask_status(path: Path, query: StatusQuery) -> StatusReport | Failed:
    """`query` answered by the running daemon, blocking (no event loop: `status` is a
    reading command and starts fast). NotListening when no daemon listens, ChannelError
    when it cannot answer; a daemon too old to know the query answers Failed (bad request)."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(STATUS_WAIT_SECONDS)
        try:
            sock.connect(reachable(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NotListening(f"the daemon does not answer at {path}: {exc.strerror}") from None
        except OSError as exc:
            raise ChannelError(
                f"cannot reach the daemon at {path}: {exc.strerror or exc}"
            ) from None
        try:
            sock.sendall(encode(query))
            with sock.makefile("rb") as reader:
                line = reader.readline()
        except OSError as exc:  # a timeout too
            raise ChannelError(f"the daemon did not answer: {exc.strerror or exc}") from None
    finally:
        sock.close()
    if not line:
        raise ChannelError("the daemon closed the control channel before answering")
    try:
        answer = parse(line, ANSWER)
    except ValueError as exc:
        raise ChannelError(f"the daemon answered nonsense: {exc}") from None
    if not isinstance(answer, StatusReport | Failed):
        raise ChannelError(f"the daemon answered a status query with '{answer.type}'")
    return answer


def status_from_daemon(state_dir: Path, environment: str | None) -> StatusReport | None:
    """The running daemon's status, or None when the store must be read instead: no
    daemon listens, it cannot answer (starting, stuck, too old to know the query).
    Refused (code 2) for an environment the daemon does not know."""
    try:
        answer = ask_status(socket_path(state_dir), StatusQuery(environment=environment))
    except ChannelError:
        return None
    if isinstance(answer, StatusReport):
        return answer
    if answer.code == 2 and not answer.message.startswith("bad request"):
        raise Refused(answer.message, code=2)
    return None
