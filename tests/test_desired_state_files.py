"""One environment file: text-first YAML, and every error with its exact position."""

import textwrap

import pytest

from desired_state.errors import FileError
from desired_state.loader import parse_environment_file
from tests.support import SPEC_EXAMPLE

MINIMAL = """\
environment: staging
provider: local
services:
  api:
    version: "1"
"""


def parse(tmp_path, text, name="env.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return parse_environment_file(name, path.read_bytes())


def messages(parsed):
    return [str(e) for e in parsed.errors]


# --- valid files -------------------------------------------------------------------------


def test_spec_example_parses_with_exact_values(tmp_path):
    parsed = parse(tmp_path, SPEC_EXAMPLE, "production.yaml")
    assert parsed.errors == []
    assert parsed.env_name == "production"
    env = parsed.environment
    assert env is not None
    assert env.environment == "production"
    assert env.provider == "k8s-prod"
    assert list(env.services) == ["api", "worker"]
    assert env.services["api"].version == "1.4.2"
    assert env.services["api"].params == {"deployment": "api"}
    assert env.services["worker"].version == "1.10"
    assert env.services["worker"].params == {}
    assert env.timeout == 1800
    assert env.strategy.type == "canary"
    assert env.strategy_dict() == {"type": "canary", "steps": ["10", "50", "100"]}
    assert env.on_failure == "rollback"
    assert env.depends_on == ["staging"]
    assert len(env.windows) == 1
    assert env.windows[0].cron == "0 9 * * mon-fri"
    assert env.windows[0].duration == 8 * 3600
    assert env.windows[0].timezone is None
    assert env.suspended is False


def test_defaults(tmp_path):
    env = parse(tmp_path, MINIMAL).environment
    assert env is not None
    assert env.timeout == 1800
    assert env.strategy.type == "rolling"
    assert env.strategy_dict() == {"type": "rolling"}
    assert env.on_failure == "stop"
    assert env.depends_on == []
    assert env.windows == []
    assert env.suspended is False


@pytest.mark.parametrize(
    ("written", "read"),
    [
        ("1.10", "1.10"),
        ("1.0", "1.0"),
        ("1e3", "1e3"),
        ("0x1F", "0x1F"),
        ("010", "010"),
        ("'2.0'", "2.0"),
        ("!!float 1.50", "1.50"),
        ("2024-01-01", "2024-01-01"),
    ],
)
def test_versions_are_always_text(tmp_path, written, read):
    env = parse(tmp_path, MINIMAL.replace('version: "1"', f"version: {written}")).environment
    assert env is not None
    assert env.services["api"].version == read


def test_no_implicit_float_or_bool_anywhere(tmp_path):
    text = MINIMAL + textwrap.dedent("""\
          worker:
            version: 2.50
            params:
              replicas: 3
              ratio: 0.50
              enabled: yes
              off: no
              on: true
              empty:
              tilde: ~
              quoted_null: "null"
              list: [1, 1.0, false, null]
        strategy:
          type: blue_green
          yes: on
          pause: 1.0
        """)
    env = parse(tmp_path, text).environment
    assert env is not None
    params = env.services["worker"].params
    assert env.services["worker"].version == "2.50"
    assert params == {
        "replicas": "3",
        "ratio": "0.50",
        "enabled": "yes",
        "off": "no",
        "on": "true",
        "empty": None,
        "tilde": None,
        "quoted_null": "null",
        "list": ["1", "1.0", "false", None],
    }
    assert env.strategy_dict() == {"type": "blue_green", "yes": "on", "pause": "1.0"}


@pytest.mark.parametrize(("written", "value"), [("true", True), ("false", False), ('"true"', True)])
def test_suspended_true_false(tmp_path, written, value):
    env = parse(tmp_path, MINIMAL + f"suspended: {written}\n").environment
    assert env is not None
    assert env.suspended is value


@pytest.mark.parametrize(
    ("written", "seconds"), [("90", 90), ("90s", 90), ("2h", 7200), ("1h30m", 5400)]
)
def test_timeout_forms(tmp_path, written, seconds):
    env = parse(tmp_path, MINIMAL + f"timeout: {written}\n").environment
    assert env is not None
    assert env.timeout == seconds


def test_services_keep_file_order(tmp_path):
    names = ["zeta", "alpha", "Mid.svc", "b_2", "a-1"]
    text = "environment: e\nprovider: p\nservices:\n" + "".join(
        f"  {n}:\n    version: v{i}\n" for i, n in enumerate(names)
    )
    env = parse(tmp_path, text).environment
    assert env is not None
    assert list(env.services) == names


def test_anchors_aliases_and_merge_keys(tmp_path):
    text = """\
    environment: e
    provider: p
    services:
      api:
        version: "1"
        params: &common
          region: eu
          replicas: 2
      worker:
        version: "1"
        params:
          <<: *common
          replicas: 5
    """
    env = parse(tmp_path, text).environment
    assert env is not None
    assert env.services["api"].params == {"region": "eu", "replicas": "2"}
    assert env.services["worker"].params == {"region": "eu", "replicas": "5"}


def test_empty_optional_collections_mean_default(tmp_path):
    text = """\
    environment: e
    provider: p
    services:
      api:
        version: "1"
        params:
          # deployment: api
    depends_on:
    windows:
    strategy:
    """
    env = parse(tmp_path, text).environment
    assert env is not None
    assert env.services["api"].params == {}
    assert env.depends_on == []
    assert env.windows == []
    assert env.strategy.type == "rolling"


def test_window_with_timezone(tmp_path):
    text = MINIMAL + textwrap.dedent("""\
        windows:
          - cron: "30 22 * * sat,sun"
            duration: 1h30m
            timezone: Europe/Paris
        """)
    env = parse(tmp_path, text).environment
    assert env is not None
    assert env.windows[0].timezone == "Europe/Paris"
    assert env.windows[0].duration == 5400


def test_trailing_document_marker_is_not_a_second_document(tmp_path):
    parsed = parse(tmp_path, "---\n" + MINIMAL + "---\n")
    assert parsed.errors == []


# --- YAML-level errors -------------------------------------------------------------------


def test_syntax_error_position(tmp_path):
    text = "environment: e\nprovider: p\nservices:\n  api:\n    version: [1\n"
    parsed = parse(tmp_path, text)
    assert parsed.environment is None
    assert len(parsed.errors) == 1
    err = parsed.errors[0]
    assert (err.file, err.line, err.col, err.path) == ("env.yaml", 6, 1, "")
    assert err.message.startswith("YAML syntax error: ")
    assert str(err).startswith("env.yaml:6:1: YAML syntax error: ")


def test_syntax_error_mapping_values(tmp_path):
    parsed = parse(tmp_path, "environment: e\nprovider: a: b\n")
    assert messages(parsed) == [
        "env.yaml:2:12: YAML syntax error: mapping values are not allowed in this context"
    ]


def test_tab_indentation_is_a_syntax_error(tmp_path):
    parsed = parse(tmp_path, "environment: e\nservices:\n\tapi: 1\n")
    assert parsed.environment is None
    assert parsed.errors[0].line == 3
    assert parsed.errors[0].message.startswith("YAML syntax error")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(tmp_path, text):
    parsed = parse(tmp_path, text)
    assert parsed.environment is None
    assert parsed.env_name is None
    assert messages(parsed) == [
        "env.yaml:1:1: empty file: expected an environment (environment:, provider:, services:)"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "- a\n- b\n",
            "env.yaml:1:1: expected a mapping (environment:, provider:, services:), got a list",
        ),
        (
            "\njust text\n",
            "env.yaml:2:1: expected a mapping (environment:, provider:, services:), got text 'just text'",
        ),
        (
            "~\n",
            "env.yaml:1:1: expected a mapping (environment:, provider:, services:), got an empty document",
        ),
    ],
)
def test_top_level_not_a_mapping(tmp_path, text, expected):
    parsed = parse(tmp_path, text)
    assert parsed.environment is None
    assert messages(parsed) == [expected]


