"""Rendering the dashboard's HTML: Jinja2 templates shipped in the package, autoescaped.

A page is rendered in a worker thread, never on the event loop (a fleet's overview is
thousands of rows). A page may be *streamed*: the template asks for slow values through
`Later` objects, and whatever it has rendered before it asks is sent first, so a browser
has the page's head, header and navigation (and starts fetching its CSS) while the fleet
is still being read.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from importlib import resources
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from markupsafe import Markup
from starlette.exceptions import HTTPException

# jinja2 is imported with the first page (`_environment`): ~100 ms and a few MB that a
# daemon nobody opens the dashboard of never needs.
if TYPE_CHECKING:
    import jinja2

log = logging.getLogger("reconciler.http")
T = TypeVar("T")

#: Bytes (well, characters) gathered before a chunk of a streamed page is sent.
CHUNK_CHARS = 64 * 1024
#: Chunks a streamed page may have rendered ahead of a slow reader.
QUEUE_CHUNKS = 4
#: How often a render thread waiting for the loop looks whether its reader is gone.
CLOSED_CHECK_SECONDS = 1.0
#: Threads that render pages: their own, so a render waiting for a read (on the read
#: threads) can never hold up that read.
RENDER_THREADS = 2

_renders: ThreadPoolExecutor | None = None


def _render_pool() -> ThreadPoolExecutor:
    global _renders
    if _renders is None:
        _renders = ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix="http-render")
    return _renders


def _when(value: str | datetime | None) -> str:
    """A time as the API writes it (RFC 3339 UTC, seconds); '-' for none."""
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return value


def _short(sha: str | None) -> str:
    return sha[:9] if sha else "-"


def _environment() -> jinja2.Environment:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("reconciler.http", "templates"),
        autoescape=True,  # every template is HTML; a service named <script> stays text
        undefined=jinja2.StrictUndefined,  # a misspelt name is an error in the tests
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["short"] = _short
    return env


_templates: jinja2.Environment | None = None


def templates() -> jinja2.Environment:
    global _templates
    if _templates is None:
        _templates = _environment()
    return _templates


def static_file(name: str) -> bytes | None:
    """A file of the package's `static` folder (CSS, JS), or None if there is none."""
    if "/" in name or name.startswith("."):
        return None
    path = resources.files("reconciler.http").joinpath("static", name)
    return path.read_bytes() if path.is_file() else None


async def render(name: str, **context: Any) -> str:
    """The whole page, rendered off the loop."""
    template = templates().get_template(name)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_render_pool(), partial(template.render, **context))


@dataclass
class Outcome(Generic[T]):
    """A value a page waited for, or why there is none (one sentence for the reader)."""

    value: T | None = None
    error: str | None = None


class Later(Generic[T]):
    """A value that a streamed template waits for (``{% set x = later() %}``).

    Calling it from the render thread first sends what the page has so far, then runs the
    coroutine on the loop and waits for it. A failure becomes ``Outcome.error``: a page
    already on its way cannot change its status, so it says what went wrong in place.
    """

    def __init__(self, make: Callable[..., Awaitable[T]]) -> None:
        self._make = make
        self._stream: _Stream | None = None

    def __call__(self, *args: Any) -> Outcome[T]:
        stream = self._stream
        assert stream is not None, "a Later is only called while its page streams"
        stream.flush()
        return stream.wait(_outcome(partial(self._make, *args)))


async def _outcome(make: Callable[[], Awaitable[T]]) -> Outcome[T]:
    try:
        return Outcome(value=await make())
    except HTTPException as exc:  # e.g. the database unavailable (503)
        return Outcome(error=str(exc.detail))
    except Exception as exc:
        log.error(
            "event=dashboard_error error=%r",
            f"{type(exc).__name__}: {exc}".splitlines()[0],
        )
        return Outcome(error="internal error: see the daemon's log")


class _Closed(Exception):
    """The reader went away: stop rendering."""


class _Stream:
    """One streamed page: the render thread produces chunks, the response sends them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[str | None] = asyncio.Queue(QUEUE_CHUNKS)
        self.closed = False
        self._pending: list[str] = []
        self._size = 0

    def write(self, piece: str) -> None:
        self._pending.append(piece)
        self._size += len(piece)
        if self._size >= CHUNK_CHARS:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            chunk = "".join(self._pending)
            self._pending.clear()
            self._size = 0
            self._put(chunk)

    def _put(self, item: str | None) -> None:
        if self.closed:
            raise _Closed
        self.wait(self.queue.put(item))

    def wait(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """In the render thread: run ``coroutine`` on the loop and wait for it, but give
        up once the reader is gone (or the loop stopped, the server with it), so that no
        render thread waits forever and holds up the process's exit."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        while True:
            try:
                return future.result(timeout=CLOSED_CHECK_SECONDS)
            except concurrent.futures.TimeoutError:
                if self.closed or self.loop.is_closed():
                    future.cancel()
                    raise _Closed from None

    def produce(self, pieces: Iterator[str]) -> None:
        """In the render thread: the template's output, in chunks, then the end."""
        try:
            for piece in pieces:
                self.write(piece)
            self.flush()
        except _Closed:
            return
        except Exception as exc:  # a bug in a template: the page ends with a line saying so
            log.error(
                "event=dashboard_render_error error=%r",
                f"{type(exc).__name__}: {exc}".splitlines()[0],
            )
            self._pending.append(
                '\n<p role="alert">internal error: see the daemon\'s log</p></main></body></html>\n'
            )
            self.flush()
        try:
            self._put(None)
        except _Closed:
            return


#: Where a streamed template's head ends (``{{ head_end }}``, before its first `Later`):
#: what comes before it is rendered on the loop and sent at once, without a thread hop.
HEAD_END = Markup("<!-- head end -->")  # Markup: autoescape leaves it as it is


async def stream(name: str, **context: Any) -> AsyncIterator[bytes]:
    """The page's bytes as the template produces them (`Later` values in ``context`` are
    waited for in place)."""
    loop = asyncio.get_running_loop()
    page = _Stream(loop)
    for value in context.values():
        if isinstance(value, Later):
            value._stream = page
    pieces = templates().get_template(name).generate(head_end=HEAD_END, **context)
    head = []
    for piece in pieces:  # a few static lines: cheap enough for the loop
        if piece == HEAD_END:
            break
        head.append(piece)
    yield "".join(head).encode()
    # The rest in a render thread: a generator may go on in another thread.
    done = loop.run_in_executor(_render_pool(), page.produce, pieces)
    try:
        while (chunk := await page.queue.get()) is not None:
            yield chunk.encode()
        await done
    finally:
        page.closed = True
        while not page.queue.empty():  # unblock a render waiting to put
            page.queue.get_nowait()
