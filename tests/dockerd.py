"""A real Docker Engine for the tests: `dockerd` on a socket of its own, images made offline.

The engine runs with vfs storage, no iptables and no default bridge, so it needs nothing
from the host but root. No registry on the internet is reachable: images are a rootfs tar
holding busybox (`docker import`), given a HEALTHCHECK and a behaviour by `docker commit
--change`. The behaviour follows the MODE variable baked into each image:

  app:1.0, 1.1, 2.0, 3.0  healthy after one probe (300 ms)
  app:2.0-unhealthy       its healthcheck fails
  app:2.0-exits           exits at once with status 3 after "boom: cannot start" on stderr
  app:2.0-slow            healthcheck in a 300 s start period: never healthy in a test
  plain:1.0               no healthcheck (ready after `ready_seconds` of running)

`registry` adds a local registry (Debian's docker-registry) holding reg/app:5.0 that the
engine does not have, so a deployment really pulls it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.errors import DockerException, NotFound

APP_CMD = (
    'trap "exit 0" TERM; '
    'if [ "$MODE" = exit ]; then echo "boom: cannot start" >&2; exit 3; fi; '
    "sleep 3600 & wait"
)
HEALTHY = 'HEALTHCHECK --interval=300ms --timeout=5s --retries=1 CMD [ "$MODE" != unhealthy ]'
SLOW = "HEALTHCHECK --interval=1s --timeout=5s --start-period=300s --retries=1 CMD false"
NETWORK = "reconciler-test"
# The test network's Linux bridge is named after the test process, so that a bridge left by a
# run that was killed (a bridge outlives its dockerd) can be found and removed: left there,
# such bridges use up dockerd's default address pools (~30) and no network can be created.
BRIDGE_PREFIX = "rctest"


def _remove_stale_bridges() -> None:
    """Delete bridges of earlier test runs whose process is gone."""
    try:
        names = os.listdir("/sys/class/net")
    except OSError:
        return
    for name in names:
        pid = name.removeprefix(BRIDGE_PREFIX)
        if name.startswith(BRIDGE_PREFIX) and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            subprocess.run(["ip", "link", "delete", name], capture_output=True, check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rootfs(extra: bytes = b"") -> bytes:
    """A tar of /bin/busybox with its applets as symlinks (plus an optional payload)."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(busybox, arcname="bin/busybox")
        for applet in ("sh", "sleep", "test", "[", "httpd", "cat", "echo", "false", "true"):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            tar.addfile(info)
        if extra:
            info = tarfile.TarInfo("payload")
            info.size = len(extra)
            tar.addfile(info, io.BytesIO(extra))
    return buf.getvalue()


@dataclass
class Dockerd:
    host: str
    root: Path
    api: docker.APIClient

    def cli(self, *args: str, input: bytes | None = None) -> str:
        env = {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "0"}
        out = subprocess.run(
            ["docker", *args], env=env, input=input, capture_output=True, check=False
        )
        if out.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: {out.stderr.decode()}")
        return out.stdout.decode().strip()

    def import_image(self, tag: str | None, mode: str, extra: bytes = b"") -> str:
        cmd = "CMD " + json.dumps(["sh", "-c", APP_CMD])
        changes = ["--change", f"ENV MODE={mode}", "--change", cmd]
        return self.cli("import", *changes, "-", *([tag] if tag else []), input=_rootfs(extra))

    def commit(self, image: str, tag: str, *changes: str) -> None:
        cid = self.cli("create", image)
        try:
            args = [a for c in changes for a in ("--change", c)]
            self.cli("commit", *args, cid, tag)
        finally:
            self.cli("rm", cid)

    def make_images(self) -> None:
        base = self.import_image("plain:1.0", "ok")
        self.commit(base, "app:1.0", HEALTHY)
        for tag in ("1.1", "2.0", "3.0"):
            self.cli("tag", "app:1.0", f"app:{tag}")
        self.commit(base, "app:2.0-unhealthy", HEALTHY, "ENV MODE=unhealthy")
        self.commit(base, "app:2.0-exits", HEALTHY, "ENV MODE=exit")
        self.commit(base, "app:2.0-slow", SLOW)
        _remove_stale_bridges()
        bridge = f"{BRIDGE_PREFIX}{os.getpid()}"[:15]  # an interface name has 15 characters
        self.api.create_network(
            NETWORK, driver="bridge", options={"com.docker.network.bridge.name": bridge}
        )

    def container(self, name: str) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = self.api.inspect_container(name)
        except NotFound:
            return None
        return info

    def names(self, prefix: str) -> list[str]:
        """Names of all containers (any state) whose name starts with `prefix`."""
        out = []
        for c in self.api.containers(all=True):
            name = c["Names"][0].lstrip("/")
            if name.startswith(prefix):
                out.append(name)
        return sorted(out)