def test_more_than_one_document(tmp_path):
    text = MINIMAL + "---\nenvironment: other\n"
    parsed = parse(tmp_path, text)
    assert parsed.environment is None
    assert parsed.env_name == "staging"
    assert messages(parsed) == [
        "env.yaml:7:1: more than one YAML document: a file declares exactly one environment"
    ]


def test_duplicate_keys_at_every_depth(tmp_path):
    text = """\
    environment: e
    provider: p
    services:
      api:
        version: "1"
        version: "2"
        params:
          a: 1
          a: 2
      api:
        version: "3"
    provider: q
    """
    parsed = parse(tmp_path, text)
    assert parsed.environment is None
    assert messages(parsed) == [
        "env.yaml:6:5: services.api.version: duplicate key 'version' (first at line 5)",
        "env.yaml:9:7: services.api.params.a: duplicate key 'a' (first at line 8)",
        "env.yaml:10:3: services.api: duplicate key 'api' (first at line 4)",
        "env.yaml:12:1: provider: duplicate key 'provider' (first at line 2)",
    ]


def test_quoted_and_plain_key_are_the_same_key(tmp_path):
    parsed = parse(tmp_path, MINIMAL + '"provider": q\n')
    assert messages(parsed) == [
        "env.yaml:6:1: provider: duplicate key 'provider' (first at line 2)"
    ]


