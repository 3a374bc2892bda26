"""Turning commits into a local repository into "re-read the head" signals.

:func:`watch_refs` watches the branch's ref files: with inotify on Linux, read on the event
loop (no wake-ups while idle); elsewhere (macOS, Windows, the BSDs) with ``watchfiles``,
whose Rust watcher uses the system's own notifications from a thread.
:func:`poll_delay` spreads polls of remote repositories.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import posixpath
import random
import stat
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from watchfiles._rust_notify import RustNotify

if sys.platform == "linux":  # watch_refs: inotify, read on the event loop
    from asyncinotify import Inotify, Mask, Watch


if sys.platform == "linux":
    # What can move a ref, seen from the directory holding it: git's lock + rename (moved
    # to), a deletion (pack-refs), a plain create or write in place (other tools); and,
    # for the watched directory itself, its removal or renaming.
    _DIR_EVENTS = (
        Mask.CREATE
        | Mask.MOVED_TO
        | Mask.MOVED_FROM
        | Mask.DELETE
        | Mask.CLOSE_WRITE
        | Mask.DELETE_SELF
        | Mask.MOVE_SELF
        | Mask.ONLYDIR
        | Mask.EXCL_UNLINK
    )
    _GONE = Mask.DELETE_SELF | Mask.MOVE_SELF | Mask.UNMOUNT | Mask.IGNORED


def ref_filter(git_dir: Path, branch: str) -> Callable[[str], bool]:
    """True for a path whose change may have moved ``branch``: its loose ref (and the
    directories of a nested name), ``packed-refs``, ``HEAD``, reftable files; lock files
    never."""
    prefix = str(git_dir) + os.sep
    ref = f"refs/heads/{branch}"
    watched = {"HEAD", "packed-refs", ref}
    # A nested branch (feature/x) may appear with its directory: accept the directory's
    # creation too, in case the file inside was written before its watch was set up.
    parent = posixpath.dirname(ref)
    while parent != "refs/heads":
        watched.add(parent)
        parent = posixpath.dirname(parent)

    def accept(path: str) -> bool:
        if not path.startswith(prefix) or path.endswith(".lock"):
            return False
        rel = path[len(prefix) :].replace(os.sep, "/")
        # reftable (git >= 2.45 --ref-format=reftable) keeps every ref in reftable/.
        return rel in watched or rel.startswith("reftable/")

    return accept


class _RefWatches:
    """The inotify watches behind :func:`watch_refs`, read by a callback on the loop.

    Watches the git directory (``HEAD``, ``packed-refs``), every existing directory from
    ``refs`` down to the one that holds the branch's loose ref, and ``reftable/`` if
    present: a handful of non-recursive watches.  When one of those directories appears,
    vanishes or is replaced, the watches are re-armed (and that counts as a change, since
    a ref may have been written before its directory was watched).  Nothing runs while
    nothing happens: the inotify descriptor sits in the event loop's selector.
    """

    def __init__(self, git_dir: Path, branch: str, wake: asyncio.Event) -> None:
        self.git_dir = git_dir
        self.accept = ref_filter(git_dir, branch)
        parts = ["refs", "heads", *branch.split("/")[:-1]]
        # refs, refs/heads, refs/heads/feature, ...: each watched if it exists.
        self.chain = [git_dir.joinpath(*parts[: i + 1]) for i in range(len(parts))]
        self.reftable = git_dir / "reftable"
        self.dirs = {*self.chain, self.reftable}
        self.wake = wake
        self.changed = False
        # The branch's loose ref renamed into place (git's lock + rename): a complete new
        # value, which no later event of the same burst changes; no need to wait for quiet.
        self.settled = False
        self.ref_name = branch.split("/")[-1]
        self.ref_dir = git_dir.joinpath("refs", "heads", *branch.split("/")[:-1])
        self.error: OSError | None = None
        self.inotify = Inotify(cache_size=64)
        self.root: Watch | None = None
        self.watches: dict[Path, tuple[Watch, tuple[int, int]]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Put the watches in place; raises FileNotFoundError if ``git_dir`` is missing."""
        self.root = self.inotify.add_watch(self.git_dir, _DIR_EVENTS)
        self.rearm()
        self.changed = False  # directories found now are no news
        fd = self.inotify.fd
        os.set_blocking(fd, False)
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(fd, self._read)

    def close(self) -> None:
        loop, self.loop = self.loop, None
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self.inotify.fd)
        self.inotify.close()

    def take(self) -> bool:
        """Whether something changed since the last call; raises if watching broke."""
        if self.error is not None:
            raise self.error
        changed, self.changed = self.changed, False
        return changed

    def take_settled(self) -> bool:
        """Whether the last change was the branch ref renamed into place (see settled)."""
        settled, self.settled = self.settled, False
        return settled

    # -- inside the event loop's reader callback --

    def _read(self) -> None:
        try:
            while True:
                try:
                    event = self.inotify.sync_get()
                except BlockingIOError:
                    break
                if event is None:  # pragma: no cover - only with a sync_timeout
                    break
                self._handle(event.mask, event.watch, event.name)
        except OSError as exc:
            self.error = exc
            self.close()
        if self.changed or self.error is not None:
            self.wake.set()

    def _handle(self, mask: Mask, watch: Watch | None, name: Path | None) -> None:
        if Mask.Q_OVERFLOW in mask:  # events were dropped: look again
            self.changed = True
            self.rearm()
            return
        if watch is None:
            return
        if watch is self.root:
            if name is None and mask & _GONE:
                raise FileNotFoundError(
                    errno.ENOENT, "the watched git directory was removed", str(self.git_dir)
                )
        elif not any(watch is w for w, _ in self.watches.values()):
            return  # a watch already replaced: its last events are stale
        if name is None:  # about the watched directory itself
            if mask & _GONE:
                self.rearm()
            return
        path = watch.path / name
        if self.accept(str(path)):
            self.changed = True
            # Only the rename of the ref itself is final; packed-refs, a deletion or a
            # write in place may be followed by more of the same burst.
            self.settled = (
                Mask.MOVED_TO in mask and watch.path == self.ref_dir and str(name) == self.ref_name
            )
        if Mask.ISDIR in mask and path in self.dirs:
            self.rearm()

    def rearm(self) -> None:
        """Watch each directory of the chain down to the deepest existing one."""
        for i, path in enumerate(self.chain):
            if not self._arm(path):
                for below in self.chain[i:]:
                    self._drop(below)
                break
        self._arm(self.reftable)

    def _arm(self, path: Path) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is None or not stat.S_ISDIR(st.st_mode):
            self._drop(path)
            return False
        key = (st.st_dev, st.st_ino)
        current = self.watches.get(path)
        if current is not None and current[1] == key:
            return True
        self._drop(path)  # replaced (or moved away): its old watch follows the old inode
        try:
            watch = self.inotify.add_watch(path, _DIR_EVENTS)
        except (FileNotFoundError, NotADirectoryError):
            return False
        self.watches[path] = (watch, key)
        self.changed = True  # a ref inside may predate the watch
        return True

    def _drop(self, path: Path) -> None:
        entry = self.watches.pop(path, None)
        if entry is not None:
            with contextlib.suppress(OSError):  # already gone with its directory
                self.inotify.rm_watch(entry[0])


