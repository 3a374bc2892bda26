"""What the hosted-platform providers (vercel, netlify, railway) share: settings, one HTTP
client with the retry discipline, the follow-the-state loop and cancel-on-exit.

HTTP discipline (one place, so the three platforms cannot drift apart):

* every call has a timeout: `request_timeout`, never past the run's deadline;
* 429 and 5xx are retried, waiting what `Retry-After` asks (else a capped backoff), only
  while the wait still ends before the deadline; otherwise the platform's answer is the error;
* a create that is not idempotent is never sent twice blindly: when its outcome is unknown
  (a 5xx, a connection lost after sending) the caller's `lookup` looks for what it may have
  created first, and only if nothing is found is the create sent again;
* the token travels only in a header; it is registered as a secret, so the executor
  redacts it from every log line, progress message and error it records.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import certifi
import httpx

from desired_state import parse_duration
from reconciler.config import ProviderConfig
from reconciler.providers.base import Check, DeployContext, DeploymentFailed, Provider

BACKOFF_FIRST, BACKOFF_MAX = 0.5, 10.0
# In a run the client's own limit is a little past the run's deadline, so that reaching the
# deadline is always the executor's cancellation (recorded `timed_out`), never a client error.
DEADLINE_MARGIN = 0.5


class ApiError(Exception):
    """A platform refused a call, or could not be reached; the text is the platform's own."""

    def __init__(self, message: str, status: int | None = None, *, reached: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.reached = reached  # False: no answer from the platform (endpoint down, wrong URL)


Lookup = Callable[[], Awaitable[Any]]
LogLine = Callable[[str], None]


def _error_text(resp: httpx.Response) -> str:
    """The platform's own error text: Vercel {"error": {"message"}}, Netlify {"message"}."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    text = ""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            text = str(err.get("message") or err.get("code") or "")
        elif isinstance(err, str):
            text = err
        text = text or str(body.get("message") or body.get("errorMessage") or "")
    if not text:
        text = resp.text.strip()[:300] or resp.reason_phrase
    return f"HTTP {resp.status_code}: {text}"


def retry_after(resp: httpx.Response, attempt: int) -> float:
    """Seconds to wait before retrying: the `Retry-After` header (seconds or an HTTP date),
    else an exponential backoff."""
    value = resp.headers.get("retry-after")
    if value:
        value = value.strip()
        try:
            return max(0.0, float(value))
        except ValueError:
            with contextlib.suppress(TypeError, ValueError):
                when = email.utils.parsedate_to_datetime(value)
                return max(0.0, when.timestamp() - time.time())
    return backoff(attempt)


def backoff(attempt: int) -> float:
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2.0**attempt)


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for every client: building one reads the CA bundle (~0.3 s)."""
    return ssl.create_default_context(cafile=certifi.where())


class ApiClient:
    """An httpx client bound to a platform's base URL and credentials."""

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        request_timeout: float,
        *,
        deadline: float,
        log: LogLine | None = None,
    ) -> None:
        self.http = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/", headers=dict(headers), verify=_tls()
        )
        self.request_timeout = request_timeout
        self.deadline = deadline  # time.monotonic(): no call or retry wait goes past it
        self.log = log

    def extend(self, seconds: float) -> None:
        """A new time budget: cleaning up after the deadline (cancel on the platform)."""
        self.deadline = time.monotonic() + seconds

    async def aclose(self) -> None:
        await self.http.aclose()

    def _note(self, line: str) -> None:
        if self.log is not None:
            self.log(line)

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
        lookup: Lookup | None = None,
        what: str | None = None,
    ) -> Any:
        """The decoded JSON body of a 2xx answer (None when empty); ApiError otherwise.

        `idempotent` defaults to the method's nature (GET, PUT, DELETE, PATCH of a state);
        a non-idempotent call whose outcome is unknown asks `lookup` before resending."""
        if idempotent is None:
            idempotent = method.upper() in ("GET", "HEAD", "PUT", "DELETE", "PATCH")
        what = what or f"{method} {path.lstrip('/')}"
        attempt = 0
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise ApiError(f"{what}: no time left before the deadline")
            timeout = min(self.request_timeout, left)
            unknown, status = False, None
            try:
                resp = await self.http.request(
                    method,
                    path.lstrip("/"),
                    params=params,
                    json=json,
                    content=content,
                    headers=headers,
                    timeout=timeout,
                )
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # never sent
                failure, delay = f"{what}: cannot connect: {exc}", backoff(attempt)
            except httpx.TransportError as exc:  # sent, answer lost: outcome unknown
                failure, delay = f"{what}: {type(exc).__name__}: {exc}", backoff(attempt)
                unknown = True
            else:
                status = resp.status_code
                if resp.is_success:
                    try:
                        return resp.json() if resp.content else None
                    except ValueError:
                        raise ApiError(f"{what}: the answer is not JSON", status) from None
                failure = f"{what}: {_error_text(resp)}"
                if resp.status_code != 429 and resp.status_code < 500:
                    raise ApiError(failure, resp.status_code)
                delay = retry_after(resp, attempt)
                unknown = resp.status_code >= 500
            if unknown and not idempotent:
                if lookup is None:
                    raise ApiError(f"{failure} (outcome unknown; not resent)", status)
                found = await lookup()
                if found is not None:
                    self._note(f"{what}: outcome unknown ({failure}); found what it created")
                    return found
            if time.monotonic() + delay >= self.deadline:
                raise ApiError(
                    f"{failure} (no retry: the deadline comes first)",
                    status,
                    reached=status is not None,
                )
            self._note(f"{failure}; retrying in {delay:.1f}s")
            await asyncio.sleep(delay)
            attempt += 1