def test_undefined_alias(tmp_path):
    parsed = parse(tmp_path, MINIMAL + "depends_on: [*nope]\n")
    assert parsed.environment is None
    assert parsed.errors[0].line == 6
    assert parsed.errors[0].col == 14
    assert "undefined alias" in parsed.errors[0].message


def test_complex_key(tmp_path):
    parsed = parse(tmp_path, MINIMAL + "? [a, b]\n: c\n")
    assert messages(parsed) == ["env.yaml:6:3: a key must be text, not a list"]


def test_invalid_utf8(tmp_path):
    path = tmp_path / "env.yaml"
    path.write_bytes(b"environment: e\nprovider: \xff\xfe\n")
    parsed = parse_environment_file("env.yaml", path.read_bytes())
    assert parsed.environment is None
    assert len(parsed.errors) == 1
    assert parsed.errors[0].line == 2
    assert parsed.errors[0].message.startswith("unreadable text")


# --- schema errors, mapped back to line:col ------------------------------------------------


def test_unknown_key_at_key_position(tmp_path):
    text = MINIMAL.replace('version: "1"', 'version: "1"\n    foo: bar') + "on: no\n"
    parsed = parse(tmp_path, text)
    assert parsed.environment is None
    assert parsed.env_name == "staging"
    assert messages(parsed) == [
        "env.yaml:6:5: services.api.foo: unknown key 'foo'",
        "env.yaml:7:1: on: unknown key 'on'",
    ]


def test_missing_keys_point_at_the_mapping(tmp_path):
    text = """\
    # a comment
    environment: e
    services:
      api:
        params: {}
    """
    parsed = parse(tmp_path, text)
    assert messages(parsed) == [
        "env.yaml:2:1: provider: required key missing",
        "env.yaml:5:5: services.api.version: required key missing",
    ]


def test_bad_version(tmp_path):
    parsed = parse(tmp_path, MINIMAL.replace('version: "1"', "version: 1.4 2"))
    assert messages(parsed) == [
        "env.yaml:5:14: services.api.version: '1.4 2' is not a valid version:"
        " use letters, digits and . _ + -"
    ]


