"""`reconciler` command line (SPEC §7): parse, call one function, print.

Exit status: 0 success, 1 a failure the command reports, 2 bad usage or configuration,
130 / 143 stopped by Ctrl-C / SIGTERM.
Errors are one sentence on stderr; set RECONCILER_DEBUG=1 to see a traceback.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import re
import signal
import sys
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

# Only light modules here: `reconciler --help` and every command pay for these imports.
# Each command imports what it needs (SQLAlchemy, Pydantic, git, the engine) in its body;
# tests/test_cli_output.py::test_help_imports_nothing_heavy checks it.
from desired_state import one_line
from reconciler import DISTRIBUTION
from reconciler.numbers import OutOfRange, parse_int
from reconciler.output import (
    DEPLOYMENT_COLUMNS,
    decisions_table,
    deployments_table,
    print_csv,
    print_json,
    say_refusal,
    show_deployment,
)
from reconciler.store.statuses import STATUSES
from reconciler.times import SINCE_HELP, parse_since

if TYPE_CHECKING:
    from desired_state import DesiredState
    from reconciler import operations as ops
    from reconciler.config import Config
    from reconciler.executor import DeploymentEvent, Listener
    from reconciler.providers import Provider
else:

    def _lazy(name: str) -> ModuleType:
        """`name`, loaded at its first attribute access (importlib.util.LazyLoader)."""
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.loader is not None
        spec.loader = importlib.util.LazyLoader(spec.loader)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    ops = _lazy("reconciler.operations")

T = TypeVar("T")


def fail(message: str, code: int = 1) -> NoReturn:
    """Every error the CLI prints goes through here: one line, whatever it quotes."""
    click.echo(f"reconciler: {one_line(message)}", err=True)
    sys.exit(code)


# `reconciler` alone shows the help, which click >= 8.2 raises as a usage error.
_HELP_ERRORS: tuple[type[Exception], ...] = tuple(
    t for t in (getattr(click.exceptions, "NoArgsIsHelpError", None),) if t is not None
)


def usage_failure(exc: click.ClickException) -> NoReturn:
    """A usage mistake: the same one line as every other error (click's own display spans
    four, and would print a newline the user typed as it is)."""
    if isinstance(exc, _HELP_ERRORS):
        raise exc
    where = exc.ctx.command_path if isinstance(exc, click.UsageError) and exc.ctx else ""
    hint = f" (see '{where} --help')" if where else ""
    fail(exc.format_message() + hint, exc.exit_code)


class Group(click.Group):
    """Turns every expected failure into one line on stderr and the SPEC's exit status."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """The whole command with the cyclic garbage collector off, unless it runs long
        (`run()`, the daemon turn it back on): importing SQLAlchemy and Pydantic makes
        objects by the hundred thousand and no garbage, and collecting them over and over
        is ~10 % of a reading command's start-up (bench/bench_cli.py)."""
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return super().main(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.ClickException as exc:
            usage_failure(exc)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            usage_failure(exc)
        except BrokenPipeError:  # `reconciler history | head`: the reader left, not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except (click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            expected_failure(exc)


#: Expected failures by class (qualified name, so that recognising one imports nothing):
#: the exit status, or None for the status the exception carries (`code`).
_EXPECTED: dict[str, int | None] = {
    "reconciler.config.ConfigError": 2,
    "reconciler.operations.OperationError": None,
    "reconciler.channel.Refused": None,
    "reconciler.source.gitcmd.SourceError": 1,
    "reconciler.store.records.StoreError": 1,
    "reconciler.store.db.SchemaTooNew": 1,
    "reconciler.blame.BlameError": None,
}


def expected_failure(exc: Exception) -> NoReturn:
    """One line and the SPEC's exit status for a failure a command can meet; an internal
    error otherwise (with RECONCILER_DEBUG=1, the traceback instead)."""
    names = [f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__]
    for name in names:
        if name in _EXPECTED:
            code = _EXPECTED[name]
            fail(str(exc), getattr(exc, "code", 1) if code is None else code)
    if os.environ.get("RECONCILER_DEBUG"):
        raise exc
    if "sqlalchemy.exc.SQLAlchemyError" in names:
        orig = getattr(exc, "orig", None)
        fail(f"database error: {str(orig or exc).splitlines()[0]}", 1)
    if "sqlite3.Error" in names:  # the sqlite3 reader of status/history/show
        fail(f"database error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", 1)
    fail(f"internal error: {type(exc).__name__}: {exc} (set RECONCILER_DEBUG=1 for details)", 1)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine. Ctrl-C and SIGTERM cancel it (a running deployment is
    stopped, SIGTERM then SIGKILL after `kill_grace`, and recorded `cancelled`); each
    further Ctrl-C cancels again, which cuts the grace short (SIGKILL at once). Nothing
    kills the process under its command, which would leave that command running."""
    import asyncio  # not for `--help`, `history`, `show`: ~20 ms of start-up

    gc.enable()  # off while the command started (Group.main); this may run for long
    received: list[signal.Signals] = []
    try:
        return asyncio.run(_stoppable(coro, received))
    except asyncio.CancelledError:
        if received and received[-1] == signal.SIGTERM:
            fail("stopped by SIGTERM", 143)
        fail("interrupted", 130)


async def _stoppable(coro: Coroutine[Any, Any, T], received: list[signal.Signals]) -> T:
    import asyncio

    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()

    def stop(sig: signal.Signals) -> None:
        received.append(sig)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig)
    try:
        return await coro
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def cfg(ctx: click.Context) -> Config:
    from reconciler.config import load_config

    obj: dict[str, Any] = ctx.ensure_object(dict)
    if "config" not in obj:
        obj["config"] = load_config(obj.get("config_path"))
    config: Config = obj["config"]
    return config


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Daemon configuration (default: $RECONCILER_CONFIG, else /etc/reconciler/reconciler.toml).",
)
@click.version_option(package_name=DISTRIBUTION)
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """GitOps reconciler: git desired state in, recorded deployments out."""
    ctx.ensure_object(dict)["config_path"] = config_path
    if ctx.invoked_subcommand in _READING_COMMANDS:
        skip_pydantic_plugins(ctx)


#: Commands that read and exit, start no provider and have no use for a Pydantic plugin.
_READING_COMMANDS = frozenset({"validate", "status", "history", "show", "plan", "blame"})


def skip_pydantic_plugins(ctx: click.Context) -> None:
    """No Pydantic plugin lookup while a reading command runs: the lookup reads the entry
    points of every installed distribution when the first model is built (10-25 ms of the
    command's start-up, bench/bench_cli.py), and the reconciler uses no plugin. Commands
    that deploy and the daemon keep them (and their children's environment is untouched).
    An operator's own PYDANTIC_DISABLE_PLUGINS wins; the variable goes when the command
    ends."""
    if "PYDANTIC_DISABLE_PLUGINS" in os.environ:
        return
    os.environ["PYDANTIC_DISABLE_PLUGINS"] = "__all__"
    ctx.call_on_close(lambda: os.environ.pop("PYDANTIC_DISABLE_PLUGINS", None))


# ---- the daemon ----------------------------------------------------------------------


@main.command("run")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=None,
    help="Log line format (default: text, key=value).",
)
@click.pass_context
def run_cmd(ctx: click.Context, log_format: str | None) -> None:
    """Run the daemon in the foreground (what systemd starts)."""
    from reconciler.daemon import MigrationFailed, run_daemon
    from reconciler.http import HttpServerError
    from reconciler.lock import AlreadyRunning
    from reconciler.logs import setup_logging
    from reconciler.store.holder import DatabaseHeld

    config = cfg(ctx)
    setup_logging(log_format or "text")
    gc.enable()  # off while the command started (Group.main)
    try:
        run_daemon(config, ctx.ensure_object(dict).get("config_path"))
    except HttpServerError as exc:
        fail(str(exc), 2)
    except MigrationFailed as exc:
        fail(str(exc), 1)
    except DatabaseHeld as exc:
        fail(str(exc), 2)
    except AlreadyRunning as exc:
        pid = exc.args[0]
        fail(
            f"another reconciler daemon{f' (pid {pid})' if pid else ''} uses {config.state_dir}", 2
        )


# ---- reconciling ---------------------------------------------------------------------


def _progress_printer() -> Listener:
    """Live progress on stderr while a command waits on deployments."""

    def show(ev: DeploymentEvent) -> None:
        pct = f"{ev.percent:>3}% " if ev.percent is not None else ""
        where = f"{ev.environment}/{ev.service} {ev.version}"
        line = f"  #{ev.deployment_id} {where} {ev.status}: {pct}{ev.message}"
        click.echo(one_line(line), err=True)

    return show


@main.command("sync")
@click.option("--env", "environment", help="Only this environment.")
@click.option(
    "--service", help="Only this service (with --env): also retries a version that gave up."
)
@click.option(
    "--wait",
    is_flag=True,
    help="With a running daemon: follow the deployments its sync causes (standalone always waits).",
)
@click.option("--reason", help="Kept with the operator action (a retry) and logged.")
@click.option("--json", "as_json", is_flag=True, help="Print the deployments as JSON.")
@click.pass_context
def sync_cmd(
    ctx: click.Context,
    environment: str | None,
    service: str | None,
    wait: bool,
    reason: str | None,
    as_json: bool,
) -> None:
    """Reconcile now; exit 1 if any deployment failed."""
    if service and not environment:
        raise click.UsageError("--service needs --env")
    config = cfg(ctx)
    report = run(
        ops.sync(
            config,
            environment=environment,
            service=service,
            wait=wait,
            reason=reason,
            listener=None if as_json else _progress_printer(),
        )
    )
    if report.delegated_to is not None:
        click.echo(f"asked the running daemon (pid {report.delegated_to}) to sync", err=True)
        if not wait:
            return
    outcome = report.outcome
    if outcome.result in ("failed", "refused"):
        fail(outcome.message or "sync failed")
    if as_json:
        print_json(
            {
                "sync_id": outcome.sync_id,
                "commit": outcome.commit,
                "result": outcome.result,
                "environments_changed": outcome.environments_changed,
                "errors": outcome.errors,
                "deployments": [d.to_json() for d in report.deployments],
            }
        )
    else:
        for err in outcome.errors:
            click.echo(err, err=True)
        if report.deployments:
            deployments_table(report.deployments)
        else:
            click.echo(f"nothing to deploy at {(outcome.commit or '')[:9]}")
    if report.failed or outcome.errors:
        sys.exit(1)


@main.command("plan")
@click.option("--env", "environment", help="Only this environment.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--wide", is_flag=True, help="Every column, however wide the lines get.")
@click.pass_context
def plan_cmd(ctx: click.Context, environment: str | None, as_json: bool, wide: bool) -> None:
    """What a sync would do now, doing nothing."""
    engine, decisions = run(
        ops.decisions(cfg(ctx), fetch=True, environment=environment, judge=True)
    )
    refusal = engine.snapshot.refusal  # a sync would refuse the head: planned from the applied
    actions = [d for d in decisions if d.state not in ("synced",)]
    if as_json:  # a refusal shows on every service (what a sync would keep, and why)
        print_json([d.to_json() for d in (decisions if refusal else actions)])
        return
    if not actions:
        if refusal:
            say_refusal(refusal, wide=wide)
        click.echo(f"everything is in sync at {engine.commit.sha[:9] if engine.commit else '-'}")
        return
    decisions_table(
        actions,
        engine.commit.sha if engine.commit else None,
        with_action=True,
        wide=wide,
        refusal=refusal,
    )


@main.command("status")
@click.option("--env", "environment", help="Only this environment.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--wide", is_flag=True, help="Every column, however wide the lines get.")
@click.option(
    "--replicas",
    is_flag=True,
    help="The daemons sharing the database (PostgreSQL) and their environment leases.",
)
@click.pass_context
def status_cmd(
    ctx: click.Context, environment: str | None, as_json: bool, wide: bool, replicas: bool
) -> None:
    """Per service: desired, deployed, state, last commit."""
    from reconciler.lock import SOCKET_NAME

    config = cfg(ctx)
    if replicas:
        from reconciler.output import replicas_table
        from reconciler.store import Store

        board = Store.for_reading(config.database_url).replicas_report(config.daemon.lease_ttl)
        if as_json:
            print_json(board)
        else:
            replicas_table(board, wide=wide)
        return
    report = None  # None: no daemon answers
    if (config.state_dir / SOCKET_NAME).exists():  # else no daemon: no channel to import
        from reconciler.channel import status_from_daemon

        report = status_from_daemon(config.state_dir, environment)
    if report is not None:
        if as_json:
            print_json(report.entries())
        else:
            decisions_table(
                report.decisions(),
                report.commit,
                reasons=report.reasons,
                wide=wide,
                refusal=report.refusal,
            )
        return
    from reconciler.status import saved_status
    from reconciler.store.reading import open_reader

    store = open_reader(config.database_url)  # SQLite: sqlite3 alone, no SQLAlchemy
    saved = saved_status(config, store, environment)
    if saved is None:  # the last sync found broken files: only the engine reads them
        engine, decisions = run(ops.decisions(cfg(ctx), fetch=False, environment=environment))
        commit = engine.commit.sha if engine.commit else None
        refusal = engine.snapshot.refusal
    else:
        if environment is not None and environment not in saved.environments:
            fail(f"unknown environment '{environment}'", 2)
        decisions, commit, refusal = saved.decisions, saved.commit, saved.refusal
    if as_json:
        print_json([d.status_json(commit) for d in decisions])
        return
    if commit is None:
        click.echo("no sync recorded yet: run `reconciler sync` or start the daemon", err=True)
    decisions_table(
        decisions, commit, reasons=store.suspension_reasons(), wide=wide, refusal=refusal
    )


# ---- validating ----------------------------------------------------------------------


@main.command("validate")
@click.argument("directory", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the errors as JSON.")
@click.pass_context
def validate_cmd(ctx: click.Context, directory: str | None, as_json: bool) -> None:
    """Check a desired-state folder (default: the configured repository at its branch head)."""
    state: DesiredState
    if directory is not None:
        from desired_state import load_directory

        providers = _known_providers(ctx)
        if providers is None:  # no configuration: the format alone (a pre-commit hook),
            # checked without Pydantic (tests/test_validate_format.py)
            state = load_directory(Path(directory), format_only=True)
        else:
            from reconciler.providers import spec_check

            state = load_directory(Path(directory), providers.keys(), spec_check(providers))
    else:
        engine, _ = run(ops.decisions(cfg(ctx), fetch=True))
        assert engine.desired is not None
        state = engine.desired
    if as_json:
        print_json(
            {
                "environments": sorted(state.environments),
                "errors": [e.to_dict() for e in state.errors],
            }
        )
    else:
        for err in state.errors:
            click.echo(str(err), err=True)
        files = len(set(state.sources.values()) | set(state.broken_files))
        click.echo(
            f"{files} file{'s' if files != 1 else ''}, {len(state.environments)} valid "
            f"environment{'s' if len(state.environments) != 1 else ''}, {len(state.errors)} "
            f"error{'s' if len(state.errors) != 1 else ''}"
        )
    if state.errors:
        sys.exit(1)


def _known_providers(ctx: click.Context) -> dict[str, Provider] | None:
    """The configured providers to check files against, when a configuration is at hand."""
    from reconciler.configfile import config_path

    obj = ctx.ensure_object(dict)
    path = config_path(obj.get("config_path"), os.environ)
    if obj.get("config_path") is None and not path.exists():
        return None
    from reconciler.config import load_config
    from reconciler.providers import build_providers

    # validate needs no write access to the state directory (a pre-commit hook's user)
    return build_providers(load_config(obj.get("config_path"), writable_state=False))


@main.command("schema")
def schema_cmd() -> None:
    """Print the JSON Schema of the desired-state format."""
    from desired_state import json_schema

    print_json(json_schema())


# ---- history -------------------------------------------------------------------------


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_since(value)
    except ValueError:
        raise click.BadParameter(f"use {SINCE_HELP}", param_hint="--since") from None


@main.command("history")
@click.option("--env", "environment")
@click.option("--service")
@click.option("--status", type=click.Choice(sorted(STATUSES)))
@click.option("--since", help="A time (2026-11-26T10:00:00Z) or an age (2h, 7d).")
@click.option("--limit", type=click.IntRange(1, 100000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--csv", "as_csv", is_flag=True)
@click.option("--wide", is_flag=True, help="Every column, however wide the lines get.")
@click.pass_context
def history_cmd(
    ctx: click.Context,
    environment: str | None,
    service: str | None,
    status: str | None,
    since: str | None,
    limit: int,
    as_json: bool,
    as_csv: bool,
    wide: bool,
) -> None:
    """Deployments, newest first (columns that do not fit the terminal are left out)."""
    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    from reconciler.store.reading import open_reader

    store = open_reader(cfg(ctx).database_url)  # SQLite: sqlite3 alone, no SQLAlchemy
    records = store.history(
        environment=environment, service=service, status=status, since=_since(since), limit=limit
    )
    if as_json:
        print_json([r.to_json() for r in records])
    elif as_csv:
        print_csv([r.to_json() for r in records], DEPLOYMENT_COLUMNS)
    elif records:
        subjects = store.commit_subjects([r.sync_id for r in records if r.sync_id is not None])
        deployments_table(records, subjects, wide=wide)
    else:
        click.echo("no deployments match", err=True)


@main.command("show")
@click.argument("deployment_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def show_cmd(ctx: click.Context, deployment_id: str, as_json: bool) -> None:
    """One deployment, its progress timeline and log."""
    raw = deployment_id.strip()
    try:
        dep_id = parse_int(raw, low=1)
    except OutOfRange:  # no id that large (or small) exists
        fail(f"no deployment {raw if len(raw) <= 30 else raw[:30] + '...'}")
    except ValueError:
        raise click.BadParameter(
            f"'{deployment_id}' is not a deployment id", param_hint="DEPLOYMENT_ID"
        ) from None
    from reconciler.store.reading import open_reader

    store = open_reader(cfg(ctx).database_url)  # SQLite: sqlite3 alone, no SQLAlchemy
    record = store.get_deployment(dep_id, with_progress=True, with_log=True)
    if record is None:
        fail(f"no deployment {dep_id}")
    if as_json:
        print_json(record.to_json())
    else:
        subjects = store.commit_subjects([record.sync_id] if record.sync_id else [])
        show_deployment(record, subjects.get(record.sync_id) if record.sync_id else None)


@main.command("blame")
@click.option("--env", "environment", required=True)
@click.option("--service", required=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def blame_cmd(ctx: click.Context, environment: str, service: str, as_json: bool) -> None:
    """The commit that set a service's desired version, and the deployment that applied it."""
    from reconciler.blame import blame
    from reconciler.output import show_blame
    from reconciler.store import Store
    from reconciler.sync import open_source

    config = cfg(ctx)
    store = Store.for_reading(config.database_url)
    with open_source(config) as source:
        found = blame(store, source, environment, service)
    if as_json:
        print_json(found.to_json())
    else:
        show_blame(found.to_json())


# ---- audit ---------------------------------------------------------------------------


@main.group("audit", cls=Group)
def audit_group() -> None:
    """The tamper-evident audit ledger: verify it, export it."""


@audit_group.command("export")
@click.option(
    "--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True
)
@click.option(
    "--since", help="Deployments planned since a time (2026-11-26T10:00:00Z) or an age (7d)."
)
@click.option("--env", "environment", help="Only this environment.")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    help="Write to this file (default: standard output).",
)
@click.pass_context
def audit_export_cmd(
    ctx: click.Context, fmt: str, since: str | None, environment: str | None, output: str | None
) -> None:
    """Every deployment, oldest first, with its commit, timeline and outcome (streamed)."""
    gc.enable()  # off while the command started (Group.main): a long stream makes cycles
    from reconciler.audit_export import export
    from reconciler.store import Store

    after = _since(since)
    store = Store.for_reading(cfg(ctx).database_url)
    progress = None
    if sys.stderr.isatty():
        total = store.count_deployments(environment=environment, since=after)

        def progress(rows: int, done: bool) -> None:
            click.echo(f"\r{rows:,} of ~{total:,} deployments written", err=True, nl=done)

    if output is None:
        export(store, sys.stdout, fmt=fmt, environment=environment, since=after, progress=progress)
        return
    try:
        with open(output, "w", encoding="utf-8", newline="") as out:
            export(store, out, fmt=fmt, environment=environment, since=after, progress=progress)
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror or exc}")


# ---- operator actions ----------------------------------------------------------------


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def _print_runs(records: list[Any], as_json: bool) -> None:
    if as_json:
        print_json([r.to_json() for r in records])
    else:
        deployments_table(records)
    if any(r.status != "completed" for r in records):
        sys.exit(1)


_WAIT_HELP = "With a running daemon: follow the deployment to its end (standalone always waits)."
_REASON_HELP = "Kept with the operator action and logged."


def _through_daemon(
    config: Config, action: ops.AnyAction, pid: int, as_json: bool
) -> list[Any] | None:
    """Have the running daemon carry out a deploy or rollback: None when not waiting."""
    reply = run(
        ops.ask_daemon(
            config,
            action,
            listener=None if as_json else _progress_printer(),
            warn=_warn,
        )
    )
    if reply.accepted is not None:
        click.echo(f"the daemon (pid {pid}) is {reply.accepted.message}", err=True)
    return reply.deployments if action.wait else None


@main.command("deploy")
@click.option("--env", "environment", required=True)
@click.option("--version", "version", required=True)
@click.option(
    "--service", "services", multiple=True, help="Default: every service of the environment."
)
@click.option("--reason", help=_REASON_HELP)
@click.option("--wait", is_flag=True, help=_WAIT_HELP)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def deploy_cmd(
    ctx: click.Context,
    environment: str,
    version: str,
    services: tuple[str, ...],
    reason: str | None,
    wait: bool,
    as_json: bool,
) -> None:
    """Deploy a version now (trigger `manual`)."""
    from desired_state.models import VERSION_RE

    if not re.fullmatch(VERSION_RE, version):
        raise click.BadParameter(f"'{version}' is not a valid version", param_hint="--version")
    config = cfg(ctx)
    pid = ops.running_daemon(config)
    if pid is not None:
        action = ops.DeployAction(
            environment=environment,
            version=version,
            services=list(services) or None,
            reason=reason,
            wait=wait,
        )
        done = _through_daemon(config, action, pid, as_json)
        if done is not None:
            _print_runs(done, as_json)
        return
    records = run(
        ops.deploy(
            config,
            environment=environment,
            version=version,
            services=services or None,
            warn=_warn,
            reason=reason,
            listener=None if as_json else _progress_printer(),
        )
    )
    _print_runs(records, as_json)


@main.command("rollback")
@click.option("--env", "environment", required=True)
@click.option("--service", required=True)
@click.option("--to", "to_version", help="Default: the previous completed version.")
@click.option("--reason", help=_REASON_HELP)
@click.option("--wait", is_flag=True, help=_WAIT_HELP)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def rollback_cmd(
    ctx: click.Context,
    environment: str,
    service: str,
    to_version: str | None,
    reason: str | None,
    wait: bool,
    as_json: bool,
) -> None:
    """Deploy the previous (or given) completed version (trigger `rollback`)."""
    config = cfg(ctx)
    pid = ops.running_daemon(config)
    if pid is not None:
        action = ops.RollbackAction(
            environment=environment, service=service, to=to_version, reason=reason, wait=wait
        )
        done = _through_daemon(config, action, pid, as_json)
        if done is not None:
            _print_runs(done, as_json)
        return
    target = run(ops.rollback_target(config, environment, service, to_version))
    records = run(
        ops.deploy(
            config,
            environment=environment,
            version=target,
            services=[service],
            trigger="rollback",
            warn=_warn,
            reason=reason,
            listener=None if as_json else _progress_printer(),
        )
    )
    _print_runs(records, as_json)


def _set_suspended(ctx: click.Context, environment: str, suspend: bool, reason: str | None) -> None:
    config = cfg(ctx)
    if ops.running_daemon(config) is not None:
        action = ops.SuspendAction(
            action="suspend" if suspend else "resume", environment=environment, reason=reason
        )
        run(ops.ask_daemon(config, action, warn=_warn))
    else:
        run(ops.set_suspended(config, environment, suspend, reason))
    click.echo(f"{environment} {'suspended' if suspend else 'resumed'}")


@main.command("suspend")
@click.option("--env", "environment", required=True)
@click.option("--reason", help=_REASON_HELP)
@click.pass_context
def suspend_cmd(ctx: click.Context, environment: str, reason: str | None) -> None:
    """Stop deploying to an environment (drift is still recorded)."""
    _set_suspended(ctx, environment, True, reason)


@main.command("resume")
@click.option("--env", "environment", required=True)
@click.option("--reason", help=_REASON_HELP)
@click.pass_context
def resume_cmd(ctx: click.Context, environment: str, reason: str | None) -> None:
    """Deploy to an environment again."""
    _set_suspended(ctx, environment, False, reason)


# ---- database ------------------------------------------------------------------------


@main.group("db", cls=Group)
def db_group() -> None:
    """Database maintenance."""


@db_group.command("upgrade")
@click.pass_context
def db_upgrade_cmd(ctx: click.Context) -> None:
    """Apply migrations (the daemon also does it at start)."""
    from reconciler.store import make_engine, upgrade

    engine = make_engine(cfg(ctx).database_url)
    applied = upgrade(engine)
    click.echo(f"applied {', '.join(applied)}" if applied else "database is up to date")


def _verify_progress() -> Callable[[str, int, int], None]:
    """Progress of a long verify on stderr (a terminal only), rewritten in place."""

    def show(phase: str, done: int, total: int) -> None:
        click.echo(f"\rverifying {phase}: {done:,}/{total:,}\x1b[K", err=True, nl=False)

    return show


@audit_group.command("verify")
@click.option(
    "--head",
    "head",
    metavar="FILE|URL",
    help="The published chain head to check the tail against (default: [audit] head).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def audit_verify_cmd(ctx: click.Context, head: str | None, as_json: bool) -> None:
    """Check the ledger's hash chain and the records it covers; exit 1 naming each entry
    or record altered, inserted or deleted."""
    gc.enable()  # off while the command started (Group.main): a long walk makes cycles
    from reconciler import chain_head
    from reconciler.store import Store, verify

    config = cfg(ctx)
    target = head or config.audit_head
    published = None
    if target is not None:
        try:
            published = chain_head.read(target)
        except chain_head.HeadError as exc:
            fail(str(exc))
    store = Store.for_reading(config.database_url)
    try:
        progress = _verify_progress() if sys.stderr.isatty() and not as_json else None
        report = verify(store, published=published, progress=progress)
    finally:
        store.close()
    if progress is not None:
        click.echo("\r\x1b[K", err=True, nl=False)
    if as_json:
        print_json(report.to_json())
    else:
        for finding in report.findings:
            click.echo(finding.line())
        if report.more:
            click.echo(f"… and {report.more:,} more findings")
    if not report.ok:
        total = len(report.findings) + report.more
        fail(f"the audit ledger does not verify: {total:,} finding{'s' * (total != 1)}")
    if not as_json:
        counts = ", ".join(f"{n:,} {kind}" for kind, n in sorted(report.counts.items()))
        last = report.head
        tip = f"; head entry {last.seq} {last.hash[:16]}" if last else ""
        checked = f", matches the published head (entry {published['seq']})" if published else ""
        click.echo(f"audit ledger intact: {report.entries:,} entries ({counts}){tip}{checked}")


if __name__ == "__main__":  # pragma: no cover
    main()