def _seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 2s or 1m")
    if isinstance(value, int | float):
        if value <= 0:
            raise ValueError("expected a positive duration")
        return float(value)
    if isinstance(value, str):
        seconds = float(parse_duration(value))
        if seconds <= 0:
            raise ValueError("expected a positive duration")
        return seconds
    raise ValueError("expected a duration such as 2s or 1m")


class HostedProvider(Provider):
    """Settings and plumbing common to the HTTP-API platform types."""

    default_api_url: ClassVar[str]
    extra_settings: ClassVar[frozenset[str]] = frozenset()
    COMMON_SETTINGS: ClassVar[frozenset[str]] = frozenset(
        {"token_file", "api_url", "poll_interval", "request_timeout"}
    )

    def __init__(self, name: str, config: ProviderConfig, base_dir: Path) -> None:
        super().__init__(name, config, base_dir)
        s = config.settings
        unknown = set(s) - self.COMMON_SETTINGS - self.extra_settings
        if unknown:
            raise self.config_error(sorted(unknown)[0], f"unknown key for a {self.type} provider")
        token = self.read_token()
        if token is None:
            raise self.config_error("token_file", "required: the file holding the API token")
        self.token = token
        api_url = s.get("api_url", self.default_api_url)
        if not isinstance(api_url, str) or not api_url.startswith(("http://", "https://")):
            raise self.config_error("api_url", "expected an http:// or https:// URL")
        self.api_url = api_url.rstrip("/")
        self.poll_interval = self._duration("poll_interval", 2.0)
        self.request_timeout = self._duration("request_timeout", 30.0)

    def _duration(self, key: str, default: float) -> float:
        value = self.config.settings.get(key)
        if value is None:
            return default
        try:
            return _seconds(value)
        except ValueError as exc:
            raise self.config_error(key, str(exc)) from None

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @contextlib.asynccontextmanager
    async def client(self, ctx: DeployContext | None = None) -> AsyncIterator[ApiClient]:
        """A client for one run (retries bounded by its deadline, noted in its log) or one
        check (validate, drift)."""
        headers = {"User-Agent": "reconciler", "Accept": "application/json"}
        headers.update(self.auth_headers())
        api = ApiClient(
            self.api_url,
            headers,
            self.request_timeout,
            # Outside a run (validate, drift) the calls and their retries share one
            # request_timeout.
            deadline=(
                ctx.deadline + DEADLINE_MARGIN
                if ctx is not None
                else time.monotonic() + self.request_timeout
            ),
            log=(lambda line: ctx.log(line, "stderr")) if ctx is not None else None,
        )
        try:
            yield api
        finally:
            await api.aclose()

    async def follow(
        self,
        ctx: DeployContext,
        label: str,
        poll: Callable[[], Awaitable[tuple[str, str | None]]],
        percents: Mapping[str, int],
        success: frozenset[str],
        failure: frozenset[str],
    ) -> str:
        """Poll `poll()` -> (state, error text) until a terminal state; progress on each new
        state at the platform's milestones. Returns the success state; raises DeploymentFailed
        with the platform's error text on a failure state."""
        last: str | None = None
        while True:
            state, error = await poll()
            if state != last:
                ctx.log(f"{label}: {state}", "stdout")
                await ctx.report_progress(
                    percents.get(state), f"{label}: {state}", {"state": state}
                )
                last = state
            if state in success:
                return state
            if state in failure:
                raise DeploymentFailed(f"{label} ended {state}" + (f": {error}" if error else ""))
            await asyncio.sleep(self.poll_interval)

    @contextlib.asynccontextmanager
    async def cancel_on_stop(
        self,
        ctx: DeployContext,
        api: ApiClient,
        what: Callable[[], str | None],
        cancel: Callable[[], Awaitable[None]],
    ) -> AsyncIterator[None]:
        """When the run is stopped (deadline, shutdown) while `what()` names a platform
        deployment in flight, cancel it there (bounded by the kill grace), then re-raise."""
        try:
            yield
        except asyncio.CancelledError:
            target = what()
            if target is not None:
                grace = max(ctx.kill_grace, 1.0)
                api.extend(grace)
                try:
                    async with asyncio.timeout(grace):
                        await cancel()
                    ctx.log(f"run stopped: cancelled {target} on the platform", "stderr")
                except (ApiError, TimeoutError) as exc:
                    ctx.log(f"run stopped: could not cancel {target}: {exc}", "stderr")
            raise


def failed(exc: ApiError) -> DeploymentFailed:
    return DeploymentFailed(str(exc))


async def account_and_target_checks(
    api: ApiClient,
    user_path: str,
    target: str,
    target_path: str,
    params: Mapping[str, Any] | None = None,
) -> list[Check]:
    """validate's REST checks: the token is accepted (`GET user_path`; a platform that does
    not answer is the `api` check), then the target exists. The credentials check failing
    ends the list: nothing else can be asked."""
    try:
        await api.request("GET", user_path)
    except ApiError as exc:
        return [Check("credentials" if exc.reached else "api", False, str(exc))]
    try:
        await api.request("GET", target_path, params=params)
    except ApiError as exc:
        return [Check("credentials", True), Check(target, False, str(exc))]
    return [Check("credentials", True), Check(target, True)]
