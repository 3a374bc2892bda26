from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.config import ConfigError, load_config
from reconciler.providers import build_providers

GOOD = """
[repository]
url = "repo"
branch = "main"
poll_interval = "2m"

[database]
url = "sqlite:///db/r.db"

[daemon]
state_dir = "st"
retries = 5
retry_backoff = 45

[providers.local]
type = "command"
command = ["./deploy.sh", "{environment}"]
workdir = "bin"
env = { API_TOKEN = "s3cret-value" }
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "reconciler.toml"
    p.write_text(text)
    return p


def test_paths_are_relative_to_the_file_and_durations_parse(tmp_path):
    c = load_config(write(tmp_path, GOOD), environ={})
    assert c.repository_url == str(tmp_path / "repo")
    assert c.state_dir == tmp_path / "st"
    assert c.database_url == f"sqlite:///{tmp_path / 'db' / 'r.db'}"
    assert c.repository.poll_interval == 120.0
    assert c.daemon.retry_backoff == 45.0
    assert c.daemon.retries == 5
    providers = build_providers(c)
    assert providers["local"].type == "command"
    assert "s3cret-value" in providers["local"].secrets()


def test_default_database_is_sqlite_in_the_state_dir(tmp_path):
    c = load_config(write(tmp_path, '[repository]\nurl = "/srv/x"\n'), environ={})
    assert c.database_url == f"sqlite:///{tmp_path / 'state' / 'reconciler.db'}"
    assert c.repository_url == "/srv/x"


def test_env_overrides(tmp_path):
    environ = {
        "RECONCILER_DAEMON__MAX_PARALLEL": "9",
        "RECONCILER_REPOSITORY__URL": "https://git.example.com/x.git",
        "RECONCILER_DATABASE__URL": "postgresql+psycopg://u@h/db",
        "RECONCILER_CONFIG": "/ignored/when/path/given",
    }
    c = load_config(write(tmp_path, GOOD), environ=environ)
    assert c.daemon.max_parallel == 9
    assert c.repository_url == "https://git.example.com/x.git"
    assert c.database_url == "postgresql+psycopg://u@h/db"


def test_config_path_from_environment(tmp_path):
    p = write(tmp_path, GOOD)
    assert load_config(None, environ={"RECONCILER_CONFIG": str(p)}).daemon.retries == 5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[repository]\nurl = "x"\nbogus = 1\n', "repository.bogus: unknown key"),
        ("[daemon]\nretries = 2\n", "repository: required key missing"),
        (
            '[repository]\nurl = "x"\npoll_interval = "5x"\n',
            "repository.poll_interval: bad duration",
        ),
        ('[repository]\nurl = "x"\n[daemon]\nmax_parallel = 0\n', "daemon.max_parallel:"),
        ('[repository\nurl = "x"\n', "reconciler.toml"),
        ('[repository]\nurl = "x"\n[providers.a]\ntype = "FTP"\n', "providers.a.type:"),
        ('[repository]\nurl = "x"\n[daemon]\ntimezone = "Mars/Base"\n', "unknown time zone"),
    ],
)
def test_mistakes_are_one_line_naming_the_key(tmp_path, text, expected):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ={})
    msg = str(info.value)
    assert expected in msg and "\n" not in msg


@pytest.mark.parametrize(
    ("provider", "expected"),
    [
        ('type = "command"\n', "providers.p.command: expected a non-empty list"),
        ('type = "command"\ncommand = "deploy.sh"\n', "providers.p.command"),
        ('type = "command"\ncommand = ["x"]\nshell = true\n', "providers.p.shell: unknown key"),
        ('type = "ftp"\n', "providers.p.type: unknown provider type 'ftp'"),
    ],
)
def test_provider_settings_are_checked(tmp_path, provider, expected):
    c = load_config(
        write(tmp_path, f'[repository]\nurl = "x"\n[providers.p]\n{provider}'), environ={}
    )
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        build_providers(c)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})


@pytest.mark.parametrize(
    ("url", "remote"),
    [
        ("deploy@git.example.com:org/state.git", True),
        ("git@github.com:team/state.git", True),
        ("ssh://git@host/x.git", True),
        ("https://host/x.git", True),
        ("file:///srv/x", True),
        ("state-repo", False),
        ("./odd:name", False),
    ],
)
def test_repository_urls_local_paths_resolve_and_remote_ones_stay(tmp_path, url, remote):
    c = load_config(write(tmp_path, f'[repository]\nurl = "{url}"\n'), environ={})
    assert (c.repository_url == url) is remote
    if not remote:
        assert c.repository_url.startswith(str(tmp_path))


def test_a_missing_allowed_signers_file_is_a_configuration_error(tmp_path):
    """Commits are verified against it: without it, nothing could be trusted."""
    text = GOOD.replace('poll_interval = "2m"', 'poll_interval = "2m"\nallowed_signers = "keys"')
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), environ={})
    message = str(err.value)
    assert (
        "repository.allowed_signers" in message and f"{tmp_path / 'keys'} does not exist" in message
    )
    assert "\n" not in message
    # The same through the environment override.
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(
            write(tmp_path, GOOD), environ={"RECONCILER_REPOSITORY__ALLOWED_SIGNERS": "keys"}
        )


def test_a_missing_allowed_signers_file_exits_2_with_one_line(tmp_path):
    import subprocess

    from tests.support import RECONCILER, cli_env

    text = GOOD.replace('poll_interval = "2m"', 'poll_interval = "2m"\nallowed_signers = "keys"')
    out = subprocess.run(
        [*RECONCILER, "--config", str(write(tmp_path, text)), "run"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "keys does not exist" in out.stderr