class _NotifyWatches:
    """The portable watcher behind :func:`watch_refs`: ``watchfiles``' Rust watcher
    (FSEvents, kqueue, ReadDirectoryChangesW, inotify) over the whole git directory, in a
    thread of its own that wakes the loop only for a change that may have moved the branch.

    Used where inotify is absent.  Unlike :class:`_RefWatches` it checks for changes every
    ``step_ms`` in its thread (what watchfiles does), so it costs a little while idle.
    """

    def __init__(
        self, git_dir: Path, branch: str, wake: asyncio.Event, debounce_ms: int, step_ms: int
    ) -> None:
        self.git_dir = git_dir
        self.accept = ref_filter(git_dir, branch)
        self.wake = wake
        self.debounce_ms = max(debounce_ms, 1)
        self.step_ms = max(step_ms, 1)
        self.changed = False
        self.error: OSError | None = None
        self.halt = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Put the watch in place; raises FileNotFoundError if ``git_dir`` is missing."""
        if not self.git_dir.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such directory", str(self.git_dir))
        # Recursive: a nested branch's directories may appear later (a handful of
        # directories besides objects/, whose events the thread drops).
        # watchfiles' documented Rust backend (https://watchfiles.helpmanual.io/api/rust_backend/):
        # unlike awatch() it says when the watch is in place (``ready``) and takes a thread
        # event. Imported here: Linux daemons watch with inotify and need none of it.
        from watchfiles._rust_notify import RustNotify

        notify = await asyncio.to_thread(
            RustNotify, [str(self.git_dir)], False, False, 300, True, True
        )
        self.loop = asyncio.get_running_loop()
        threading.Thread(target=self._run, args=(notify,), name="watch-refs", daemon=True).start()

    def close(self) -> None:
        self.halt.set()  # the thread sees it within step_ms and closes the watcher

    def take(self) -> bool:
        """Whether something changed since the last call; raises if watching broke."""
        if self.error is not None:
            raise self.error
        changed, self.changed = self.changed, False
        return changed

    def take_settled(self) -> bool:
        """Never: watchfiles gives no event kinds to tell a finished ref update by."""
        return False

    def _run(self, notify: RustNotify) -> None:
        try:
            while not self.halt.is_set():
                result = notify.watch(self.debounce_ms, self.step_ms, 0, self.halt)
                if isinstance(result, str):  # "stop", or "signal"/"timeout": look again
                    continue
                error: OSError | None = None
                if not self.git_dir.is_dir():
                    error = FileNotFoundError(
                        errno.ENOENT, "the watched git directory was removed", str(self.git_dir)
                    )
                if error is not None or any(self.accept(path) for _, path in result):
                    self._tell(error)
        except Exception as exc:  # the watcher itself failed: the caller watches anew
            self._tell(exc if isinstance(exc, OSError) else OSError(str(exc)))
        finally:
            notify.close()

    def _tell(self, error: OSError | None) -> None:
        loop = self.loop
        if loop is None or self.halt.is_set():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._mark, error)

    def _mark(self, error: OSError | None) -> None:
        if error is not None:
            self.error = error
        else:
            self.changed = True
        self.wake.set()


Backend = Literal["auto", "inotify", "watchfiles"]


async def _set_when(event: asyncio.Event, then: asyncio.Event) -> None:
    await event.wait()
    then.set()


async def watch_refs(
    git_dir: Path,
    branch: str,
    *,
    stop: asyncio.Event | None = None,
    debounce_ms: int = 20,
    step_ms: int = 10,
    ready: asyncio.Event | None = None,
    backend: Backend = "auto",
) -> AsyncIterator[None]:
    """Yield once per burst of changes that may have moved ``branch`` in ``git_dir``.

    Watches ``refs/heads/<branch>`` (written by lock + rename), ``packed-refs`` and
    ``HEAD`` (and ``reftable/``); lock files, objects and logs are ignored.  A yield means
    "re-read the head", never anything more.  After the first relevant event it waits for
    ``debounce_ms`` of quiet (at most 4 × ``debounce_ms`` in all), so that one commit or
    ``git pack-refs`` gives one yield; except that with inotify, the branch's loose ref
    renamed into place (how git writes a commit or a push) yields at once: that value is
    final, and waiting would add ``debounce_ms`` to every commit's way to its deployment.

    ``backend``: ``"inotify"`` (Linux: watches read on the event loop with
    ``asyncinotify``, so an idle watch costs no CPU and no wake-ups), ``"watchfiles"``
    (anywhere: the system's notifications in a thread that checks every ``step_ms``), or
    ``"auto"``: inotify on Linux, watchfiles elsewhere.

    Ends promptly once ``stop`` is set (cancelling the iteration never sets ``stop``).
    ``ready``, if given, is set once the watches are in place: a change after that is
    seen, so re-read the head then.  Raises FileNotFoundError if ``git_dir`` does not
    exist, or later if it is removed or renamed (call again to watch it anew).
    """
    if stop is not None and stop.is_set():
        return
    if backend == "auto":
        backend = "inotify" if sys.platform == "linux" else "watchfiles"
    git_dir = Path(os.path.realpath(git_dir))
    wake = asyncio.Event()
    watches: _RefWatches | _NotifyWatches
    if backend == "inotify":
        if sys.platform != "linux":
            raise OSError(f"inotify is Linux only (not {sys.platform}): use watchfiles")
        watches = _RefWatches(git_dir, branch, wake)
    else:
        watches = _NotifyWatches(git_dir, branch, wake, debounce_ms, step_ms)
    forward = None
    try:
        if isinstance(watches, _RefWatches):
            watches.start()
        else:
            await watches.start()
        if stop is not None:
            forward = asyncio.create_task(_set_when(stop, wake))
        if ready is not None:
            ready.set()
        loop = asyncio.get_running_loop()
        quiet = max(debounce_ms, 0) / 1000
        while True:
            await wake.wait()
            wake.clear()
            if stop is not None and stop.is_set():
                return
            if not watches.take():
                continue
            if watches.take_settled():
                yield None
                continue
            give_up = loop.time() + 4 * quiet
            while (left := min(quiet, give_up - loop.time())) > 0:
                try:
                    async with asyncio.timeout(left):
                        await wake.wait()
                except TimeoutError:
                    break
                wake.clear()
                if stop is not None and stop.is_set():
                    return
                watches.take()  # more of the same burst (or an error, raised)
            yield None
    finally:
        if forward is not None:
            forward.cancel()
        watches.close()


def poll_delay(interval: float, jitter: float = 0.1, rng: random.Random | None = None) -> float:
    """``interval`` ± ``jitter`` (a fraction of it), uniform, never negative.

    A zero interval means "polling off": the caller must not poll, so it is a ValueError.
    """
    if interval <= 0:
        raise ValueError("poll interval must be positive (0 turns polling off)")
    if jitter < 0:
        raise ValueError("jitter must not be negative")
    r = rng if rng is not None else random
    return max(0.0, interval * (1.0 + r.uniform(-jitter, jitter)))
