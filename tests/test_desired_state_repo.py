"""Whole repositories: load_directory, assemble and its cross-file checks."""

import textwrap
from pathlib import Path

import pytest

from desired_state.loader import (
    assemble,
    is_environment_file,
    load_directory,
    load_files,
    parse_environment_file,
)


def env_text(name, provider="local", depends_on=None, services=("api",)):
    lines = [f"environment: {name}", f"provider: {provider}", "services:"]
    for service in services:
        lines += [f"  {service}:", '    version: "1.0"']
    if depends_on is not None:
        lines.append("depends_on:")
        lines += [f"  - {dep}" for dep in depends_on]
    return "\n".join(lines) + "\n"


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A folder in which files are written; the current directory, so paths are short."""
    monkeypatch.chdir(tmp_path)

    def write(relpath, text):
        path = tmp_path / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")

    return write


def load(providers=None):
    return load_directory(Path("."), providers)


def test_loads_every_file_recursively_ordered_by_path(repo):
    repo("prod/production.yaml", env_text("production"))
    repo("b.yml", env_text("beta"))
    repo("a.yaml", env_text("alpha"))
    repo("deep/er/qa.yaml", env_text("qa"))
    repo("README.md", "not yaml")
    repo("notes.txt", "environment: nope")
    state = load(["local"])
    assert state.errors == []
    assert list(state.environments) == ["alpha", "beta", "qa", "production"]
    assert state.sources == {
        "alpha": "a.yaml",
        "beta": "b.yml",
        "qa": "deep/er/qa.yaml",
        "production": "prod/production.yaml",
    }
    assert state.invalid == {}
    assert state.broken_files == {}


def test_hidden_folders_and_files_are_skipped(repo):
    repo("a.yaml", env_text("alpha"))
    repo(".github/workflows/ci.yaml", "on: push\njobs: {}\n")
    repo(".hidden.yaml", "garbage: [\n")
    repo("envs/.old/b.yaml", env_text("beta"))
    state = load()
    assert state.errors == []
    assert list(state.environments) == ["alpha"]


def test_root_given_as_absolute_path_reports_full_paths(tmp_path):
    (tmp_path / "a.yaml").write_text("environment: alpha\n")
    state = load_directory(tmp_path)
    assert {e.file for e in state.errors} == {str(tmp_path / "a.yaml")}
    assert state.broken_files.keys() == {str(tmp_path / "a.yaml")}


def test_one_broken_file_does_not_remove_other_environments(repo):
    repo("a.yaml", env_text("alpha"))
    repo("b.yaml", env_text("beta").replace('"1.0"', "1.0 beta"))
    repo("c.yaml", "environment: gamma\nprovider: [\n")
    repo("d.yaml", env_text("delta"))
    state = load(["local"])
    assert list(state.environments) == ["alpha", "delta"]
    assert [str(e) for e in state.errors] == [
        "b.yaml:5:14: services.api.version: '1.0 beta' is not a valid version:"
        " use letters, digits and . _ + -",
        state.errors[1].__str__(),
    ]
    assert state.errors[1].file == "c.yaml"
    assert state.errors[1].line == 3
    # gamma's name could not be read: the syntax error comes before the file is composed
    assert set(state.invalid) == {"beta"}
    assert state.invalid["beta"] == [state.errors[0]]
    assert set(state.broken_files) == {"b.yaml", "c.yaml"}
    assert state.sources["beta"] == "b.yaml"


def test_invalid_file_with_readable_name_is_invalid_by_name(repo):
    repo("a.yaml", "environment: alpha\nprovider: local\n")
    state = load()
    assert state.environments == {}
    assert [str(e) for e in state.invalid["alpha"]] == [
        "a.yaml:1:1: services: required key missing"
    ]


def test_errors_are_sorted_by_file_line_col(repo):
    repo("b.yaml", "environment: beta\nprovider: local\nservices: {}\nbogus: 1\n")
    repo("a.yaml", "environment: alpha\nbogus: 1\nprovider: local\nservices: {}\n")
    state = load()
    assert [(e.file, e.line, e.col) for e in state.errors] == [
        ("a.yaml", 2, 1),
        ("a.yaml", 4, 11),
        ("b.yaml", 3, 11),
        ("b.yaml", 4, 1),
    ]


def test_duplicate_environment_names(repo):
    repo("a.yaml", env_text("prod"))
    repo("b/prod.yaml", "# the same environment again\n" + env_text("prod"))
    repo("c.yaml", env_text("prod").replace("services:", "bogus: 1\nservices:"))
    repo("d.yaml", env_text("other"))
    state = load(["local"])
    assert list(state.environments) == ["other"]
    assert [str(e) for e in state.errors] == [
        "b/prod.yaml:2:14: environment: environment 'prod' is also declared in a.yaml",
        "c.yaml:1:14: environment: environment 'prod' is also declared in a.yaml",
        "c.yaml:3:1: bogus: unknown key 'bogus'",
    ]
    assert set(state.invalid) == {"prod"}
    assert len(state.invalid["prod"]) == 3
    assert set(state.broken_files) == {"b/prod.yaml", "c.yaml"}
    assert state.sources["prod"] == "a.yaml"


def test_unknown_provider(repo):
    repo("a.yaml", env_text("alpha", provider="k8s-prod"))
    repo("b.yaml", env_text("beta", provider="nope"))
    state = load(["local", "k8s-prod"])
    assert list(state.environments) == ["alpha"]
    assert [str(e) for e in state.errors] == [
        "b.yaml:2:11: provider: unknown provider 'nope' (declared: k8s-prod, local)"
    ]
    assert state.invalid == {"beta": state.errors}


def test_providers_none_skips_the_provider_check(repo):
    repo("a.yaml", env_text("alpha", provider="anything"))
    assert list(load(None).environments) == ["alpha"]
    assert [e.message for e in load([]).errors] == ["unknown provider 'anything' (declared: none)"]


def test_depends_on_unknown_environment(repo):
    repo("staging.yaml", env_text("staging"))
    repo("prod.yaml", env_text("prod", depends_on=["stagin", "staging"]))
    state = load()
    assert list(state.environments) == ["staging"]
    assert [str(e) for e in state.errors] == [
        "prod.yaml:7:5: depends_on.0: depends on 'stagin', which no file declares"
        " (did you mean 'staging'?)"
    ]
    assert "prod" in state.invalid


def test_depends_on_an_invalid_environment_is_fine(repo):
    repo("staging.yaml", env_text("staging").replace('"1.0"', '"bad version"'))
    repo("prod.yaml", env_text("prod", depends_on=["staging"]))
    state = load()
    assert list(state.environments) == ["prod"]
    assert [e.file for e in state.errors] == ["staging.yaml"]
    assert set(state.invalid) == {"staging"}


def test_depends_on_cycle(repo):
    repo("a.yaml", env_text("a", depends_on=["b"]))
    repo("b.yaml", env_text("b", depends_on=["x", "c"]))
    repo("c.yaml", env_text("c", depends_on=["a"]))
    repo("x.yaml", env_text("x"))
    repo("y.yaml", env_text("y", depends_on=["a", "x"]))
    state = load()
    assert list(state.environments) == ["x", "y"]
    assert [str(e) for e in state.errors] == [
        "a.yaml:7:5: depends_on.0: dependency cycle: a -> b -> c -> a",
        "b.yaml:8:5: depends_on.1: dependency cycle: b -> c -> a -> b",
        "c.yaml:7:5: depends_on.0: dependency cycle: c -> a -> b -> c",
    ]
    assert set(state.invalid) == {"a", "b", "c"}


def test_two_separate_cycles(repo):
    repo("a.yaml", env_text("a", depends_on=["b"]))
    repo("b.yaml", env_text("b", depends_on=["a"]))
    repo("c.yaml", env_text("c", depends_on=["d"]))
    repo("d.yaml", env_text("d", depends_on=["c"]))
    state = load()
    assert state.environments == {}
    assert [e.message for e in state.errors] == [
        "dependency cycle: a -> b -> a",
        "dependency cycle: b -> a -> b",
        "dependency cycle: c -> d -> c",
        "dependency cycle: d -> c -> d",
    ]


def test_assemble_from_parsed_files_in_any_order():
    files = [
        parse_environment_file("z.yaml", env_text("zeta")),
        parse_environment_file("a.yaml", env_text("alpha")),
        parse_environment_file("m.yaml", b"environment: mu\n"),
    ]
    state = assemble(files, ["local"])
    assert list(state.environments) == ["alpha", "zeta"]
    assert list(state.broken_files) == ["m.yaml"]
    assert list(state.invalid) == ["mu"]
    # assembling does not change the parsed files
    assert [len(f.errors) for f in files] == [0, 0, 2]


def test_load_files_skips_non_environment_paths():
    state = load_files(
        [
            ("envs/a.yaml", env_text("alpha")),
            (".github/ci.yml", "on: push\n"),
            ("README.md", "# hi"),
            ("envs/b.yml", env_text("beta").encode()),
        ],
        ["local"],
    )
    assert state.errors == []
    assert state.sources == {"alpha": "envs/a.yaml", "beta": "envs/b.yml"}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("a.yaml", True),
        ("envs/prod.yml", True),
        ("./envs/prod.yaml", True),
        ("a.json", False),
        ("a.yaml.bak", False),
        (".a.yaml", False),
        (".github/workflows/ci.yaml", False),
        ("envs/.old/prod.yaml", False),
        ("envs/x.YAML", False),
    ],
)
def test_is_environment_file(path, expected):
    assert is_environment_file(path) is expected


def test_public_api_is_re_exported():
    import desired_state

    for name in (
        "FileError",
        "EnvironmentSpec",
        "Service",
        "Strategy",
        "Window",
        "NAME_RE",
        "SERVICE_RE",
        "VERSION_RE",
        "ParsedFile",
        "DesiredState",
        "assemble",
        "is_environment_file",
        "parse_environment_file",
        "load_directory",
        "load_files",
        "json_schema",
        "parse_duration",
        "format_duration",
    ):
        assert hasattr(desired_state, name), name
    assert set(desired_state.__all__) >= {"load_directory", "parse_environment_file"}


def test_large_repository_loads_every_environment(tmp_path):
    # Speed is measured in bench/bench_load.py; this checks a large chain loads correctly.
    for i in range(200):
        services = [f"svc-{s}" for s in range(20)]
        text = env_text(f"env-{i}", depends_on=[f"env-{i - 1}"] if i else None, services=services)
        (tmp_path / f"env-{i:03d}.yaml").write_text(text)
    state = load_directory(tmp_path, ["local"])
    assert len(state.environments) == 200
    assert state.errors == []
    assert list(state.environments["env-7"].services)[:3] == ["svc-0", "svc-1", "svc-2"]


# --- what a loaded fleet keeps in memory ----------------------------------------------------


def fleet_text(i, version="1.0", replicas="3"):
    return (
        f"environment: env{i}\nprovider: local\nservices:\n"
        f'  api:\n    version: "{version}"\n    params: {{replicas: "{replicas}", tier: web}}\n'
        f'  worker:\n    version: "{version}"\n'
    )


def test_a_loaded_desired_state_keeps_no_yaml_nodes():
    import gc

    from yaml.nodes import Node

    state = load_files([(f"env{i}.yaml", fleet_text(i)) for i in range(20)])
    assert len(state.environments) == 20
    gc.collect()
    kept = [o for o in gc.get_objects() if isinstance(o, Node)]
    assert kept == [], f"{len(kept)} YAML nodes alive after the load"


def test_equal_services_are_one_object_and_text_is_interned():
    files = [(f"env{i}.yaml", fleet_text(i)) for i in range(4)]
    files.append(("env9.yaml", fleet_text(9, replicas="5")))
    envs = load_files(files).environments
    first, other = envs["env0"].services, envs["env3"].services
    assert first["api"] is other["api"] and first["worker"] is other["worker"]
    assert envs["env9"].services["api"] is not first["api"]  # other params: its own
    assert envs["env9"].services["api"].params == {"replicas": "5", "tier": "web"}
    assert envs["env9"].services["worker"] is first["worker"]
    # Keys and short values of different files are the same string objects.
    (k0,) = [k for k in envs["env0"].services if k == "api"]
    (k9,) = [k for k in envs["env9"].services if k == "api"]
    assert k0 is k9
    assert envs["env0"].services["api"].version is envs["env9"].services["api"].version


def test_an_invalid_service_is_not_shared_and_keeps_its_position():
    bad = 'environment: bad\nprovider: local\nservices:\n  api:\n    version: "1.0"\n    nope: 1\n'
    for _ in range(2):  # the second read reports the same error at the same place
        state = load_files([("bad.yaml", bad), ("env0.yaml", fleet_text(0))])
        assert [str(e) for e in state.errors] == [
            "bad.yaml:6:5: services.api.nope: unknown key 'nope'"
        ]
        assert "env0" in state.environments
