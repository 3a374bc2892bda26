"""The sync pipeline: fetch the branch head, load what changed, record the sync.

A sync reads the head, parses only the environment files that changed since the last
synced commit, records the sync and its environment states, and publishes the result as
one immutable `Snapshot`. Runners decide and deploy from a snapshot, never from state
that may change under them while they wait (SPEC §4 rule 3: a stale decision must not
deploy an intermediate version).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from types import MappingProxyType

from desired_state import (
    DesiredState,
    EnvironmentSpec,
    FileError,
    ParsedFile,
    SpecCheck,
    assemble,
    gc_paused,
    parse_environment_file,
)
from reconciler.config import Config
from reconciler.source import Changes, CommitInfo, GitSource, SignatureVerifier, SourceError
from reconciler.store import CommitMeta, EnvironmentStateRecord, Store

# The engine's logger name, as before the split: operators filter the journal on it.
log = logging.getLogger("reconciler.engine")


@dataclass
class SyncOutcome:
    sync_id: int | None
    commit: str | None
    result: str  # ok | errors | failed | refused | unchanged
    environments_changed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    message: str | None = None
    trigger: str = ""
    duration_seconds: float = 0.0


@dataclass(frozen=True)
class Snapshot:
    """The desired state as of one synced commit. Never changed once published: a sync
    publishes a new one, so whoever holds a snapshot decides and deploys from one commit,
    one sync id and one effective desired state."""

    commit: CommitMeta | None = None
    sync_id: int | None = None
    parsed: Mapping[str, ParsedFile] = field(default_factory=dict)
    desired: DesiredState | None = None
    # Valid environments as written; a broken one keeps its last valid desired state.
    effective: Mapping[str, EnvironmentSpec] = field(default_factory=dict)
    invalid: Mapping[str, str] = field(default_factory=dict)  # environment -> first error
    # Set while the branch head is refused (untrusted signature, force push): why. What is
    # above stays the last applied state; `status` and `plan` say so beside each service.
    refusal: str | None = None

    def __post_init__(self) -> None:
        # Read-only views: a snapshot is shared by every runner that decided from it.
        for name in ("parsed", "effective", "invalid"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))


@dataclass(frozen=True)
class Refusal:
    """A head that is not applied, and why; what was applied before stays in force."""

    message: str
    applied: str | None  # the last applied commit
    signer: str | None = None  # who signed the head, when allowed_signers is set


def _rewritten(head: str, applied: str, signer: str | None) -> Refusal:
    return Refusal(
        f"refused {head[:12]}: it does not descend from the last applied commit "
        f"{applied[:12]} (history rewritten); set repository.allow_force_push = true to accept",
        applied,
        signer,
    )


@dataclass
class _Prepared:
    """A sync's reading half: what the head says, before anything is recorded."""

    refusal: Refusal | None  # set: the head is not applied
    meta: CommitMeta | None = None
    parsed: dict[str, ParsedFile] = field(default_factory=dict)
    desired: DesiredState = field(default_factory=lambda: assemble([]))
    effective: dict[str, EnvironmentSpec] = field(default_factory=dict)
    invalid: dict[str, str] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)
    full: bool = False
    note: str | None = None
    signer: str | None = None  # who signed the head (allowed_signers)

    @property
    def result(self) -> str:
        return "errors" if self.desired.errors else "ok"


def _meta(info: CommitInfo) -> CommitMeta:
    return CommitMeta(sha=info.sha, author=info.author, time=info.authored_at, subject=info.subject)


def open_verifier(config: Config) -> SignatureVerifier | None:
    """The signature check of `repository.allowed_signers`; None when it is not set."""
    signers = config.allowed_signers
    if signers is None:
        return None
    state = Path(config.state_dir)
    return SignatureVerifier(signers, state / "repo.git", state)


def open_source(config: Config) -> GitSource:
    return GitSource(
        config.repository_url,
        config.repository.branch,
        config.repository.path,
        Path(config.state_dir) / "repo.git",
    )


