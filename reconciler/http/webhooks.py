"""Webhook verification and parsing: pure functions and a small replay cache, no web framework.

Three kinds of sender are told apart by the header that authenticates them:

- GitHub: ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, raw body)>``,
  ``X-GitHub-Event`` (``push``, ``ping``, ...), ``X-GitHub-Delivery`` (a GUID).
- GitLab: ``X-Gitlab-Token: <the secret itself>``, ``X-Gitlab-Event`` (``Push Hook``, ...),
  ``Idempotency-Key`` (same across retries, GitLab 17.4+) or ``X-Gitlab-Event-UUID``.
- Generic: ``X-Reconciler-Signature-256: sha256=<hex HMAC-SHA256(secret, signed)>`` with
  ``X-Reconciler-Timestamp: <unix seconds>`` (refused outside the replay window) and an
  optional ``X-Reconciler-Delivery`` id, where ``signed`` is ``timestamp + "." + delivery +
  "." + body``, or ``timestamp + "." + body`` without a delivery id: everything the replay
  check relies on is signed, so a captured request cannot be replayed under a new id. The
  body is ``{"ref": "refs/heads/main"}`` or ``{"branch": "main"}``.

Every comparison is constant-time, every signature is checked over the exact bytes received,
and nothing of the body is parsed before the sender is authenticated.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args
from urllib.parse import parse_qs

Result = Literal[
    "accepted",
    "ignored",
    "unauthorized",
    "forbidden",
    "too_large",
    "bad_request",
    "duplicate",
    "unavailable",
]
RESULTS: tuple[Result, ...] = get_args(Result)
HTTP_STATUS: dict[Result, int] = {
    "accepted": 202,
    "ignored": 202,
    "unauthorized": 401,
    "forbidden": 403,
    "too_large": 413,
    "bad_request": 400,
    "duplicate": 200,
    "unavailable": 503,
}
Sender = Literal["github", "gitlab", "generic"]

GITHUB_SIGNATURE = "x-hub-signature-256"
GITHUB_EVENT = "x-github-event"
GITHUB_DELIVERY = "x-github-delivery"
GITLAB_TOKEN = "x-gitlab-token"
GITLAB_EVENT = "x-gitlab-event"
GITLAB_EVENT_UUID = "x-gitlab-event-uuid"
IDEMPOTENCY_KEY = "idempotency-key"
GENERIC_SIGNATURE = "x-reconciler-signature-256"
GENERIC_TIMESTAMP = "x-reconciler-timestamp"
GENERIC_DELIVERY = "x-reconciler-delivery"

UNSIGNED = (
    "unsigned request: send X-Hub-Signature-256 (GitHub), X-Gitlab-Token (GitLab) "
    "or X-Reconciler-Signature-256 with X-Reconciler-Timestamp"
)


class Refused(Exception):
    """A delivery refused before it is acted on; ``result`` says how."""

    def __init__(self, result: Result, message: str) -> None:
        super().__init__(message)
        self.result: Result = result
        self.message = message


@dataclass(frozen=True)
class Outcome:
    """What the receiver decided about one delivery."""

    result: Result
    message: str
    sender: Sender | None = None
    delivery: str | None = None
    branch: str | None = None

    @property
    def status_code(self) -> int:
        return HTTP_STATUS[self.result]

    def to_json(self) -> dict[str, Any]:
        if self.result == "accepted":
            return {"status": "accepted"}
        if self.result == "ignored":
            return {"status": "ignored", "reason": self.message}
        if self.result == "duplicate":
            return {"status": "duplicate"}
        return {"error": self.message}


def sign(secret: str | bytes, message: bytes) -> str:
    """``sha256=<hex HMAC-SHA256>`` of ``message``: what GitHub (and our generic form) sends."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, message, hashlib.sha256).hexdigest()


def generic_signed_bytes(timestamp: int | str, body: bytes, delivery: str | None = None) -> bytes:
    """What the generic signature covers: ``timestamp.delivery.body`` (``timestamp.body``
    without a delivery id)."""
    head = f"{timestamp}." + (f"{delivery}." if delivery else "")
    return head.encode() + body


