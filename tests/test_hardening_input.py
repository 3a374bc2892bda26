"""Hostile or mistaken input: desired-state files, configurations, ids and numbers.

Each test writes real files and, where the item is about what a user sees, runs the real
CLI as a subprocess: bad input is one line on stderr with the SPEC's exit status, never a
traceback, never content that is not the user's YAML.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from desired_state import FileError, load_directory, one_line, parse_environment_file
from desired_state.loader import MAX_FILE_BYTES
from desired_state.models import MAX_PARAM_BYTES, MAX_PARAMS_BYTES
from reconciler.numbers import MAX_ID, OutOfRange, parse_int
from reconciler.times import parse_since
from tests.support import RECONCILER, World, cli_env

pytestmark = pytest.mark.timeout(120)

MINIMAL = """\
environment: staging
provider: local
services:
  api:
    version: "1.0"
"""


def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RECONCILER, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**cli_env(), **(env or {})},
        timeout=timeout,
    )


def assert_one_line_error(out: subprocess.CompletedProcess[str], code: int) -> str:
    """The command failed with ``code``, printing exactly one line, and no traceback."""
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr and "internal error" not in out.stderr
    return lines[0]


def validate(tmp_path: Path, files: dict[str, str | bytes]) -> subprocess.CompletedProcess[str]:
    folder = tmp_path / "desired"
    folder.mkdir(exist_ok=True)
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return cli("validate", "desired", cwd=tmp_path)


def errors_of(out: subprocess.CompletedProcess[str]) -> list[str]:
    return out.stderr.splitlines()


# ---- 15: every number is bounded at the schema -------------------------------------------


def test_a_timeout_beyond_seven_days_fails_validate(tmp_path):
    out = validate(
        tmp_path,
        {
            "a.yaml": MINIMAL + "timeout: 99999999999999999999\n",
            "b.yaml": MINIMAL.replace("staging", "prod") + "timeout: 7d\n",
            "c.yaml": MINIMAL.replace("staging", "qa") + "timeout: 604801\n",
        },
    )
    assert out.returncode == 1
    assert errors_of(out) == [
        "desired/a.yaml:6:10: timeout: bad duration '99999999999999999999': at most 7d",
        "desired/c.yaml:6:10: timeout: bad duration '604801': at most 7d",
    ]
    assert "1 valid environment" in out.stdout


def test_a_huge_timeout_never_reaches_the_runner(tmp_path):
    """Before: the file passed, and every backoff the runner died on it, recording nothing."""
    world = World(tmp_path)
    world.repo.set_env("staging", {"api": "1.0"}, timeout="99999999999999999999")
    out = world.cli("sync")
    assert out.returncode == 1, out.stderr
    assert "staging.yaml:6:10: timeout: bad duration" in out.stderr
    assert "Traceback" not in out.stderr and "internal error" not in out.stderr
    assert world.started() == []


def test_window_durations_and_strategy_numbers_are_bounded(tmp_path):
    text = MINIMAL + textwrap.dedent("""\
        strategy:
          type: canary
          steps: [10, 500, 99999999999999999999, "x"]
          interval: 99999999999d
        windows:
          - cron: "0 9 * * *"
            duration: 99999999999999999999999
          - cron: "0 9 * * *"
            duration: 366d
        """)
    parsed = parse_environment_file("env.yaml", text)
    assert parsed.environment is None
    assert [str(e) for e in parsed.errors] == [
        "env.yaml:8:15: strategy.steps.1: expected a percentage 0-100, got '500'",
        "env.yaml:8:20: strategy.steps.2: expected a percentage 0-100, got '99999999999999999999'",
        "env.yaml:8:42: strategy.steps.3: expected a percentage 0-100, got 'x'",
        "env.yaml:9:13: strategy.interval: bad duration '99999999999d': at most 7d",
        "env.yaml:12:15: windows.0.duration: bad duration '99999999999999999999999': at most 366d",
    ]
    ok = parse_environment_file(
        "env.yaml", MINIMAL + "strategy:\n  type: canary\n  steps: [10, 50, 100]\n"
    )
    assert ok.errors == []


def test_an_overlong_duration_text_is_one_plain_error():
    parsed = parse_environment_file("env.yaml", MINIMAL + "timeout: " + "9" * 5000 + "\n")
    assert len(parsed.errors) == 1
    message = parsed.errors[0].message
    assert message.startswith("bad duration '") and len(message) < 200


# ---- 16: params that cannot be deployed ----------------------------------------------------


def test_param_keys_that_cannot_be_variables_are_errors_at_the_key(tmp_path):
    text = MINIMAL + (
        "    params:\n"
        '      "a=b": x\n'
        '      "nul\\0key": y\n'
        "      9lives: z\n"
        "      ok-key: fine\n"
        "      ok_key: clash\n"
    )
    out = validate(tmp_path, {"env.yaml": text})
    assert out.returncode == 1
    assert errors_of(out)[:4] == [
        "desired/env.yaml:7:7: services.api.params.a=b: 'a=b' is not a valid param name:"
        " use letters, digits, _ and - (at most 64, not starting with a digit or -)",
        "desired/env.yaml:8:7: services.api.params.nul\\x00key: 'nul\\x00key' is not a valid"
        " param name: use letters, digits, _ and - (at most 64, not starting with a digit or -)",
        "desired/env.yaml:9:7: services.api.params.9lives: '9lives' is not a valid param name:"
        " use letters, digits, _ and - (at most 64, not starting with a digit or -)",
        "desired/env.yaml:11:7: services.api.params.ok_key: 'ok_key' and 'ok-key' would both"
        " be RECONCILER_PARAM_OK_KEY",
    ]


def test_param_values_are_bounded_in_content_size_and_depth(tmp_path):
    deep = "x"
    for _ in range(9):
        deep = f"[{deep}]"
    big = "v" * (MAX_PARAM_BYTES + 1)
    text = MINIMAL + (
        "    params:\n"
        '      nul: "a\\0b"\n'
        '      nested: {inner: ["ok", "x\\0y"]}\n'
        f"      deep: {deep}\n"
        f"      big: {big}\n"
    )
    out = validate(tmp_path, {"env.yaml": text})
    assert out.returncode == 1
    errors = errors_of(out)
    assert errors[:4] == [
        "desired/env.yaml:7:12: services.api.params.nul: contains a NUL character,"
        " which no provider can receive",
        "desired/env.yaml:8:30: services.api.params.nested.inner.1: contains a NUL character,"
        " which no provider can receive",
        "desired/env.yaml:9:21: services.api.params.deep.0.0.0.0.0.0.0.0:"
        " nested deeper than 8 levels",
        f"desired/env.yaml:10:12: services.api.params.big: too large:"
        f" {MAX_PARAM_BYTES + 1} bytes, at most {MAX_PARAM_BYTES}",
    ]
    assert big not in out.stderr  # an error names a value, it does not reproduce it


def test_all_params_of_a_service_together_are_bounded():
    count = MAX_PARAMS_BYTES // 20_000 + 1
    lines = "".join(f"      p{i}: {'v' * 20_000}\n" for i in range(count))
    parsed = parse_environment_file("env.yaml", MINIMAL + "    params:\n" + lines)
    assert [(e.path, e.message.split(":")[0]) for e in parsed.errors] == [
        ("services.api.params", "too large")
    ]
    assert (parsed.errors[0].line, parsed.errors[0].col) == (7, 7)


def test_a_50_mb_file_is_refused_without_being_read(tmp_path):
    """Before: 855 MB of memory, then `Argument list too long` at deploy time."""
    huge = tmp_path / "desired" / "env.yaml"
    huge.parent.mkdir()
    with huge.open("w") as f:
        f.write(MINIMAL + "    params:\n")
        line = "      k{}: " + "v" * 1000 + "\n"
        for i in range(50_000):
            f.write(line.format(i))
    assert huge.stat().st_size > 50_000_000
    out = cli("validate", "desired", cwd=tmp_path, timeout=30)
    assert out.returncode == 1
    assert errors_of(out) == ["desired/env.yaml:1:1: file too large: at most 1024 KiB"]
    # the same bound holds for content from git (or any other reader)
    parsed = parse_environment_file("x.yaml", b"#" * (MAX_FILE_BYTES + 1))
    assert [e.message for e in parsed.errors] == ["file too large: at most 1024 KiB"]


# ---- 17: validate DIR reads the user's YAML and nothing else -------------------------------


SECRET = "hunter2-this-is-a-private-key"


def test_links_out_of_the_folder_are_not_followed(tmp_path):
    (tmp_path / "secret.yaml").write_text(f"{SECRET}\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "env.yaml").write_text(f"environment: {SECRET}\n")
    folder = tmp_path / "desired"
    (folder / "real").mkdir(parents=True)
    (folder / "real" / "ok.yaml").write_text(MINIMAL)
    (folder / "leak.yaml").symlink_to(tmp_path / "secret.yaml")
    (folder / "relative.yml").symlink_to(Path("..") / "secret.yaml")
    (folder / "linked-dir").symlink_to(tmp_path / "outside")
    (folder / "inside.yaml").symlink_to(Path("real") / "ok.yaml")  # stays in the folder
    out = cli("validate", "desired", cwd=tmp_path)
    assert SECRET not in out.stdout + out.stderr
    assert out.returncode == 1
    assert errors_of(out) == [
        "desired/leak.yaml:1:1: a symbolic link to outside the folder: not read",
        # a link inside the folder is read: here, the same file twice
        "desired/real/ok.yaml:1:14: environment: environment 'staging' is also declared in"
        " desired/inside.yaml",
        "desired/relative.yml:1:1: a symbolic link to outside the folder: not read",
    ]


def test_a_fifo_or_device_named_yaml_is_not_opened(tmp_path):
    folder = tmp_path / "desired"
    folder.mkdir()
    (folder / "ok.yaml").write_text(MINIMAL)
    os.mkfifo(folder / "pipe.yaml")  # opening it for reading would block forever
    state = load_directory(folder)
    assert [str(e) for e in state.errors] == [
        f"{folder}/pipe.yaml:1:1: not a regular file: not read"
    ]
    assert sorted(state.environments) == ["staging"]


def test_messages_quote_at_most_a_short_part_of_a_value():
    value = "s" * 5000
    for content in (f"environment: {value}\nprovider: p\n", f"{value}\n"):
        parsed = parse_environment_file("env.yaml", content)
        text = " ".join(str(e) for e in parsed.errors)
        assert value not in text and "'" + "s" * 60 + "...'" in text


# ---- 18: configuration mistakes are exit 2, one line ---------------------------------------


def _config(tmp_path: Path, body: str | bytes) -> Path:
    (tmp_path / "desired").mkdir(exist_ok=True)
    path = tmp_path / "reconciler.toml"
    if isinstance(body, str):
        body = ('[repository]\nurl = "desired"\n' + body).encode()
    path.write_bytes(body)
    return path


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'[repository]\nurl = "x"\n# caf\xe9\n', "reconciler.toml:3: not UTF-8 text"),
        (
            b"a = " + b"[" * 5000 + b"]" * 5000 + b"\n",
            "reconciler.toml: arrays or tables nested too deeply",
        ),
        ('[database]\nurl = "mysql://u@h/db"\n', "database.url: unknown database scheme 'mysql'"),
        ('[database]\nurl = "::::"\n', "database.url: not a database URL"),
        ('[database]\nurl = "postgresql://u@h/db"\n', "database.url: use postgresql+psycopg://"),
        ('branch = "a..b"\n', "repository.branch: 'a..b' is not a valid git branch name"),
        ('branch = "-f"\n', "repository.branch: '-f' is not a valid git branch name"),
        ('branch = "x.lock"\n', "repository.branch: 'x.lock' is not a valid git branch name"),
        ("[daemon]\nshutdown_grace = nan\n", "daemon.shutdown_grace: expected a duration"),
        ("[daemon]\nretry_backoff = inf\n", "daemon.retry_backoff: expected a duration"),
        ("[daemon]\nkill_grace = 1e300\n", "daemon.kill_grace: a duration must be at most 365d"),
        ('poll_interval = "99999999999d"\n', "repository.poll_interval: a duration must be"),
        (
            "[daemon]\nretries = 100\n",
            "daemon: retries = 100 with retry_backoff = 30s would wait more than 365d",
        ),
        (
            '[[notifications]]\ntype = "webhook"\nurl = "http://h/"\nmax_attempts = 5000\n',
            "max_attempts",
        ),
        ('[daemon]\nstate_dir = "a-file"\n', "daemon.state_dir: "),
        ('[daemon]\nstate_dir = "a-file/below"\n', "daemon.state_dir: "),
        ('[daemon]\nstate_dir = "/sys/kernel"\n', "daemon.state_dir: cannot write in /sys/kernel"),
    ],
)
def test_configuration_mistakes_exit_2_with_one_line(tmp_path, body, expected):
    (tmp_path / "a-file").write_text("not a folder\n")
    if "/sys/kernel" in str(body) and not Path("/sys/kernel").is_dir():
        pytest.skip("no /sys/kernel (a folder no one may write in) here")
    config = _config(tmp_path, body)
    for command in (("history",), ("status",)):
        out = cli("--config", str(config), *command, cwd=tmp_path)
        line = assert_one_line_error(out, 2)
        assert expected in line, line
        assert line.startswith(f"reconciler: {config}") or "reconciler.toml" in line


def test_a_state_dir_that_is_a_file_names_it(tmp_path):
    (tmp_path / "a-file").write_text("x")
    config = _config(tmp_path, '[daemon]\nstate_dir = "a-file"\n')
    line = assert_one_line_error(cli("--config", str(config), "sync", cwd=tmp_path), 2)
    assert line == f"reconciler: {config}: daemon.state_dir: {tmp_path}/a-file is not a directory"


def test_an_environment_override_is_checked_like_the_file(tmp_path):
    config = _config(tmp_path, "")
    out = cli(
        "--config",
        str(config),
        "history",
        cwd=tmp_path,
        env={"RECONCILER_DAEMON__SHUTDOWN_GRACE": "nan"},
    )
    assert "daemon.shutdown_grace: expected a duration" in assert_one_line_error(out, 2)


def test_shutdown_grace_nan_never_reaches_the_daemon(tmp_path):
    """Before: the daemon started, and crashed on SIGTERM computing its deadline."""
    config = _config(tmp_path, '[server]\nlisten = ""\n[daemon]\nshutdown_grace = nan\n')
    out = cli("--config", str(config), "run", cwd=tmp_path, timeout=30)
    assert "daemon.shutdown_grace" in assert_one_line_error(out, 2)


# ---- 19: numbers too large for the database ------------------------------------------------


def test_parse_int_bounds():
    assert parse_int("42") == 42 and parse_int("-3", low=-5) == -3
    assert parse_int(str(MAX_ID)) == MAX_ID
    for raw in (str(MAX_ID + 1), "9" * 5000, "0"):
        with pytest.raises(OutOfRange):
            parse_int(raw, low=1)
    for raw in ("", "x", "1.0", "²", "1e3", " 1"):
        with pytest.raises(ValueError) as info:
            parse_int(raw)
        assert not isinstance(info.value, OutOfRange)
    with pytest.raises(ValueError):
        parse_int("+1", signed=False)


def test_show_of_an_id_beyond_any_record(tmp_path):
    world = World(tmp_path)
    line = assert_one_line_error(world.cli("show", "9223372036854775808"), 1)
    assert line == "reconciler: no deployment 9223372036854775808"
    line = assert_one_line_error(world.cli("show", "9" * 5000), 1)
    assert line == "reconciler: no deployment " + "9" * 30 + "..."
    line = assert_one_line_error(world.cli("show", "abc"), 2)
    assert "'abc' is not a deployment id" in line


def test_since_that_overflows_is_a_usage_error(tmp_path):
    world = World(tmp_path)
    for since in ("99999999999d", "999999999999999999999999s", "0001-01-01T00:00:00+14:00"):
        line = assert_one_line_error(world.cli("history", "--since", since), 2)
        assert "--since" in line
    with pytest.raises(ValueError):
        parse_since("99999999999999d")


# ---- 20: every error is one line ----------------------------------------------------------


def test_one_line_escapes_every_line_break_and_control():
    assert one_line("plain text, ünïcode") == "plain text, ünïcode"
    assert (
        one_line("a\nb\r\tc\x00d\x1b[31m\u2028e\x85") == "a\\nb\\r\\tc\\x00d\\x1b[31m\\u2028e\\x85"
    )
    error = FileError("a\nb.yaml", 1, 2, "services.x\ny", "bad 'v\n1'")
    assert "\n" not in str(error) and str(error) == "a\\nb.yaml:1:2: services.x\\ny: bad 'v\\n1'"


def test_validate_errors_are_one_line_each(tmp_path):
    files = {
        "env.yaml": 'environment: prod\nprovider: local\nservices:\n  api:\n    version: "1\\nx"\n',
        "new\nline.yaml": MINIMAL.replace("  api:", '  "a\\nb":'),
    }
    out = validate(tmp_path, files)
    assert out.returncode == 1
    assert errors_of(out) == [
        "desired/env.yaml:5:14: services.api.version: '1\\nx' is not a valid version:"
        " use letters, digits and . _ + -",
        "desired/new\\nline.yaml:4:3: services.a\\nb: 'a\\nb' is not a valid service name:"
        " use letters, digits and . _ - (at most 63, starting and ending with a letter or digit)",
    ]
    as_json = json.loads(cli("validate", "desired", "--json", cwd=tmp_path).stdout)
    assert all("\n" not in e["message"] for e in as_json["errors"])


def test_cli_errors_quoting_user_text_are_one_line(tmp_path):
    world = World(tmp_path)
    world.repo.set_env("staging", {"api": "1.0"})
    world.cli("sync", check=True)
    cases = [
        (("deploy", "--env", "staging", "--version", "1\nx"), 2, "'1\\nx' is not a valid version"),
        (("rollback", "--env", "staging", "--service", "api", "--to", "1\nx"), 1, "version 1\\nx"),
        (("status", "--env", "x\ny"), 2, "unknown environment 'x\\ny'"),
        (("history", "--limit", "0\n1"), 2, "'0\\n1' is not a valid integer"),
    ]
    for args, code, expected in cases:
        line = assert_one_line_error(world.cli(*args), code)
        assert expected in line, line


def test_usage_errors_are_one_line_at_every_level(tmp_path):
    for args in (("--bogus",), ("nosuch",), ("db", "--bogus"), ("history", "--limit", "x")):
        line = assert_one_line_error(cli(*args, cwd=tmp_path), 2)
        assert line.startswith("reconciler: ") and "--help')" in line
    alone = cli(cwd=tmp_path)  # the bare command still shows its help
    assert "[OPTIONS] COMMAND [ARGS]..." in alone.stdout + alone.stderr


def test_a_records_error_message_is_one_line(tmp_path):
    """stderr of a failing run is quoted in the record: its control characters are not."""
    world = World(tmp_path)
    script = tmp_path / "deploy.sh"
    script.write_text('#!/usr/bin/env bash\nprintf "bad\\rworse\\033[2J\\n" >&2\nexit 4\n')
    world.repo.set_env("staging", {"api": "1.0"})
    out = world.cli("sync")
    assert out.returncode == 1
    record = json.loads(world.cli("history", "--json", check=True).stdout)[0]
    assert record["status"] == "failed"
    assert record["error_message"].endswith("bad\\rworse\\x1b[2J")
    shown = world.cli("show", str(record["id"]), check=True).stdout
    error_line = next(line for line in shown.splitlines() if "exit status 4" in line)
    assert error_line.endswith("bad\\rworse\\x1b[2J")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_http_numbers_beyond_the_database_are_4xx_not_500(tmp_path, anyio_backend):
    from tests.test_http import make_config, start

    h = await start(tmp_path, make_config(tmp_path))
    try:
        rec = h.deploy()
        huge = str(MAX_ID + 1)
        for path in (f"/api/v1/deployments/{huge}", f"/api/v1/deployments/{'9' * 5000}"):
            r = await h.client.get(path)
            assert r.status_code == 404 and r.json()["error"].startswith("no deployment 9")
        r = await h.client.get(f"/api/v1/deployments/{huge}/events")
        assert r.status_code == 404
        cases = [
            ({"before": huge}, f"parameter 'before' must be at most {MAX_ID}"),
            ({"before": "²"}, "parameter 'before' must be an integer"),
            ({"limit": "9" * 5000}, "parameter 'limit' must be between 1 and 1000"),
            ({"since": "99999999999d"}, "parameter 'since' must be a time"),
            ({"since": "0001-01-01T00:00:00+14:00"}, "parameter 'since' must be a time"),
        ]
        for params, expected in cases:
            r = await h.client.get("/api/v1/deployments", params=params)
            assert r.status_code == 400, (params, r.text)
            assert r.json()["error"].startswith(expected), r.json()
        r = await h.client.get("/api/v1/deployments", params={"before": str(MAX_ID)})
        assert r.status_code == 200 and [d["id"] for d in r.json()] == [rec.id]
        for last in (huge.encode(), "²".encode("latin-1")):
            r = await h.client.get(
                f"/api/v1/deployments/{rec.id}/events", headers={"Last-Event-ID": last}
            )
            assert r.status_code == 400 and "Last-Event-ID" in r.json()["error"]
    finally:
        await h.client.aclose()
        await h.server.stop()


def test_the_json_schema_carries_the_bounds():
    jsonschema = pytest.importorskip("jsonschema")
    from desired_state import json_schema

    validator = jsonschema.Draft202012Validator(json_schema())
    base = {"environment": "e", "provider": "p", "services": {"api": {"version": "1"}}}
    assert validator.is_valid({**base, "timeout": 604800})
    assert not validator.is_valid({**base, "timeout": 604801})
    bad_key = {"api": {"version": "1", "params": {"a=b": "x"}}}
    assert not validator.is_valid({**base, "services": bad_key})
    window = {"cron": "0 9 * * *", "duration": 366 * 86400 + 1}
    assert not validator.is_valid({**base, "windows": [window]})


def test_strategy_parameters_together_fit_one_variable():
    """They reach a command as one variable (RECONCILER_STRATEGY): one param's bound."""
    lines = "".join(f"  p{i}: {'v' * 10_000}\n" for i in range(4))
    parsed = parse_environment_file("env.yaml", MINIMAL + "strategy:\n" + lines)
    assert [(e.path, e.message.split(": ")[0]) for e in parsed.errors] == [
        ("strategy", "too large")
    ]
    assert parsed.errors[0].message.endswith(f"bytes in all, at most {MAX_PARAM_BYTES}")


def test_a_configuration_that_never_ends_is_not_read_forever(tmp_path):
    out = cli("--config", "/dev/zero", "history", cwd=tmp_path, timeout=30)
    assert assert_one_line_error(out, 2) == (
        "reconciler: configuration file /dev/zero is larger than 1 MiB"
    )


def test_validate_dir_needs_no_write_access_to_the_state_dir(tmp_path):
    """It reads only provider names from the configuration; a state_dir in the way of
    ever being a folder is still a mistake."""
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no /sys/kernel (a folder no one may write in) here")
    folder = tmp_path / "envs"
    folder.mkdir()
    (folder / "env.yaml").write_text(MINIMAL)
    providers = '[providers.local]\ntype = "command"\ncommand = ["true"]\n'
    config = _config(tmp_path, '[daemon]\nstate_dir = "/sys/kernel"\n' + providers)
    out = cli("--config", str(config), "validate", "envs", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (tmp_path / "a-file").write_text("x")
    config = _config(tmp_path, '[daemon]\nstate_dir = "a-file"\n' + providers)
    out = cli("--config", str(config), "validate", "envs", cwd=tmp_path)
    assert "daemon.state_dir" in assert_one_line_error(out, 2)