class SyncPipeline:
    """fetch → load → record, one sync at a time; `snapshot` is the latest result."""

    def __init__(
        self,
        config: Config,
        store: Store,
        source: GitSource,
        provider_names: Collection[str],
        clock: Callable[[], datetime],
    ) -> None:
        self.config = config
        self.store = store
        self.source = source
        self.provider_names = provider_names  # replaced on reload
        # The providers' own checks of the files that name them (params, strategy).
        self.check: SpecCheck | None = None
        self.clock = clock
        self.verifier = open_verifier(config)  # replaced on reload (reconfigure)
        self.snapshot = Snapshot()
        self._path_env: dict[str, str] = {}  # file path -> the environment it last declared
        self._lock = asyncio.Lock()
        self._last_error: str | None = None
        self._keeping: asyncio.Task[None] | None = None  # GitSource.keep of the last commit

    def reconfigure(self, config: Config, verifier: SignatureVerifier | None) -> None:
        """A reloaded configuration, with the verifier made (and prepared) for it."""
        self.config = config
        if verifier is None or self.verifier is None or verifier.home != self.verifier.home:
            self.verifier = verifier  # the same keys keep their verdicts
            self._last_error = None  # a refusal may read differently now: record it again

    async def run(self, trigger: str) -> tuple[SyncOutcome, list[str]]:
        """One pass over the branch head: the outcome, and the environments to wake."""
        async with self._lock:
            started = time.monotonic()
            outcome, wake = await self._sync(trigger)
            outcome.trigger = trigger
            outcome.duration_seconds = time.monotonic() - started
        return outcome, wake

    def _parse(self, files: Mapping[str, bytes]) -> dict[str, ParsedFile]:
        prefix = self.config.repository.path.strip("/")
        shown = (lambda p: p) if prefix in ("", ".") else (lambda p: f"{prefix}/{p}")
        check = self.check
        with gc_paused():
            return {
                path: parse_environment_file(shown(path), data, check)
                for path, data in files.items()
            }

    async def _sync(self, trigger: str) -> tuple[SyncOutcome, list[str]]:
        seen = self.clock()
        try:
            head = await asyncio.to_thread(self.source.fetch)
        except SourceError as exc:
            return await self._fetch_failed(trigger, seen, str(exc)), []
        current = self.snapshot
        old = current.commit.sha if current.commit else None
        if head == old and trigger in ("poll", "watch", "webhook") and current.refusal is None:
            self._last_error = None
            return SyncOutcome(current.sync_id, head, "unchanged"), []
        # Reading and parsing in one trip off the loop; nothing is applied yet.
        step = await asyncio.to_thread(self._prepare, old, head)
        if step.refusal is not None:
            return await self._refuse(trigger, seen, head, step.refusal)
        self._last_error = None
        sync_id = await asyncio.to_thread(self._record, trigger, seen, step)
        self.snapshot = Snapshot(
            step.meta, sync_id, step.parsed, step.desired, step.effective, step.invalid
        )
        log.info(
            "event=sync trigger=%s commit=%s result=%s changed=%s errors=%d full=%s%s",
            trigger,
            head[:12],
            step.result,
            ",".join(step.changed) or "-",
            len(step.desired.errors),
            step.full,
            f" note={step.note!r}" if step.note else "",
        )
        for err in step.desired.errors:
            log.warning("event=invalid_file error=%r", str(err))
        wake = list(step.effective) if old is None or step.full else step.changed
        if head != old:  # beside the deployments, which need not wait for it (~30 ms)
            previous = self._keeping
            self._keeping = asyncio.create_task(self._keep(head, previous), name="keep")
        errors = [str(e) for e in step.desired.errors]
        return SyncOutcome(sync_id, head, step.result, step.changed, errors), wake

    def _judge(self, head: str, applied: str | None) -> tuple[Refusal | None, str | None]:
        """With allowed_signers, a new head must be signed by a trusted key: (the refusal
        if it is not, the signer). The applied commit itself is not checked again."""
        if self.verifier is None or head == applied:
            return None, None
        verdict = self.verifier.verify(head)
        if verdict.trusted:
            return None, verdict.signer
        message = f"refused {head[:12]}: {verdict.reason} (repository.allowed_signers)"
        return Refusal(message, applied, verdict.signer), verdict.signer

    def _prepare(self, old: str | None, head: str) -> _Prepared:
        """Load what changed since `old`, parse it, and work out the new desired state."""
        # After a restart: compare with the last commit the ledger says was applied.
        applied = old if old is not None else self.store.last_synced_commit()
        refusal, signer = self._judge(head, applied)
        if refusal is not None:
            return _Prepared(refusal)
        changes = self.source.load(old, head)
        if old is not None:
            rewritten = changes.full and changes.reason is not None
        else:
            rewritten = (
                applied is not None
                and applied != head
                and not self.source.is_ancestor(applied, head)
            )
        if rewritten and not self.config.repository.allow_force_push:
            return _Prepared(_rewritten(head, applied or "", signer))
        step = self._read(head, changes)
        step.signer = signer
        if rewritten and step.note is None:
            step.note = f"history rewritten: {(applied or '')[:12]} is not an ancestor of {head[:12]}; full load"
        return step

    def _read(self, head: str, changes: Changes) -> _Prepared:
        """Parse what changed and work out the desired state it makes (nothing recorded)."""
        meta = _meta(self.source.commit_info(head))
        parsed = {} if changes.full else dict(self.snapshot.parsed)
        for path in changes.deleted:
            parsed.pop(path, None)
        parsed.update(self._parse(changes.files))
        desired = assemble(parsed.values(), providers=self.provider_names)
        effective, invalid = self._effective(desired, parsed)
        before_effective, before_invalid = self.snapshot.effective, self.snapshot.invalid
        changed = sorted(
            env
            for env in set(effective) | set(before_effective) | set(invalid) | set(before_invalid)
            if effective.get(env) != before_effective.get(env)
            or invalid.get(env) != before_invalid.get(env)
        )
        return _Prepared(
            None, meta, parsed, desired, effective, invalid, changed, changes.full, changes.reason
        )

    def _record(self, trigger: str, seen: datetime, step: _Prepared) -> int:
        assert step.meta is not None and step.desired is not None
        sync_id = self.store.begin_sync(
            trigger=trigger, seen_at=seen, commit=step.meta, signer=step.signer
        )
        self._save_states(step.desired, step.meta.sha)
        saved = set(self.store.environment_states()) if step.full else set(self.snapshot.effective)
        self.store.forget_environment_states(saved - set(step.effective))
        self.store.finish_sync(
            sync_id,
            result=step.result,
            ended_at=self.clock(),
            environments_changed=step.changed,
            errors=[e.to_dict() for e in step.desired.errors],
            full_load=step.full,
            note=step.note,
        )
        return sync_id

    async def _keep(self, sha: str, previous: asyncio.Task[None] | None) -> None:
        """Have the mirror keep what was applied readable (GitSource.keep), in order."""
        if previous is not None:
            await previous
        try:
            await asyncio.to_thread(self.source.keep, sha)
        except Exception as exc:  # the next applied commit tries again
            log.warning("event=keep_failed commit=%s error=%r", sha[:12], str(exc))

    async def kept(self) -> None:
        """Wait until the mirror keeps the last applied commit (stop, standalone runs)."""
        if self._keeping is not None:
            await asyncio.shield(self._keeping)

    async def _refuse(
        self, trigger: str, seen: datetime, head: str, refusal: Refusal
    ) -> tuple[SyncOutcome, list[str]]:
        """A head that is not applied (a force push without `allow_force_push`, a commit
        not signed by a key of `allowed_signers`): the last applied state stays in force;
        recorded once per refused head and reason."""
        message, applied = refusal.message, refusal.applied
        wake: list[str] = []
        if self.snapshot.commit is None and applied:
            # Just started: what stays in force is what was applied, not nothing.
            await self._load_applied(applied)
            wake = list(self.snapshot.effective)
        self.snapshot = replace(self.snapshot, refusal=message)
        log.error(
            "event=sync_refused commit=%s applied=%s signer=%s reason=%r",
            head[:12],
            (applied or "-")[:12],
            refusal.signer or "-",
            message,
        )
        meta = None
        if message != self._last_error:  # already recorded: no need to read the commit
            meta = _meta(await asyncio.to_thread(self.source.commit_info, head))
        sync_id = await self._record_once(trigger, seen, meta, "refused", message, refusal.signer)
        return SyncOutcome(sync_id, head, "refused", message=message), wake

    async def _fetch_failed(self, trigger: str, seen: datetime, message: str) -> SyncOutcome:
        log.error("event=fetch_failed error=%r", message)
        sync_id = await self._record_once(trigger, seen, None, "failed", message)
        return SyncOutcome(sync_id, None, "failed", message=message)

    async def _record_once(
        self,
        trigger: str,
        seen: datetime,
        commit: CommitMeta | None,
        result: str,
        message: str,
        signer: str | None = None,
    ) -> int | None:
        """Record a sync that applied nothing, once per distinct error: the same outage or
        refusal is one record, not one per poll."""
        if message == self._last_error:
            return None
        self._last_error = message
        sync_id = await asyncio.to_thread(
            self.store.begin_sync, trigger=trigger, seen_at=seen, commit=commit, signer=signer
        )
        await asyncio.to_thread(
            self.store.finish_sync,
            sync_id,
            result=result,
            ended_at=self.clock(),
            environments_changed=[],
            errors=[],
            full_load=False,
            error_message=message,
        )
        return sync_id

    def _effective(
        self, desired: DesiredState, parsed: Mapping[str, ParsedFile]
    ) -> tuple[dict[str, EnvironmentSpec], dict[str, str]]:
        """Valid environments as written; a broken one keeps its last valid desired state.

        A file too broken to name its environment is matched to the environment it declared
        before (by path), so that environment shows as invalid instead of vanishing.
        """
        effective = dict(desired.environments)
        failing: dict[str, list[FileError]] = {e: list(errs) for e, errs in desired.invalid.items()}
        saved: dict[str, EnvironmentStateRecord] | None = None
        by_shown_path = {p.path: p for p in parsed.values()}
        for path, errs in desired.broken_files.items():
            pf = by_shown_path.get(path)
            name = pf.env_name if pf is not None else None
            if name is None:
                name = self._path_env.get(path)
            if name is None:
                saved = saved if saved is not None else self.store.environment_states()
                name = next((e for e, st in saved.items() if st.source_path == path), None)
            if name is not None and name not in effective:
                failing.setdefault(name, list(errs))
        invalid: dict[str, str] = {}
        for env, errs in failing.items():
            invalid[env] = str(errs[0]) + (f" (+{len(errs) - 1} more)" if len(errs) > 1 else "")
            effective.pop(env, None)
            previous = self.snapshot.effective.get(env)
            if previous is None:
                saved = saved if saved is not None else self.store.environment_states()
                if env in saved:
                    previous = EnvironmentSpec.model_validate(saved[env].spec)
            if previous is not None:
                effective[env] = previous
        for env, path in desired.sources.items():
            self._path_env[path] = env
        return effective, invalid

    def _save_states(self, desired: DesiredState, commit: str) -> None:
        changed = [
            (env, spec.model_dump(mode="json"), desired.sources[env])
            for env, spec in desired.environments.items()
            if self.snapshot.effective.get(env) != spec
        ]
        if changed:
            self.store.save_environment_states(changed, commit=commit, at=self.clock())

    async def load_at_last_sync(self) -> None:
        """The desired state of the last synced commit, from the local clone (for `status`),
        and the refusal of the head that the ledger says is still in force, if any."""
        sha, refused = await asyncio.to_thread(
            lambda: (self.store.last_synced_commit(), self.store.refusal_in_force())
        )
        if sha is not None:
            await self._load_applied(sha)
        if refused is not None and refused.error_message:
            self.snapshot = replace(self.snapshot, refusal=refused.error_message)

    async def _load_applied(self, sha: str) -> None:
        """The desired state applied at `sha`: read from the mirror (which keeps it), else,
        when even the mirror cannot read it (deleted, say), the environment states saved at
        each sync."""
        try:
            await self._load_full(sha)
            return
        except SourceError as exc:
            log.warning(
                "event=applied_commit_unreadable commit=%s error=%r using=saved_states",
                sha[:12],
                str(exc),
            )
        saved, meta = await asyncio.to_thread(
            lambda: (self.store.environment_states(), self.store.applied_commit())
        )
        effective = {
            name: EnvironmentSpec.model_validate(state.spec) for name, state in saved.items()
        }
        commit = meta if meta is not None and meta.sha == sha else CommitMeta(sha, None, None, None)
        self.snapshot = Snapshot(commit, self.snapshot.sync_id, {}, None, effective, {})

    async def preview(self, *, judge: bool = False) -> None:
        """The desired state at the fetched branch head, recording nothing (`validate`).

        `judge` (for `plan`): a head that a sync would refuse is not loaded; the last applied
        state is, with the refusal beside it."""
        head = await asyncio.to_thread(self.source.fetch)
        refusal = await asyncio.to_thread(self._refusal, head) if judge else None
        if refusal is None:
            await self._load_full(head)
            return
        if refusal.applied:
            await self._load_applied(refusal.applied)
        self.snapshot = replace(self.snapshot, refusal=refusal.message)

    def _refusal(self, head: str) -> Refusal | None:
        """Why a sync would refuse `head` now, if it would (nothing recorded)."""
        applied = self.store.last_synced_commit()
        refusal, signer = self._judge(head, applied)
        if (
            refusal is None
            and applied is not None
            and applied != head
            and not self.config.repository.allow_force_push
            and not self.source.is_ancestor(applied, head)
        ):
            refusal = _rewritten(head, applied, signer)
        return refusal

    async def _load_full(self, sha: str) -> None:
        step = await asyncio.to_thread(lambda: self._read(sha, self.source.load(None, sha)))
        self.snapshot = Snapshot(
            step.meta,
            self.snapshot.sync_id,
            step.parsed,
            step.desired,
            step.effective,
            step.invalid,
        )
