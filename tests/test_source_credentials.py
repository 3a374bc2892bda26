"""Credentials in the repository URL reach git, but never git's command line (`ps`)."""

from __future__ import annotations

import os
import shutil
import threading
from base64 import b64encode
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from reconciler.source import GitSource, SourceError

pytestmark = pytest.mark.timeout(60)


class _AuthSeen(BaseHTTPRequestHandler):
    """A git HTTP server that wants Basic auth, records what it got, and has no repository."""

    seen: list[str] = []

    def do_GET(self) -> None:
        auth = self.headers.get("Authorization")
        if auth is None:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
        else:
            self.seen.append(auth)
            self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    _AuthSeen.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _AuthSeen)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_url_credentials_go_to_git_through_its_environment(
    tmp_path: Path, server: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch
):
    # Every git command line is recorded by a wrapper in front of the real git.
    real_git = shutil.which("git")
    argv_log = tmp_path / "argv.log"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "git").write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{argv_log}"\nexec {real_git} "$@"\n'
    )
    (bindir / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    port = server.server_address[1]
    url = f"http://ada:s3cret%40pw@127.0.0.1:{port}/desired.git"

    source = GitSource(url, "main", ".", tmp_path / "mirror.git")
    with pytest.raises(SourceError) as err:
        source.fetch()
    source.close()

    assert "s3cret" not in str(err.value)
    assert "Basic " + b64encode(b"ada:s3cret@pw").decode() in _AuthSeen.seen
    commands = argv_log.read_text()
    assert f"127.0.0.1:{port}/desired.git" in commands
    assert "s3cret" not in commands and "ada" not in commands
