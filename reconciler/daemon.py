"""The long-running process: start, watch, poll, sync, stop.

Everything runs on one asyncio loop. Sync requests (a watched commit, a poll tick, an
operator's SIGUSR1) only set a flag; one sync task drains it, so a storm of requests
becomes one fetch of the newest head.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from reconciler.config import Config
from reconciler.engine import Engine, open_source
from reconciler.lock import StateLock
from reconciler.providers import build_providers
from reconciler.source import poll_delay, watch_refs
from reconciler.store import Store

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.engine: Engine | None = None
        self._sync_requested = asyncio.Event()
        self._trigger = "poll"
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()

    def request_sync(self, trigger: str) -> None:
        # The strongest reason wins when requests coalesce: it is what the sync records.
        if not self._sync_requested.is_set() or trigger in ("manual", "webhook", "watch"):
            self._trigger = trigger
        self._sync_requested.set()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        cfg = self.config
        providers = build_providers(cfg)
        lock = StateLock(cfg.state_dir)
        lock.acquire()
        try:
            store = await asyncio.to_thread(Store.from_url, cfg.database_url, migrate=True)
            source = open_source(cfg)
            engine = self.engine = Engine(cfg, store, source, providers)
            await engine.recover()
            scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop())
            engine.scheduler = scheduler
            scheduler.start()
            loop = asyncio.get_running_loop()
            for sig, handler in (
                (signal.SIGTERM, self.stop),
                (signal.SIGINT, self.stop),
                (signal.SIGUSR1, lambda: self.request_sync("manual")),
            ):
                loop.add_signal_handler(sig, handler)
            tasks = [asyncio.create_task(self._sync_loop(), name="sync-loop")]
            if cfg.repository.poll_interval > 0:
                tasks.append(asyncio.create_task(self._poll_loop(), name="poll"))
            git_dir = source.local_git_dir()
            if cfg.repository.watch and git_dir is not None:
                tasks.append(asyncio.create_task(self._watch_loop(git_dir), name="watch"))
            log.info(
                "event=started pid=%d repository=%s branch=%s database=%s watch=%s poll=%ss",
                os.getpid(),
                cfg.repository_url,
                cfg.repository.branch,
                _safe_url(cfg.database_url),
                git_dir is not None and cfg.repository.watch,
                cfg.repository.poll_interval,
            )
            self.request_sync("startup")
            await self._stop.wait()
            log.info(
                "event=stopping grace=%ss deploying=%d",
                cfg.daemon.shutdown_grace,
                len(engine.deploying),
            )
            cancelled = await engine.stop(cfg.daemon.shutdown_grace)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if cancelled:
                log.warning("event=cancelled_at_stop ids=%s", ",".join(map(str, cancelled)))
            source.close()
            log.info("event=stopped")
        finally:
            lock.release()

    async def _sync_loop(self) -> None:
        assert self.engine is not None
        retry = 1.0
        while True:
            await self._sync_requested.wait()
            self._sync_requested.clear()
            trigger = self._trigger
            try:
                outcome = await self.engine.sync(trigger)
            except Exception as exc:  # the database is away, say: try the same sync again soon
                log.error(
                    "event=sync_error error=%r", f"{type(exc).__name__}: {exc}".splitlines()[0]
                )
                await asyncio.sleep(retry)
                retry = min(retry * 2, 60.0)
                self.request_sync(trigger)
                continue
            if outcome.result != "failed":
                retry = 1.0
                self.ready.set()
                if trigger == "manual":
                    self.engine.wake(self.engine.effective)
            elif not self.ready.is_set():
                # Until the first fetch works there is nothing to reconcile: keep trying.
                await asyncio.sleep(retry)
                retry = min(retry * 2, max(self.config.repository.poll_interval, 5.0))
                self.request_sync("startup")

    async def _poll_loop(self) -> None:
        interval = self.config.repository.poll_interval
        while True:
            await asyncio.sleep(poll_delay(interval))
            self.request_sync("poll")

    async def _watch_loop(self, git_dir: Path) -> None:
        while True:
            ready = asyncio.Event()
            # A commit that landed before the watch was in place is caught by one more look.
            catch_up = asyncio.create_task(self._after(ready, "watch"))
            try:
                async for _ in watch_refs(
                    git_dir, self.config.repository.branch, stop=self._stop, ready=ready
                ):
                    self.request_sync("watch")
                return
            except Exception as exc:  # the folder vanished, say: fall back on polling for a while
                log.warning("event=watch_failed error=%r", str(exc))
                await asyncio.sleep(max(self.config.repository.poll_interval, 5.0))
            finally:
                catch_up.cancel()

    async def _after(self, event: asyncio.Event, trigger: str) -> None:
        await event.wait()
        self.request_sync(trigger)


def _safe_url(url: str) -> str:
    """A database URL without its password, for logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url


def run_daemon(config: Config) -> None:
    daemon = Daemon(config)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(daemon.run())