def test_empty_version_is_required(tmp_path):
    parsed = parse(tmp_path, MINIMAL.replace('version: "1"', "version:"))
    assert [(e.line, e.col, e.path, e.message) for e in parsed.errors] == [
        (5, 13, "services.api.version", "a value is required")
    ]


def test_version_must_not_be_a_mapping(tmp_path):
    parsed = parse(tmp_path, MINIMAL.replace('version: "1"', "version: {a: 1}"))
    assert messages(parsed) == ["env.yaml:5:14: services.api.version: expected text, got a mapping"]


def test_bad_environment_name(tmp_path):
    parsed = parse(tmp_path, MINIMAL.replace("environment: staging", "environment: Staging_1"))
    assert parsed.env_name is None
    assert len(parsed.errors) == 1
    err = parsed.errors[0]
    assert (err.line, err.col, err.path) == (1, 14, "environment")
    assert err.message.startswith("'Staging_1' is not a valid environment name")


def test_bad_service_name_points_at_the_key(tmp_path):
    parsed = parse(tmp_path, MINIMAL.replace("  api:", "  -api:"))
    assert len(parsed.errors) == 1
    err = parsed.errors[0]
    assert (err.line, err.col, err.path) == (4, 3, "services.-api")
    assert err.message.startswith("'-api' is not a valid service name")


def test_services_required_non_empty(tmp_path):
    parsed = parse(tmp_path, "environment: e\nprovider: p\nservices: {}\n")
    assert messages(parsed) == ["env.yaml:3:11: services: at least one service is required"]


def test_service_must_be_a_mapping(tmp_path):
    parsed = parse(tmp_path, "environment: e\nprovider: p\nservices:\n  api: 1.2\n")
    assert messages(parsed) == ["env.yaml:4:8: services.api: expected a mapping, got text '1.2'"]


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("5x", "bad duration '5x': use seconds or 90s / 30m / 2h"),
        ("-1", "bad duration '-1': use seconds or 90s / 30m / 2h"),
        ("1.5h", "bad duration '1.5h': use seconds or 90s / 30m / 2h"),
        ("0", "bad duration '0': must be longer than 0 seconds"),
        ("[1]", "expected a duration (seconds or 90s / 30m / 2h), got a list"),
        ("", "expected a duration (seconds or 90s / 30m / 2h), got an empty value"),
    ],
)
def test_bad_timeout(tmp_path, written, message):
    parsed = parse(tmp_path, MINIMAL + f"timeout: {written}\n")
    assert parsed.environment is None
    assert [(e.line, e.path, e.message) for e in parsed.errors] == [(6, "timeout", message)]
    if written:
        assert parsed.errors[0].col == 10


@pytest.mark.parametrize("written", ["yes", "no", "True", "on", "1", "'yes'"])
def test_suspended_only_true_or_false(tmp_path, written):
    parsed = parse(tmp_path, MINIMAL + f"suspended: {written}\n")
    assert parsed.environment is None
    assert [(e.line, e.col, e.path) for e in parsed.errors] == [(6, 12, "suspended")]
    assert parsed.errors[0].message.startswith("expected true or false, got ")


def test_bad_literals(tmp_path):
    text = MINIMAL + "on_failure: retry\nstrategy:\n  type: fancy\n  steps: [1]\n"
    parsed = parse(tmp_path, text)
    assert messages(parsed) == [
        "env.yaml:6:13: on_failure: 'retry' is not one of 'stop' or 'rollback'",
        "env.yaml:8:9: strategy.type: 'fancy' is not one of 'rolling', 'blue_green' or 'canary'",
    ]