def sign_generic(
    secret: str | bytes, timestamp: int | str, body: bytes, *, delivery: str | None = None
) -> str:
    """The ``X-Reconciler-Signature-256`` value for a body sent at ``timestamp`` with the
    ``X-Reconciler-Delivery`` id ``delivery`` (if any)."""
    return sign(secret, generic_signed_bytes(timestamp, body, delivery))


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def detect_sender(headers: Mapping[str, str]) -> Sender | None:
    """Which kind of sender the authenticating header names (None: unsigned)."""
    h = _lower(headers)
    if GITHUB_SIGNATURE in h:
        return "github"
    if GITLAB_TOKEN in h:
        return "gitlab"
    if GENERIC_SIGNATURE in h:
        return "generic"
    return None


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def verify_github(secret: str, body: bytes, signature: str | None) -> None:
    if not signature:
        raise Refused("unauthorized", UNSIGNED)
    if not signature.startswith("sha256="):
        raise Refused("forbidden", "X-Hub-Signature-256 must be sha256=<hex>")
    if not _same(signature.strip(), sign(secret, body)):
        raise Refused("forbidden", "signature does not match: check the webhook secret")


def verify_gitlab(secret: str, token: str | None) -> None:
    if not token:
        raise Refused("unauthorized", UNSIGNED)
    if not _same(token, secret):
        raise Refused("forbidden", "X-Gitlab-Token does not match the webhook secret")


def verify_generic(
    secret: str,
    body: bytes,
    signature: str | None,
    timestamp: str | None,
    *,
    now: float,
    window: float,
    delivery: str | None = None,
) -> None:
    if not signature:
        raise Refused("unauthorized", UNSIGNED)
    if not timestamp:
        raise Refused("unauthorized", "X-Reconciler-Timestamp is required with the signature")
    try:
        sent = int(timestamp.strip())
    except ValueError:
        raise Refused("bad_request", "X-Reconciler-Timestamp must be unix seconds") from None
    given = signature.strip()
    if not _same(given, sign_generic(secret, sent, body, delivery=delivery)):
        if delivery and _same(given, sign_generic(secret, sent, body)):
            raise Refused(
                "forbidden",
                "the signature must cover X-Reconciler-Delivery: sign timestamp.delivery.body",
            )
        raise Refused("forbidden", "signature does not match: check the webhook secret")
    if abs(now - sent) > window:
        raise Refused(
            "forbidden",
            f"timestamp is {int(abs(now - sent))} s away from now, outside the "
            f"{int(window)} s replay window: check the sender's clock",
        )


