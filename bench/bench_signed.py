"""Trusted commits: what verifying the head's signature adds to a sync.

Two engines sync the same repository side by side, one with `repository.allowed_signers`
(an SSH allowed-signers list), one without. Each round a new SSH-signed commit arrives and
both sync it (`Engine.sync`; runners off, nothing deployed), in alternating order. Also:
the verification alone (one `git log --format=%G?` subprocess, which runs `ssh-keygen -Y
verify`), the same for a GnuPG keyring when gpg is installed, and a refused head looked
at again (its verdict is cached: no subprocess).

    .venv/bin/python bench/bench_signed.py [--full]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _common import (
    Table,
    fleet_file,
    git,
    machine,
    make_repo,
    median,
    ms,
    ratio,
    say,
    write_config,
)

from reconciler.allowed_signers import read_allowed_signers
from reconciler.config import load_config
from reconciler.engine import Engine
from reconciler.operations import open_engine
from reconciler.source import SignatureVerifier


def cpu_now() -> float:
    """CPU seconds of this process and its finished children (the git subprocesses)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def ssh_key(folder: Path) -> Path:
    key = folder / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", str(key)], check=True
    )
    return key


def ssh_signed_commit(repo: Path, key: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(
        repo,
        "-c",
        "gpg.format=ssh",
        "-c",
        f"user.signingkey={key}",
        "commit",
        "-q",
        "--allow-empty",
        "-S",
        "-m",
        message,
    )
    return git(repo, "rev-parse", "HEAD")


def config_for(tmp: Path, repo: Path, allowed: Path | None) -> Path:
    tmp.mkdir()
    config = write_config(tmp, ["/bin/true"], repo=str(repo))
    if allowed is not None:
        text = config.read_text()
        config.write_text(
            text.replace("[repository]\n", f'[repository]\nallowed_signers = "{allowed}"\n', 1)
        )
    return config


async def timed_sync(engine: Engine) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), cpu_now()
    outcome = await engine.sync("manual")
    if outcome.result not in ("ok", "errors"):
        raise SystemExit(f"sync {outcome.result}: {outcome.message}")
    return time.perf_counter() - wall, cpu_now() - cpu


def verify_times(verifier: SignatureVerifier, sha: str, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        verifier._cache.clear()  # a new head each time, as far as the cache knows
        started = time.perf_counter()
        verdict = verifier.verify(sha)
        out.append(time.perf_counter() - started)
        if not verdict.trusted:
            raise SystemExit(f"not trusted: {verdict.reason}")
    return out


def gpg_verify_times(tmp: Path, repo: Path, rounds: int) -> list[float] | None:
    """Verification of a GnuPG-signed commit against a keyring (None: no gpg here)."""
    if shutil.which("gpg") is None:
        return None
    home = Path(tempfile.mkdtemp(prefix="gh-", dir="/tmp"))
    home.chmod(0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}

    def gpg(*args: str) -> bytes:
        return subprocess.run(
            ["gpg", "--batch", "--no-tty", *args], env=env, capture_output=True, check=True
        ).stdout

    try:
        gpg("--passphrase", "", "--quick-gen-key", "Bench <bench@example.com>", "ed25519")
        keyring = tmp / "keys.gpg"
        keyring.write_bytes(gpg("--export", "bench@example.com"))
        subprocess.run(
            ["git", "commit", "-q", "--allow-empty", "-S", "-m", "gpg signed"],
            cwd=repo,
            env={**env, "GIT_COMMITTER_NAME": "Bench", "GIT_COMMITTER_EMAIL": "bench@example.com"},
            check=True,
        )
        sha = git(repo, "rev-parse", "HEAD")
        state = tmp / "gpg-state"
        verifier = SignatureVerifier(read_allowed_signers(keyring), repo / ".git", state)
        verifier.prepare()
        return verify_times(verifier, sha, rounds)
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False)
        shutil.rmtree(home, ignore_errors=True)


async def run(tmp: Path, files: int, rounds: int) -> Table:
    repo = make_repo(tmp / "desired")
    for i in range(files):
        (repo / f"env{i:04d}.yaml").write_text(fleet_file(i, 5))
    key = ssh_key(tmp)
    allowed = tmp / "allowed_signers"
    allowed.write_text(
        f"bench@example.com {' '.join(Path(f'{key}.pub').read_text().split()[:2])}\n"
    )
    ssh_signed_commit(repo, key, "initial")
    signed_cfg = load_config(config_for(tmp / "signed", repo, allowed), environ={})
    plain_cfg = load_config(config_for(tmp / "plain", repo, None), environ={})
    mine: list[tuple[float, float]] = []
    base: list[tuple[float, float]] = []
    async with open_engine(signed_cfg) as signed, open_engine(plain_cfg) as plain:
        await signed.check_signers()
        for engine in (signed, plain):  # the first (full) load, not measured
            await timed_sync(engine)
        for n in range(rounds):
            say(f"round {n + 1}/{rounds}")
            i = n % files
            (repo / f"env{i:04d}.yaml").write_text(fleet_file(i, 5, version=f"2.{n}.0"))
            ssh_signed_commit(repo, key, f"round {n}")
            order = [(signed, mine), (plain, base)]
            for engine, into in order if n % 2 == 0 else reversed(order):
                into.append(await timed_sync(engine))
        verifier = signed.pipeline.verifier
        assert verifier is not None
        head = git(repo, "rev-parse", "HEAD")
        alone = verify_times(verifier, head, rounds)
        cached = []
        for _ in range(rounds):
            started = time.perf_counter()
            verifier.verify(head)
            cached.append(time.perf_counter() - started)
    gpg = gpg_verify_times(tmp, repo, rounds)

    table = Table(
        f"bench_signed: sync of a new signed head, {files} environment files; {machine()}"
    )
    wall_m, wall_b = median([w for w, _ in mine]), median([w for w, _ in base])
    cpu_m, cpu_b = median([c for _, c in mine]), median([c for _, c in base])
    table.add(
        "sync, SSH allowed_signers (median wall)",
        ms(wall_m),
        ms(wall_b) + " unsigned config",
        ratio(wall_m, wall_b),
    )
    table.add(
        "sync CPU incl. git children (median)",
        ms(cpu_m),
        ms(cpu_b) + " unsigned config",
        ratio(cpu_m, cpu_b),
    )
    table.add("added per new head (median wall)", ms(wall_m - wall_b))
    table.add("verification alone, SSH (median)", ms(median(alone)))
    if gpg is not None:
        table.add("verification alone, GnuPG (median)", ms(median(gpg)))
    else:
        table.note("gpg not installed: no GnuPG row")
    worst_cached = max(cached)
    table.add(
        "refused head looked at again (cached, max)",
        ms(worst_cached, 3),
        ms(median(alone)) + " verified again",
        ratio(worst_cached, median(alone)),
        "< 1 ms (no subprocess)",
        worst_cached < 0.001,
    )
    table.note(f"{rounds} rounds; each sync loads one changed file of {files}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="200 files, 60 rounds")
    parser.add_argument("--files", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    files = args.files or (200 if args.full else 20)
    rounds = args.rounds or (60 if args.full else 20)
    with tempfile.TemporaryDirectory(prefix="bench-signed-") as tmp:
        table = asyncio.run(run(Path(tmp), files, rounds))
    table.print()
    if any(row.met is False for row in table.rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