def test_bad_windows(tmp_path):
    text = MINIMAL + textwrap.dedent("""\
        windows:
          - cron: "0 9 * *"
            duration: 8h
          - cron: "61 9 * * mon-fri"
            duration: 5x
          - cron: "0 9 * * mon-fry"
            duration: 1h
            timezone: Mars/Olympus_Mons
          - duration: 1h
            extra: 1
          - "0 9 * * *"
        """)
    parsed = parse(tmp_path, text)
    assert parsed.environment is None
    assert [(e.line, e.col, e.path) for e in parsed.errors] == [
        (7, 11, "windows.0.cron"),
        (9, 11, "windows.1.cron"),
        (10, 15, "windows.1.duration"),
        (11, 11, "windows.2.cron"),
        (13, 15, "windows.2.timezone"),
        (14, 5, "windows.3.cron"),
        (15, 5, "windows.3.extra"),
        (16, 5, "windows.4"),
    ]
    by_path = {e.path: e.message for e in parsed.errors}
    assert by_path["windows.0.cron"].startswith("'0 9 * *' is not a cron expression of 5 fields")
    assert (
        by_path["windows.1.cron"]
        == "'61 9 * * mon-fri' is not a valid cron expression: out of range"
    )
    assert by_path["windows.1.duration"] == "bad duration '5x': use seconds or 90s / 30m / 2h"
    assert by_path["windows.2.cron"] == "'0 9 * * mon-fry' is not a valid cron expression"
    assert by_path["windows.2.timezone"].startswith("unknown timezone 'Mars/Olympus_Mons'")
    assert by_path["windows.3.cron"] == "required key missing"
    assert by_path["windows.3.extra"] == "unknown key 'extra'"
    assert by_path["windows.4"] == "expected a mapping, got text '0 9 * * *'"


def test_depends_on_self_and_duplicates(tmp_path):
    parsed = parse(tmp_path, MINIMAL + "depends_on: [prod, staging, prod]\n")
    assert messages(parsed) == [
        "env.yaml:6:20: depends_on.1: 'staging' cannot depend on itself",
        "env.yaml:6:29: depends_on.2: 'prod' is listed twice",
    ]


def test_depends_on_bad_name(tmp_path):
    parsed = parse(tmp_path, MINIMAL + "depends_on:\n  - prod\n  - Bad\n")
    assert len(parsed.errors) == 1
    err = parsed.errors[0]
    assert (err.line, err.col, err.path) == (8, 5, "depends_on.1")
    assert err.message.startswith("'Bad' is not a valid environment name")


def test_every_error_in_a_file_is_reported_in_order(tmp_path):
    text = """\
    environment: e
    provider: [p]
    services:
      api:
        version: "1 1"
    timeout: 5x
    bogus: 1
    """
    parsed = parse(tmp_path, text)
    assert [(e.line, e.path) for e in parsed.errors] == [
        (2, "provider"),
        (5, "services.api.version"),
        (6, "timeout"),
        (7, "bogus"),
    ]
    assert parsed.env_name == "e"


def test_file_error_str_and_dict():
    err = FileError("envs/a.yaml", 3, 5, "services.api.version", "bad")
    assert str(err) == "envs/a.yaml:3:5: services.api.version: bad"
    assert str(FileError("a.yaml", 1, 1, "", "empty file")) == "a.yaml:1:1: empty file"
    assert err.to_dict() == {
        "file": "envs/a.yaml",
        "line": 3,
        "col": 5,
        "path": "services.api.version",
        "message": "bad",
    }


def test_recursive_alias_is_an_error(tmp_path):
    text = MINIMAL + "    params: &x\n      self: *x\n"
    parsed = parse(tmp_path, text)
    assert parsed.environment is None
    assert messages(parsed) == [
        "env.yaml:6:13: services.api.params.self:"
        " an alias refers to a node that contains it (recursive)"
    ]


def test_alias_expansion_is_bounded(tmp_path):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        name, prev = chr(97 + i), chr(96 + i)
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    text = MINIMAL + "    params:\n" + "".join(f"      {line}\n" for line in levels)
    parsed = parse(tmp_path, text)
    assert parsed.environment is None
    # (what the aliases did expand to is also more than a service's params may hold)
    assert "aliases expand to more than 100000 values" in [e.message for e in parsed.errors]