def parse_body(body: bytes, content_type: str | None) -> dict[str, Any]:
    """The JSON object of a delivery; GitHub's form-encoded ``payload=`` is read as well."""
    raw = body
    if content_type and content_type.split(";")[0].strip().lower() == (
        "application/x-www-form-urlencoded"
    ):
        try:
            fields = parse_qs(body.decode("utf-8"), strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            raise Refused("bad_request", "malformed form body") from None
        if "payload" not in fields:
            raise Refused("bad_request", "form body without a payload field")
        raw = fields["payload"][0].encode()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise Refused("bad_request", "body is not valid JSON") from None
    if not isinstance(data, dict):
        raise Refused("bad_request", "body must be a JSON object")
    return data


def branch_of(ref: Any) -> str | None:
    """``refs/heads/main`` -> ``main``; None for anything else (tags, notes, garbage)."""
    if isinstance(ref, str) and ref.startswith("refs/heads/") and len(ref) > len("refs/heads/"):
        return ref[len("refs/heads/") :]
    return None


def _ref_outcome(sender: Sender, ref: Any, branch: str, delivery: str | None) -> Outcome:
    if not isinstance(ref, str) or not ref:
        raise Refused("bad_request", 'push payload has no "ref"')
    pushed = branch_of(ref)
    if pushed is None:
        kind = "a tag" if ref.startswith("refs/tags/") else f"ref {ref}"
        return Outcome("ignored", f"push of {kind}, not a branch", sender, delivery)
    if pushed != branch:
        return Outcome(
            "ignored", f"push to branch {pushed}, not {branch}", sender, delivery, pushed
        )
    return Outcome("accepted", f"push to {pushed}", sender, delivery, pushed)


def delivery_id(sender: Sender, headers: Mapping[str, str]) -> str | None:
    """The id that a retry or a replay of the same delivery repeats."""
    h = _lower(headers)
    if sender == "github":
        value = h.get(GITHUB_DELIVERY)
    elif sender == "gitlab":
        value = h.get(IDEMPOTENCY_KEY) or h.get(GITLAB_EVENT_UUID)
    else:
        # Without a delivery id the signature itself is unique per send (it covers the time).
        value = h.get(GENERIC_DELIVERY) or h.get(GENERIC_SIGNATURE)
    return f"{sender}:{value.strip()}" if value and value.strip() else None


class ReplayCache:
    """Delivery ids seen within ``window`` seconds; at most ``max_entries``, oldest evicted."""

    def __init__(
        self,
        window: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.max_entries = max_entries
        self.clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def _expire(self, now: float) -> None:
        while self._seen:
            key, at = next(iter(self._seen.items()))
            if now - at < self.window:
                break
            del self._seen[key]

    def seen(self, *keys: str) -> bool:
        """True if any of ``keys`` was seen within the window; otherwise remember them all
        and say False."""
        now = self.clock()
        self._expire(now)
        if any(key in self._seen for key in keys):
            return True
        for key in keys:
            self._seen[key] = now
        while len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)
        return False


class WebhookReceiver:
    """Decides about deliveries: authenticate, drop replays, parse, match the branch."""

    def __init__(
        self,
        *,
        replay_window: float = 600.0,
        max_entries: int = 10_000,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.wall_clock = wall_clock
        self.replays = ReplayCache(replay_window, max_entries, monotonic)

    def receive(
        self,
        secret: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        branch: str,
        replay_window: float | None = None,
    ) -> Outcome:
        """Decide about one delivery. ``branch`` and ``replay_window`` come from the current
        configuration, so a reload applies to the next delivery."""
        if replay_window is not None:
            self.replays.window = replay_window
        try:
            return self._receive(secret, _lower(headers), body, branch)
        except Refused as refused:
            return Outcome(refused.result, refused.message, detect_sender(headers))

    def _receive(self, secret: str, h: dict[str, str], body: bytes, branch: str) -> Outcome:
        sender = detect_sender(h)
        if sender is None:
            raise Refused("unauthorized", UNSIGNED)
        if sender == "github":
            verify_github(secret, body, h.get(GITHUB_SIGNATURE))
        elif sender == "gitlab":
            verify_gitlab(secret, h.get(GITLAB_TOKEN))
        else:
            verify_generic(
                secret,
                body,
                h.get(GENERIC_SIGNATURE),
                h.get(GENERIC_TIMESTAMP),
                now=self.wall_clock(),
                window=self.replays.window,
                delivery=(h.get(GENERIC_DELIVERY) or "").strip() or None,
            )
        # Only an authenticated delivery may enter the replay cache: a forger cannot fill it.
        delivery = delivery_id(sender, h)
        keys = [] if delivery is None else [delivery]
        if sender == "generic" and h.get(GENERIC_DELIVERY, "").strip():
            # The signature too: the same signed bytes can never pass twice, whatever id.
            keys.append(f"generic:{h[GENERIC_SIGNATURE].strip()}")
        if keys and self.replays.seen(*keys):
            return Outcome("duplicate", "delivery already received", sender, delivery)
        data = parse_body(body, h.get("content-type"))
        if sender == "github":
            event = h.get(GITHUB_EVENT, "").strip()
            if event != "push":
                what = f"{event} event" if event else "an event without X-GitHub-Event"
                return Outcome("ignored", f"{what}, not a push", sender, delivery)
            return _ref_outcome(sender, data.get("ref"), branch, delivery)
        if sender == "gitlab":
            event = h.get(GITLAB_EVENT, "").strip()
            kind = data.get("object_kind")
            if event != "Push Hook" and not (event == "System Hook" and kind == "push"):
                what = f"{event} event" if event else "an event without X-Gitlab-Event"
                return Outcome("ignored", f"{what}, not a push", sender, delivery)
            return _ref_outcome(sender, data.get("ref"), branch, delivery)
        if "ref" in data:
            return _ref_outcome(sender, data.get("ref"), branch, delivery)
        name = data.get("branch")
        if not isinstance(name, str) or not name:
            raise Refused("bad_request", 'body needs "ref" (refs/heads/<branch>) or "branch"')
        return _ref_outcome(sender, f"refs/heads/{name}", branch, delivery)
