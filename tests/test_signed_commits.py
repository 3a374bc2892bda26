"""Trusted commits (`repository.allowed_signers`): only a head signed by a trusted key is
applied. Real keys (ssh-keygen, gpg), real signed commits, the real command line."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from reconciler.config import load_config
from reconciler.store import Store, SyncRecord
from tests.signing import (
    allowed_signers,
    applied_ref,
    gpg_home,
    set_env_signed,
    ssh_commit,
    ssh_key,
    trust,
)
from tests.support import World, env_yaml, wait_for

pytestmark = pytest.mark.timeout(120)


def _syncs(world: World) -> list[SyncRecord]:
    store = Store.from_url(load_config(world.config, environ={}).database_url, migrate=False)
    try:
        return store.list_syncs(limit=50)
    finally:
        store.engine.dispose()


def _status(world: World) -> list[dict]:
    out = world.cli("status", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def signed_world(tmp_path: Path):
    world = World(tmp_path)
    keys = tmp_path / "keys"
    ada, eve = ssh_key(keys, "ada@example.com"), ssh_key(keys, "eve@example.com")
    allowed_signers(tmp_path / "allowed_signers", ada)
    trust(world, "allowed_signers")
    return world, ada, eve


def test_only_trusted_heads_are_applied(signed_world) -> None:
    world, ada, eve = signed_world
    # Trusted: deployed, and the sync records who signed it.
    trusted = set_env_signed(world.repo, ada, "staging", {"api": "1.0"})
    world.cli("sync", check=True)
    assert world.started() == [("staging", "api", "1.0")]
    [applied] = _syncs(world)
    assert applied.result == "ok" and applied.signer == f"{ada.fingerprint} (ada@example.com)"

    # Signed by a key that is not in allowed_signers: refused, nothing deployed.
    untrusted = set_env_signed(world.repo, eve, "staging", {"api": "2.0"})
    out = world.cli("sync")
    assert out.returncode == 1
    reason = f"it is signed by {eve.fingerprint} which is not in allowed_signers"
    # The log line (event=sync_refused, as for a refused force push), then the error.
    assert out.stderr.strip().splitlines()[-1] == (
        f"reconciler: refused {untrusted[:12]}: {reason} (repository.allowed_signers)"
    )
    assert "Traceback" not in out.stderr
    assert world.started() == [("staging", "api", "1.0")]
    refused = _syncs(world)[0]
    assert (refused.result, refused.commit_sha, refused.signer) == (
        "refused",
        untrusted,
        eve.fingerprint,
    )
    assert refused.error_message is not None and reason in refused.error_message
    assert applied_ref(world) == trusted  # the last trusted state is kept
    [row] = _status(world)
    assert (row["desired"], row["deployed"], row["state"]) == ("1.0", "1.0", "synced")
    assert row["commit"] == trusted
    assert row["message"] == refused.error_message
    human = world.cli("status", "--wide")
    assert f"head refused {untrusted[:12]}: {reason}" in human.stdout, human.stdout

    # `plan` says a sync would refuse, and plans from the applied state.
    plan = world.cli("plan", "--json")
    assert plan.returncode == 0, plan.stderr
    [planned] = json.loads(plan.stdout)
    assert planned["desired"] == "1.0" and planned["action"] is None
    assert reason in planned["message"]
    assert reason in world.cli("plan", "--wide").stdout

    # Unsigned: refused too; no signer recorded.
    world.repo.write("staging.yaml", env_yaml("staging", {"api": "3.0"}))
    unsigned = world.repo.commit("unsigned change")
    out = world.cli("sync")
    assert out.returncode == 1 and f"refused {unsigned[:12]}: it is not signed" in out.stderr
    refused = _syncs(world)[0]
    assert (refused.result, refused.commit_sha, refused.signer) == ("refused", unsigned, None)
    assert world.started() == [("staging", "api", "1.0")]
    assert applied_ref(world) == trusted

    # A later trusted head is applied; the unsigned commits before it do not matter.
    head = set_env_signed(world.repo, ada, "staging", {"api": "4.0"})
    world.cli("sync", check=True)
    assert world.started()[-1] == ("staging", "api", "4.0")
    assert applied_ref(world) == head
    [row] = _status(world)
    assert (row["deployed"], row["message"]) == ("4.0", None)
    assert "refused" not in world.cli("status").stdout


def test_enabling_signatures_does_not_refuse_what_is_applied(tmp_path: Path) -> None:
    """Only new heads are checked: an applied unsigned commit stays applied (a restart
    with allowed_signers newly set refuses nothing), the next one must be signed."""
    world = World(tmp_path)
    ada = ssh_key(tmp_path / "keys", "ada@example.com")
    world.repo.set_env("staging", {"api": "1.0"})
    world.cli("sync", check=True)
    allowed_signers(tmp_path / "allowed_signers", ada)
    trust(world, "allowed_signers")
    world.cli("sync", check=True)
    assert [s.result for s in _syncs(world)] == ["ok", "ok"]
    world.repo.set_env("staging", {"api": "2.0"})
    assert world.cli("sync").returncode == 1
    assert world.started() == [("staging", "api", "1.0")]


def test_a_gnupg_keyring_as_allowed_signers(tmp_path: Path, monkeypatch) -> None:
    if shutil.which("gpg") is None:
        pytest.skip("gpg is not installed")
    world = World(tmp_path)
    with gpg_home() as home:
        ada = home.new_key("Ada <ada@example.com>")
        mallory = home.new_key("Mallory <mallory@example.com>")
        (tmp_path / "keys.asc").write_bytes(home.gpg("--export", "--armor", ada))
        (tmp_path / "keys.gpg").write_bytes(home.gpg("--export", ada))
        trust(world, "keys.asc")
        # The commands run with the signing home as GNUPGHOME: it knows (and trusts, as
        # its owner) Mallory's key too, which must not count.
        monkeypatch.setenv("GNUPGHOME", str(home.home))

        world.repo.write("staging.yaml", env_yaml("staging", {"api": "1.0"}))
        trusted = home.commit(world.repo, ada, "signed by ada")
        world.cli("sync", check=True)
        assert world.started() == [("staging", "api", "1.0")]
        assert _syncs(world)[0].signer == f"{ada} (Ada <ada@example.com>)"

        world.repo.write("staging.yaml", env_yaml("staging", {"api": "2.0"}))
        refused = home.commit(world.repo, mallory, "signed by mallory")
        out = world.cli("sync")
        assert out.returncode == 1
        assert f"refused {refused[:12]}: it is signed by {mallory[-16:]}" in out.stderr
        assert "which is not in allowed_signers" in out.stderr
        assert world.started() == [("staging", "api", "1.0")]
        assert applied_ref(world) == trusted

        # An SSH-signed commit is not trusted by a GnuPG keyring.
        eve = ssh_key(tmp_path / "ssh", "eve@example.com")
        world.repo.write("staging.yaml", env_yaml("staging", {"api": "3.0"}))
        ssh_commit(world.repo, eve, "signed with ssh")
        out = world.cli("sync")
        assert out.returncode == 1 and eve.fingerprint in out.stderr

        # The binary export works the same; a changed keyring gets a new private home.
        trust_file = world.config.read_text().replace('"keys.asc"', '"keys.gpg"')
        world.config.write_text(trust_file)
        world.repo.write("staging.yaml", env_yaml("staging", {"api": "4.0"}))
        home.commit(world.repo, ada, "signed by ada again")
        world.cli("sync", check=True)
        assert world.started()[-1] == ("staging", "api", "4.0")
    homes = list((tmp_path / "state" / "gnupg").iterdir())
    assert len(homes) == 1 and (homes[0] / "pubring.kbx").is_file()


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "is empty"),
        (b"# nobody\n\n", "lists no key"),
        (b"ada@example.com ssh-ed25519\n", ":1: expected `principals [options] keytype"),
        (b'ada namespaces="git" ssh-ed25519\n', ":1: the ssh-ed25519 key is missing"),
        (b"# c\nada@example.com ssh-ed25519 AAAA!!\n", ":2: the ssh-ed25519 key is not valid"),
        (b"ada@example.com ssh-foo AAAA\n", ":1: unknown key type 'ssh-foo'"),
        (b'ada@example.com nope="x" ssh-ed25519 AAAA\n', ":1: unknown option 'nope'"),
        (b"ada ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIJ8n\n", "says it is ssh-ed25519, not ssh-rsa"),
        (b'ada namespaces="git ssh-ed25519 AAAA\n', ":1: a double quote is not closed"),
        (b"# x\nada \xff\n", ":2: not UTF-8"),
        (b"-----BEGIN PGP PRIVATE KEY BLOCK-----\n", "holds a secret key"),
        (b"\x95\x01\x02", "holds a secret key"),  # an old-format secret-key packet
        (b"\x8c\x0d", "neither an SSH allowed-signers list nor an OpenPGP public keyring"),
        (b"\x00\x00\x00\x20\x01\x02\x00\x00KBXf", "GnuPG keybox"),
    ],
)
def test_malformed_allowed_signers_exit_2_naming_the_file(
    tmp_path: Path, content: bytes, says: str
) -> None:
    world = World(tmp_path)
    (tmp_path / "allowed_signers").write_bytes(content)
    trust(world, "allowed_signers")
    out = world.cli("status")
    assert out.returncode == 2
    [line] = out.stderr.splitlines()
    assert f"repository.allowed_signers: {tmp_path / 'allowed_signers'}" in line and says in line


def test_a_keyring_gpg_cannot_read_exits_2(tmp_path: Path) -> None:
    if shutil.which("gpg") is None:
        pytest.skip("gpg is not installed")
    world = World(tmp_path)
    world.repo.set_env("staging", {"api": "1.0"})
    (tmp_path / "keys.asc").write_text(
        "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nbm90IGEga2V5\n-----END PGP PUBLIC KEY BLOCK-----\n"
    )
    trust(world, "keys.asc")
    out = world.cli("sync")
    assert out.returncode == 2, out.stderr
    [line] = out.stderr.splitlines()
    assert "repository.allowed_signers" in line and str(tmp_path / "keys.asc") in line
    assert world.started() == []


def test_good_allowed_signers_lines_are_accepted(tmp_path: Path) -> None:
    ada = ssh_key(tmp_path / "keys", "ada@example.com")
    key = ada.public_line
    (tmp_path / "allowed_signers").write_text(
        "\n".join(
            [
                "# comment",
                f"ada@example.com {key}",
                f'"ada@example.com,*@corp.example" namespaces="git,file" {key} laptop',
                f'ops@example.com cert-authority,valid-after="20260101" {key}',
                "",
            ]
        )
    )
    world = World(tmp_path)
    trust(world, "allowed_signers")
    config = load_config(world.config, environ={})
    assert config.allowed_signers is not None
    assert (config.allowed_signers.kind, config.allowed_signers.keys) == ("ssh", 3)


def test_the_daemon_refuses_an_untrusted_head_once_and_trusts_a_reloaded_list(
    tmp_path: Path,
) -> None:
    """Through a real daemon: the refusal is recorded once however often the head is
    looked at, shows in the API's status, is notified; a reload (SIGHUP) reads the file
    again and the head, now trusted, is applied."""
    from tests.test_http_daemon import Served
    from tests.test_notify import Receiver

    world = World(tmp_path)
    keys = tmp_path / "keys"
    ada, eve = ssh_key(keys, "ada@example.com"), ssh_key(keys, "eve@example.com")
    allowed_signers(tmp_path / "allowed_signers", ada)
    trust(world, "allowed_signers")
    receiver = Receiver()
    receiver.up()
    world.config.write_text(
        world.config.read_text()
        + f'\n[[notifications]]\ntype = "webhook"\nurl = "{receiver.url()}"\n'
        + 'events = ["sync_error"]\n'
    )
    set_env_signed(world.repo, ada, "staging", {"api": "1.0"})
    served = Served(world)

    def status() -> dict:
        r = served.client.get("/api/v1/status")
        assert r.status_code == 200, r.text
        rows = r.json()
        assert len(rows) <= 1, rows
        return rows[0] if rows else {}  # {}: before the first sync

    def refusals_logged() -> int:
        return served.stderr.read_text().count("event=sync_refused")

    try:
        wait_for(lambda: status().get("deployed") == "1.0", what="the trusted head deployed")
        untrusted = set_env_signed(world.repo, eve, "staging", {"api": "2.0"})
        wait_for(refusals_logged, what="the refusal")
        for looks in (2, 3):  # the same head looked at again (as by polls): not recorded again
            served.proc.send_signal(signal.SIGUSR1)
            wait_for(lambda n=looks: refusals_logged() >= n, what=f"look {looks}")
        refused = [s for s in _syncs(world) if s.result == "refused"]
        assert [(s.commit_sha, s.signer) for s in refused] == [(untrusted, eve.fingerprint)]
        reason = f"it is signed by {eve.fingerprint} which is not in allowed_signers"
        row = status()
        assert (row["desired"], row["deployed"], row["state"]) == ("1.0", "1.0", "synced")
        assert reason in row["message"] and untrusted[:12] in row["message"]
        notice = receiver.get(timeout=30)
        assert notice.event == "sync_error"
        assert notice.json["sync"]["result"] == "refused"
        assert notice.json["sync"]["signer"] == eve.fingerprint
        assert reason in notice.json["message"]
        assert world.started() == [("staging", "api", "1.0")]

        # A reload with a malformed file is refused: the keys read at start stay.
        (tmp_path / "allowed_signers").write_text("eve@example.com ssh-ed25519 !!\n")
        served.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "event=reload_refused" in served.stderr.read_text(), what="reload refused")
        assert "allowed_signers:1: the ssh-ed25519 key is not valid" in served.stderr.read_text()
        allowed_signers(tmp_path / "allowed_signers", ada, eve)
        served.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: status().get("deployed") == "2.0", what="the head trusted after a reload")
        assert status()["message"] is None
        assert applied_ref(world) == untrusted
        assert receiver.drain() == []  # nothing more went wrong
    finally:
        served.close()
        receiver.down()
    assert "Traceback" not in served.stderr.read_text()


@pytest.mark.parametrize(
    ("status", "trusted", "reason"),
    [
        ("G", True, None),
        ("N", False, "it is not signed"),
        ("U", False, "it is signed by K which is not in allowed_signers"),
        ("E", False, "it is signed by K which is not in allowed_signers"),
        ("B", False, "its signature by K is bad"),
        ("X", False, "its signature by K has expired"),
        ("Y", False, "it is signed by K whose key has expired"),
        ("R", False, "it is signed by K whose key is revoked"),
        ("?", False, "its signature cannot be checked"),
    ],
)
def test_every_verdict_of_git_is_worded(status: str, trusted: bool, reason: str | None) -> None:
    """git's %G? letters that real keys in a test cannot all produce (a bad or expired
    signature, a revoked key): only G is trusted, each other one says why."""
    from reconciler.source.signatures import describe

    verdict = describe(status, "K", "ada@example.com")
    assert (verdict.trusted, verdict.reason) == (trusted, reason)
    expected = "K (ada@example.com)" if trusted else None if status == "N" else "K"
    assert verdict.signer == expected
