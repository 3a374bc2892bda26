"""Webhook verification and parsing, directly, with the payload shapes the hosts document."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from reconciler.http.webhooks import (
    Refused,
    ReplayCache,
    WebhookReceiver,
    branch_of,
    delivery_id,
    detect_sender,
    sign,
    sign_generic,
    verify_github,
)

SECRET = "It's a Secret to Everybody"


def github_push(ref: str = "refs/heads/main") -> bytes:
    # Trimmed from GitHub's documented `push` payload.
    return json.dumps(
        {
            "ref": ref,
            "before": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
            "after": "0000000000000000000000000000000000000000",
            "created": False,
            "deleted": False,
            "forced": False,
            "repository": {"full_name": "octo-org/desired-state", "default_branch": "main"},
            "pusher": {"name": "octocat", "email": "octocat@github.com"},
            "head_commit": {"id": "9f1c2ab", "message": "api 1.4.2"},
            "commits": [],
        }
    ).encode()


def gitlab_push(ref: str = "refs/heads/main") -> bytes:
    # Trimmed from GitLab's documented "Push Hook" payload.
    return json.dumps(
        {
            "object_kind": "push",
            "event_name": "push",
            "before": "95790bf891e76fee5e1747ab589903a6a1f80f22",
            "after": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
            "ref": ref,
            "ref_protected": True,
            "checkout_sha": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
            "user_username": "jsmith",
            "project": {"path_with_namespace": "mike/diaspora", "default_branch": "main"},
            "commits": [],
            "total_commits_count": 0,
        }
    ).encode()


def gh_headers(body: bytes, event: str = "push", delivery: str = "d-1") -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery,
        "X-GitHub-Hook-ID": "292430182",
        "X-Hub-Signature-256": sign(SECRET, body),
        "User-Agent": "GitHub-Hookshot/044aadd",
    }


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def receiver(clock: Clock | None = None, **kw) -> WebhookReceiver:
    clock = clock or Clock()
    return WebhookReceiver(replay_window=600, wall_clock=clock, monotonic=clock, **kw)


def test_github_documented_signature_vector():
    # GitHub's documentation gives this secret, payload and resulting signature.
    expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert sign(SECRET, b"Hello, World!") == expected
    verify_github(SECRET, b"Hello, World!", expected)
    with pytest.raises(Refused) as bad:
        verify_github(SECRET, b"Hello, World!!", expected)
    assert bad.value.result == "forbidden"
    with pytest.raises(Refused) as sha1:
        verify_github(SECRET, b"Hello, World!", "sha1=" + "0" * 40)
    assert sha1.value.result == "forbidden"


def test_github_push_to_the_branch_is_accepted():
    body = github_push()
    out = receiver().receive(SECRET, gh_headers(body), body, branch="main")
    assert (out.result, out.status_code, out.sender, out.branch) == (
        "accepted",
        202,
        "github",
        "main",
    )
    assert out.delivery == "github:d-1"
    assert out.to_json() == {"status": "accepted"}


def test_github_form_encoded_payload_is_read():
    from urllib.parse import urlencode

    body = urlencode({"payload": github_push().decode()}).encode()
    headers = {**gh_headers(body), "Content-Type": "application/x-www-form-urlencoded"}
    assert receiver().receive(SECRET, headers, body, branch="main").result == "accepted"


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        ("refs/heads/feature", "push to branch feature, not main"),
        ("refs/tags/v1.0", "push of a tag, not a branch"),
    ],
)
def test_github_other_branch_or_tag_is_ignored(ref, reason):
    body = github_push(ref)
    out = receiver().receive(SECRET, gh_headers(body), body, branch="main")
    assert (out.result, out.status_code) == ("ignored", 202)
    assert out.to_json() == {"status": "ignored", "reason": reason}


def test_github_ping_is_ignored():
    body = json.dumps({"zen": "Keep it logically awesome.", "hook_id": 1, "hook": {}}).encode()
    out = receiver().receive(SECRET, gh_headers(body, event="ping"), body, branch="main")
    assert out.result == "ignored" and out.message == "ping event, not a push"


def test_github_unsigned_bad_signature_and_tampered_body():
    body = github_push()
    headers = gh_headers(body)
    r = receiver()
    unsigned = {k: v for k, v in headers.items() if k != "X-Hub-Signature-256"}
    assert r.receive(SECRET, unsigned, body, branch="main").result == "unauthorized"
    assert r.receive("another secret", headers, body, branch="main").result == "forbidden"
    tampered = body.replace(b"main", b"mein")
    assert r.receive(SECRET, headers, tampered, branch="main").result == "forbidden"
    # None of the refused deliveries entered the replay cache.
    assert len(r.replays) == 0


def test_replayed_delivery_is_a_duplicate_until_the_window_passes():
    clock = Clock()
    r = receiver(clock)
    body = github_push()
    assert r.receive(SECRET, gh_headers(body), body, branch="main").result == "accepted"
    again = r.receive(SECRET, gh_headers(body), body, branch="main")
    assert (again.result, again.status_code, again.to_json()) == (
        "duplicate",
        200,
        {"status": "duplicate"},
    )
    assert r.receive(SECRET, gh_headers(body, delivery="d-2"), body, branch="main").result == (
        "accepted"
    )
    clock.now += 601
    assert r.receive(SECRET, gh_headers(body), body, branch="main").result == "accepted"


def test_malformed_json_is_a_bad_request():
    body = b"{not json"
    out = receiver().receive(SECRET, gh_headers(body), body, branch="main")
    assert (out.result, out.status_code) == ("bad_request", 400)
    array = b"[1, 2]"
    assert receiver().receive(SECRET, gh_headers(array), array, branch="main").result == (
        "bad_request"
    )


def test_gitlab_token_push_and_events():
    body = gitlab_push()
    headers = {
        "Content-Type": "application/json",
        "X-Gitlab-Event": "Push Hook",
        "X-Gitlab-Token": SECRET,
        "X-Gitlab-Instance": "https://gitlab.example.com",
        "X-Gitlab-Webhook-UUID": "b9ec9a46-1b1c-4e94-9a1b-6b1a6f0b8f6e",
        "X-Gitlab-Event-UUID": "13792a34-cac6-4fda-95a8-c58e00a3954e",
        "Idempotency-Key": "f5e5f430-f57b-4e6e-9fac-d9128cd7232f",
    }
    r = receiver()
    out = r.receive(SECRET, headers, body, branch="main")
    assert (out.result, out.sender) == ("accepted", "gitlab")
    assert out.delivery == "gitlab:f5e5f430-f57b-4e6e-9fac-d9128cd7232f"
    assert r.receive(SECRET, headers, body, branch="main").result == "duplicate"
    wrong = {**headers, "X-Gitlab-Token": "guess", "Idempotency-Key": "other"}
    assert r.receive(SECRET, wrong, body, branch="main").result == "forbidden"
    tag = {**headers, "X-Gitlab-Event": "Tag Push Hook", "Idempotency-Key": "k3"}
    assert r.receive(SECRET, tag, gitlab_push("refs/tags/v1"), branch="main").result == "ignored"
    other = {**headers, "Idempotency-Key": "k4"}
    assert r.receive(SECRET, other, gitlab_push("refs/heads/dev"), branch="main").result == (
        "ignored"
    )


def test_generic_hmac_with_timestamp():
    clock = Clock()
    r = receiver(clock)
    body = json.dumps({"branch": "main"}).encode()
    ts = int(clock.now)
    headers = {
        "X-Reconciler-Timestamp": str(ts),
        "X-Reconciler-Signature-256": sign_generic(SECRET, ts, body),
    }
    # The signature is HMAC-SHA256(secret, timestamp + "." + body), hex, "sha256=" prefixed.
    mac = hmac.new(SECRET.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    assert headers["X-Reconciler-Signature-256"] == f"sha256={mac}"
    out = r.receive(SECRET, headers, body, branch="main")
    assert (out.result, out.sender) == ("accepted", "generic")
    # Without a delivery id the signature itself identifies the send.
    assert r.receive(SECRET, headers, body, branch="main").result == "duplicate"
    ref_body = json.dumps({"ref": "refs/heads/main"}).encode()
    ref_headers = {
        "X-Reconciler-Timestamp": str(ts),
        "X-Reconciler-Signature-256": sign_generic(SECRET, ts, ref_body, delivery="ci-run-7"),
        "X-Reconciler-Delivery": "ci-run-7",
    }
    assert r.receive(SECRET, ref_headers, ref_body, branch="main").result == "accepted"


def test_generic_delivery_id_is_signed_so_a_replay_cannot_pass_for_a_new_delivery():
    clock = Clock()
    r = receiver(clock)
    body = json.dumps({"branch": "main"}).encode()
    ts = int(clock.now)
    signed = {
        "X-Reconciler-Timestamp": str(ts),
        "X-Reconciler-Signature-256": sign_generic(SECRET, ts, body, delivery="ci-1"),
        "X-Reconciler-Delivery": "ci-1",
    }
    # The signed string: timestamp "." delivery "." body.
    mac = hmac.new(SECRET.encode(), f"{ts}.ci-1.".encode() + body, hashlib.sha256).hexdigest()
    assert signed["X-Reconciler-Signature-256"] == f"sha256={mac}"
    assert r.receive(SECRET, signed, body, branch="main").result == "accepted"
    assert r.receive(SECRET, signed, body, branch="main").result == "duplicate"
    # A captured request replayed under another delivery id, or none, is refused.
    for replay in (
        {**signed, "X-Reconciler-Delivery": "ci-2"},
        {k: v for k, v in signed.items() if k != "X-Reconciler-Delivery"},
    ):
        out = r.receive(SECRET, replay, body, branch="main")
        assert (out.result, out.message) == (
            "forbidden",
            "signature does not match: check the webhook secret",
        )
    # A sender still signing timestamp.body while sending a delivery id is told what to sign.
    unsigned_id = {
        "X-Reconciler-Timestamp": str(ts),
        "X-Reconciler-Signature-256": sign_generic(SECRET, ts, body),
        "X-Reconciler-Delivery": "ci-3",
    }
    out = r.receive(SECRET, unsigned_id, body, branch="main")
    assert out.result == "forbidden"
    assert out.message == (
        "the signature must cover X-Reconciler-Delivery: sign timestamp.delivery.body"
    )


def test_generic_refusals():
    clock = Clock()
    r = receiver(clock)
    body = json.dumps({"branch": "main"}).encode()
    stale = int(clock.now) - 601
    headers = {
        "X-Reconciler-Timestamp": str(stale),
        "X-Reconciler-Signature-256": sign_generic(SECRET, stale, body),
    }
    out = r.receive(SECRET, headers, body, branch="main")
    assert out.result == "forbidden" and "replay window" in out.message
    future = int(clock.now) + 601
    headers = {
        "X-Reconciler-Timestamp": str(future),
        "X-Reconciler-Signature-256": sign_generic(SECRET, future, body),
    }
    assert r.receive(SECRET, headers, body, branch="main").result == "forbidden"
    now = int(clock.now)
    # A signature made for another timestamp does not verify with this one.
    moved = {
        "X-Reconciler-Timestamp": str(now),
        "X-Reconciler-Signature-256": sign_generic(SECRET, now - 1, body),
    }
    assert r.receive(SECRET, moved, body, branch="main").result == "forbidden"
    no_time = {"X-Reconciler-Signature-256": sign_generic(SECRET, now, body)}
    assert r.receive(SECRET, no_time, body, branch="main").result == "unauthorized"
    empty = json.dumps({}).encode()
    headers = {
        "X-Reconciler-Timestamp": str(now),
        "X-Reconciler-Signature-256": sign_generic(SECRET, now, empty),
    }
    assert r.receive(SECRET, headers, empty, branch="main").result == "bad_request"


def test_unsigned_request_names_the_accepted_headers():
    out = receiver().receive(SECRET, {"Content-Type": "application/json"}, b"{}", branch="main")
    assert out.result == "unauthorized" and "X-Hub-Signature-256" in out.message


def test_replay_cache_is_bounded_oldest_evicted():
    clock = Clock()
    cache = ReplayCache(600, max_entries=3, clock=clock)
    for key in "abcd":
        assert not cache.seen(key)
    assert len(cache) == 3
    assert not cache.seen("a")  # evicted, so new again (and now "b" is the oldest)
    assert cache.seen("d")


def test_helpers():
    assert branch_of("refs/heads/release/1.x") == "release/1.x"
    assert branch_of("refs/tags/v1") is None and branch_of("refs/heads/") is None
    assert detect_sender({"x-gitlab-token": "t"}) == "gitlab"
    assert detect_sender({}) is None
    assert delivery_id("gitlab", {"X-Gitlab-Event-UUID": "u"}) == "gitlab:u"
    assert delivery_id("github", {}) is None