class EngineUnavailable(Exception):
    """dockerd is missing or cannot start here (the tests skip, saying why)."""


@contextlib.contextmanager
def running_dockerd() -> Iterator[Dockerd]:
    """A dockerd of our own, with the test images; stopped and removed at the end."""
    exe = shutil.which("dockerd")
    if exe is None or shutil.which("docker") is None:
        raise EngineUnavailable(
            "dockerd/docker not installed (Debian docker.io; .ci/run installs it)"
        )
    # Short paths: containerd's sockets live under the exec root (108-byte socket limit).
    root = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))
    sock = root / "d.sock"
    host = f"unix://{sock}"
    logfile = (root / "dockerd.log").open("wb")
    proc = subprocess.Popen(
        [
            exe,
            "--storage-driver=vfs",
            "--iptables=false",
            "--bridge=none",
            f"--data-root={root / 'data'}",
            f"--exec-root={root / 'x'}",
            f"--pidfile={root / 'pid'}",
            "-H",
            host,
        ],
        stdout=logfile,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        api = _wait_up(proc, host, root / "dockerd.log")
        engine = Dockerd(host, root, api)
        engine.make_images()
        yield engine
        for c in api.containers(all=True):  # SIGKILL now rather than a stop timeout each
            with contextlib.suppress(DockerException):
                api.remove_container(c["Id"], force=True)
        with contextlib.suppress(DockerException):  # its bridge would outlive dockerd
            api.remove_network(NETWORK)
        api.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logfile.close()
        shutil.rmtree(root, ignore_errors=True)


def _wait_up(proc: subprocess.Popen[bytes], host: str, log: Path) -> docker.APIClient:
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise EngineUnavailable(
                f"dockerd cannot start here (exit {proc.returncode}): {' | '.join(tail)}"
            )
        try:
            api = docker.APIClient(base_url=host, timeout=60)
            api.ping()
            return api
        except DockerException:
            if time.monotonic() > deadline:
                raise EngineUnavailable("dockerd did not answer within 60 s") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def dockerd() -> Iterator[Dockerd]:
    try:
        with running_dockerd() as engine:
            yield engine
    except EngineUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def registry(dockerd: Dockerd) -> Iterator[str]:
    """`127.0.0.1:PORT/app`, holding tag 5.0 (a healthy image) that the engine lacks."""
    exe = shutil.which("docker-registry")
    if exe is None:
        pytest.skip("docker-registry not installed (Debian docker-registry; .ci/run installs it)")
    port = free_port()
    config = dockerd.root / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        f"storage:\n  filesystem:\n    rootdirectory: {dockerd.root / 'registry'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    proc = subprocess.Popen(
        [exe, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.skip("docker-registry did not start")
                time.sleep(0.05)
        repo = f"127.0.0.1:{port}/app"
        # A layer of its own (1 MiB of noise), so that the pull really downloads bytes.
        base = dockerd.import_image(None, "ok", extra=os.urandom(1 << 20))
        dockerd.commit(base, f"{repo}:5.0", HEALTHY)
        dockerd.cli("push", f"{repo}:5.0")
        dockerd.cli("rmi", f"{repo}:5.0")
        with contextlib.suppress(AssertionError):
            dockerd.cli("rmi", base)
        yield repo
    finally:
        proc.terminate()
        proc.wait(10)
