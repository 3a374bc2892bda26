"""The dashboard's pages through a real uvicorn server and a real client, over a real store.

The daemon side is test_http's fake `Control` (decisions given by the test) over a real
SQLite store and event hub: what the pages read is what a daemon would have recorded.
"""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from html.parser import HTMLParser

import pytest
from sqlalchemy import text

from reconciler.http import dashboard, pages
from reconciler.plan import Decision
from reconciler.store import CommitMeta, LedgerCheck, Store, make_engine, verify
from tests import test_http
from tests.test_http import BAD_HISTORY_PARAMS, T0, FakeControl, Harness

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

# test_http's fixtures: a real server over the fake control and a real store.
anyio_backend = test_http.anyio_backend
http = test_http.http

HOSTILE = "<script>alert(1)</script>"


class Outline(HTMLParser):
    """The facts about a page that tests look at: landmarks, headers, text, scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.script_text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # A boolean attribute (open, selected) reads as "".
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        (self.script_text if self._in_script else self.text).append(data)

    def has(self, tag: str, **attrs: str) -> bool:
        return any(t == tag and all(a.get(k) == v for k, v in attrs.items()) for t, a in self.tags)

    @property
    def words(self) -> str:
        return " ".join(" ".join(self.text).split())


def outline(html: str) -> Outline:
    parsed = Outline()
    parsed.feed(html)
    parsed.close()
    return parsed


def assert_accessible_page(html: str) -> Outline:
    page = outline(html)
    assert page.has("html", lang="en")
    assert page.has("title")
    for landmark in ("header", "nav", "main", "footer"):
        assert page.has(landmark), landmark
    assert page.has("a", href="#main")  # skip link
    assert page.has("link", rel="stylesheet", href="/static/dashboard.css")
    # Every column header says what it heads.
    assert all(a.get("scope") in ("col", "row") for t, a in page.tags if t == "th")
    return page


def record_sync(store: Store, *, result: str, subject: str, errors=(), **kw) -> int:
    sync_id = store.begin_sync(
        trigger="watch",
        seen_at=T0,
        commit=CommitMeta("a1b2c3d4e5f6" + "0" * 28, "Ada <ada@example.com>", T0, subject),
    )
    store.finish_sync(
        sync_id,
        result=result,
        ended_at=T0 + timedelta(seconds=1),
        environments_changed=["staging"],
        errors=list(errors),
        full_load=False,
        **kw,
    )
    return sync_id


# ---- overview ----------------------------------------------------------------------------


async def test_overview_shows_status_last_sync_refusals_and_suspensions(http: Harness):
    http.control.decisions = [
        Decision("staging", "api", "1.1", "1.0", "out_of_sync", "", last_deployment_id=4),
        Decision("staging", "worker", "2.0", "2.0", "synced", ""),
        Decision("production", "api", "1.0", "0.9", "waiting", "waiting on staging"),
        Decision("production", "web", "3.0", "3.0", "drifted", "live version is 2.9"),
    ]
    record_sync(
        http.store,
        result="errors",
        subject="bump api",
        errors=[
            {"file": "envs/qa.yaml", "line": 3, "col": 5, "path": "services.api", "message": "bad"}
        ],
    )
    record_sync(
        http.store,
        result="refused",
        subject="unsigned change",
        error_message="commit a1b2c3d is not signed by an allowed signer",
    )
    http.store.record_operator_action(
        environment="production",
        service=None,
        action="suspend",
        actor="ops",
        note="freeze for the audit",
        at=T0,
    )
    r = await http.client.get("/")
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    page = assert_accessible_page(r.text)
    words = page.words
    # The status, grouped by environment, with why something waits.
    assert "2 environments, 4 services at 9f1c2ab00" in words
    assert "api 1.1 1.0 out_of_sync" in words and "worker 2.0 2.0 synced" in words
    assert "api 1.0 0.9 waiting waiting on staging" in words
    assert "web 3.0 3.0 drifted live version is 2.9" in words
    assert page.has("a", href="/deployments/4")
    assert page.has("a", href="/history?env=staging&service=api")
    # Neither environment is all synced: both are open.
    assert page.has("details", id="env-staging", open="")
    assert page.has("details", id="env-production", open="")
    # The last sync is the refused one; the refusal is listed with its reason.
    assert "result refused : commit a1b2c3d is not signed by an allowed signer" in words
    assert "Refused since the last applied sync (1)" in words
    # Suspensions with their reason (the environment's summary says it too).
    assert "production : freeze for the audit" in words
    assert "suspended : freeze for the audit" in words
    # No ledger wired: no badge.
    assert not page.has("p", id="ledger") and "chain" not in words


async def test_overview_lists_the_last_syncs_file_errors(http: Harness):
    http.control.decisions = [Decision("staging", "api", "1.0", "1.0", "synced", "")]
    record_sync(
        http.store,
        result="errors",
        subject="a typo",
        errors=[
            {"file": "envs/qa.yaml", "line": 3, "col": 5, "path": "services", "message": "bad"},
            {"file": "envs/x.yaml", "line": 1, "col": 1, "path": "", "message": "not YAML"},
        ],
    )
    page = outline((await http.client.get("/")).text)
    assert "File errors (2)" in page.words
    assert "envs/qa.yaml:3:5 : services : bad" in page.words
    assert "envs/x.yaml:1:1 : not YAML" in page.words
    assert "a1b2c3d4e “a typo” by Ada <ada@example.com>" in page.words
    # All synced: the environment is folded.
    assert page.has("details", id="env-staging") and not page.has("details", open="")


async def test_everything_shown_is_escaped(http: Harness):
    http.control.decisions = [
        Decision("staging", HOSTILE, HOSTILE, None, "failed", HOSTILE),
    ]
    record_sync(http.store, result="refused", subject=HOSTILE, error_message=HOSTILE)
    http.store.record_operator_action(
        environment="staging", service=None, action="suspend", actor="x", note=HOSTILE, at=T0
    )
    rec = http.deploy("staging", HOSTILE, HOSTILE, statuses=("in_progress", "failed"))
    http.store.append_log(rec.id, [("stderr", HOSTILE, T0)])
    http.store.add_event(rec.id, status="failed", message=HOSTILE, percent=None, details={}, at=T0)
    for url in ("/", f"/history?service={HOSTILE}", f"/deployments/{rec.id}"):
        r = await http.client.get(url)
        assert r.status_code == 200, url
        assert HOSTILE not in r.text, url
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in r.text, url
        page = outline(r.text)
        assert HOSTILE in page.words, url  # shown as text
        assert "alert" not in "".join(page.script_text), url


async def test_the_chain_badge_shows_the_daemons_last_walk_of_the_ledger(http: Harness):
    assert not outline((await http.client.get("/")).text).has("p", id="ledger")  # no walk yet

    sync_id = record_sync(http.store, result="ok", subject="bump api")
    report = verify(http.store)
    assert report.ok and report.head is not None
    http.control.ledger = LedgerCheck(T0, report)
    page = outline((await http.client.get("/")).text)
    assert page.has("p", id="ledger", **{"class": "badge badge-ok"})
    assert (
        f"chain verified: {report.entries:,} entries, head entry {report.head.seq}, "
        "checked 2026-11-26T10:00:00Z"
    ) in page.words

    with http.store.engine.begin() as conn:  # an edit behind the ledger's back
        conn.execute(
            text("UPDATE syncs SET commit_subject = 'innocent' WHERE id = :i"), {"i": sync_id}
        )
    broken = verify(http.store)
    assert not broken.ok
    http.control.ledger = LedgerCheck(T0, broken)
    page = outline((await http.client.get("/")).text)
    assert page.has("p", id="ledger", **{"class": "badge badge-bad"})
    assert (
        f"chain NOT verified: 1 finding(s) at 2026-11-26T10:00:00Z, first: {broken.findings[0].line()}"
        in page.words
    )
    assert f"sync {sync_id}" in broken.findings[0].line()


async def test_overview_of_one_environment(http: Harness):
    http.control.decisions = [
        Decision("staging", "api", "1.0", "1.0", "synced", ""),
        Decision("production", "api", "1.0", "1.0", "synced", ""),
    ]
    page = outline((await http.client.get("/", params={"env": "production"})).text)
    assert page.has("details", id="env-production", open="")
    assert not page.has("details", id="env-staging")
    assert "Environment production" in page.words
    none = outline((await http.client.get("/", params={"env": "qa"})).text)
    assert "No environment qa" in none.words
    bad = await http.client.get("/", params={"environment": "qa"})
    assert bad.status_code == 400 and bad.headers["content-type"].startswith("text/html")
    assert "unknown parameter 'environment'" in outline(bad.text).words


class SlowStatus:
    """A `status` that answers only when the test lets it."""

    def __init__(self, decisions: list[Decision]) -> None:
        self.asked = asyncio.Event()
        self.answer = asyncio.Event()
        self.decisions = decisions

    async def __call__(self, environment: str | None) -> tuple[str | None, list[Decision]]:
        self.asked.set()
        await self.answer.wait()
        return "9f1c2ab", self.decisions


async def test_the_overview_streams_its_head_before_the_fleet_is_read(http: Harness):
    slow = SlowStatus([Decision("staging", "api", "1.0", "1.0", "synced", "")])
    http.control.status = slow  # type: ignore[method-assign]
    async with http.client.stream("GET", "/") as response:
        assert response.status_code == 200
        chunks = response.aiter_text()
        head = ""
        while "Last sync" not in head:  # sent before the page asks for the fleet
            head += await anext(chunks)
        await slow.asked.wait()
        # The fleet is being read: the page's start is already here, its end is not.
        assert "<nav" in head and 'href="/static/dashboard.css"' in head
        assert "No sync recorded yet." in head and "</html>" not in head
        assert "<!-- head end -->" not in head
        slow.answer.set()
        rest = "".join([chunk async for chunk in chunks])
    page = assert_accessible_page(head + rest)
    assert "1 environment, 1 service at 9f1c2ab" in page.words


async def test_a_database_gone_mid_page_is_said_in_place(http: Harness):
    http.control._store = Store(make_engine("postgresql+psycopg://reconciler@127.0.0.1:1/x"))
    http.control.decisions = [Decision("staging", "api", "1.0", "1.0", "synced", "")]
    r = await http.client.get("/")
    assert r.status_code == 200 and r.text.rstrip().endswith("</html>")
    page = outline(r.text)
    assert page.has("p", role="alert")
    assert "database unavailable" in page.words
    assert "1 environment, 1 service" in page.words  # the status still shows
    history = await http.client.get("/history")
    assert history.status_code == 503 and "database unavailable" in outline(history.text).words


async def test_overview_before_the_first_fetch(http: Harness):
    http.control.ready = False
    http.control.fetch_error = "cannot fetch desired: repository not found"
    page = outline((await http.client.get("/")).text)
    assert (
        "the repository is not fetched yet: cannot fetch desired: repository not found"
        in page.words
    )


# ---- history -----------------------------------------------------------------------------


def history_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<a href="/deployments/(\d+)">#', html)]


async def test_history_filters_newest_first_and_pages(http: Harness):
    a = http.deploy("staging", "api", "1.0", at=T0)
    b = http.deploy("staging", "worker", "2.0", statuses=("in_progress", "failed"), at=T0)
    c = http.deploy("production", "api", "1.0", at=T0 + timedelta(days=3))
    d = http.deploy("staging", "api", "1.1", at=T0 + timedelta(days=3))

    r = await http.client.get("/history")
    assert r.status_code == 200
    page = assert_accessible_page(r.text)
    assert history_ids(r.text) == [d.id, c.id, b.id, a.id]
    assert page.has("form", method="get", action="/history")
    # A form submitted with empty fields: "any".
    empty = {"env": "", "service": "", "status": "", "since": ""}
    assert history_ids((await http.client.get("/history", params=empty)).text) == [
        d.id,
        c.id,
        b.id,
        a.id,
    ]
    only = await http.client.get("/history", params={**empty, "env": "staging", "service": "api"})
    assert history_ids(only.text) == [d.id, a.id]
    filled = outline(only.text)
    assert filled.has("input", name="env", value="staging")
    failed = await http.client.get("/history", params={"status": "failed"})
    assert history_ids(failed.text) == [b.id]
    assert outline(failed.text).has("option", value="failed", selected="")
    since = await http.client.get(
        "/history", params={"since": (T0 + timedelta(days=1)).strftime("%Y-%m-%d")}
    )
    assert history_ids(since.text) == [d.id, c.id]
    # Pages: newest first, an "Older" link to the next, "Newest" back.
    first = await http.client.get("/history", params={"env": "staging", "limit": "2"})
    assert history_ids(first.text) == [d.id, b.id]
    older = re.search(r'<a href="([^"]+)" rel="next">Older</a>', first.text)
    assert older is not None
    second = await http.client.get(older.group(1).replace("&amp;", "&"))
    assert history_ids(second.text) == [a.id]
    assert outline(second.text).has("a", href="/history?env=staging&limit=2")


@pytest.mark.parametrize(("params", "message"), BAD_HISTORY_PARAMS)
async def test_history_bad_filters_are_a_400_page(http: Harness, params, message):
    r = await http.client.get("/history", params=params)
    assert r.status_code == 400 and r.headers["content-type"].startswith("text/html")
    assert message in outline(r.text).words


# ---- one deployment ------------------------------------------------------------------


async def test_a_running_deployment_page_is_set_up_to_follow_it(http: Harness):
    rec = http.deploy(statuses=("in_progress",))
    http.store.add_event(
        rec.id, status="in_progress", message="preparing", percent=10, details={}, at=T0
    )
    http.store.append_log(rec.id, [("stdout", "pulling image", T0), ("stderr", "warn: x", T0)])
    r = await http.client.get(f"/deployments/{rec.id}")
    assert r.status_code == 200
    page = assert_accessible_page(r.text)
    last = http.store.events_after(rec.id, 0)[-1].id
    assert page.has(
        "main",
        **{
            "data-events": f"/api/v1/deployments/{rec.id}/events",
            "data-last-event": str(last),
            "data-log-url": f"/api/v1/deployments/{rec.id}/log",
            "data-log-next": "2",
        },
    )
    assert page.has("script", src="/static/dashboard.js")
    assert "in progress 10% preparing" in page.words
    assert "pulling image warn: x" in page.words
    assert page.has("span", **{"class": "line line-stderr"})


async def test_a_finished_deployment_page_has_no_script(http: Harness):
    rec = http.deploy(statuses=("in_progress", "failed"))
    page = outline((await http.client.get(f"/deployments/{rec.id}")).text)
    assert not page.has("script") and not page.has("main", **{"data-events": ""})
    words = page.words
    assert f"Deployment #{rec.id}: api 1.0 to staging" in words
    assert "status failed" in words and "trigger git, attempt 1" in words


async def test_a_long_log_shows_its_tail_and_pages_like_the_api(http: Harness):
    rec = http.deploy()
    lines = [f"line {i:04d}" for i in range(1500)]
    http.store.append_log(rec.id, [("stdout", line, T0) for line in lines])
    tail = outline((await http.client.get(f"/deployments/{rec.id}")).text)
    assert "The last 200 of 1500 lines." in tail.words
    assert "line 1299 line 1300" not in tail.words and "line 1300" in tail.words
    assert tail.has("a", href=f"/deployments/{rec.id}?offset=0")
    first = outline((await http.client.get(f"/deployments/{rec.id}?offset=0")).text)
    assert "Lines 1 to 1000 of 1500." in first.words
    assert "line 0000" in first.words and "line 0999" in first.words
    assert "line 1000" not in first.words
    assert first.has("a", href=f"/deployments/{rec.id}?offset=1000", rel="next")
    second = outline((await http.client.get(f"/deployments/{rec.id}?offset=1000")).text)
    assert "Lines 1001 to 1500 of 1500." in second.words
    assert second.has("a", href=f"/deployments/{rec.id}?offset=0")  # earlier lines
    assert not second.has("a", rel="next")


async def test_unknown_or_bad_deployment_ids_are_404_pages(http: Harness):
    for url in ("/deployments/4242", "/deployments/abc", "/deployments/-1"):
        r = await http.client.get(url)
        assert r.status_code == 404, url
        assert r.headers["content-type"].startswith("text/html")
        assert_accessible_page(r.text)
    assert "no deployment 4242" in outline((await http.client.get("/deployments/4242")).text).words
    rec = http.deploy()
    bad = await http.client.get(f"/deployments/{rec.id}?offset=x")
    assert bad.status_code == 400


# ---- static files ------------------------------------------------------------------------


async def test_static_files_are_the_packages_own(http: Harness):
    css = await http.client.get("/static/dashboard.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert ":focus-visible" in css.text
    js = await http.client.get("/static/dashboard.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "EventSource" in js.text and "innerHTML" not in js.text
    for name in ("nope.css", "..%2Fapi.py", ".hidden.css", "dashboard.html"):
        assert (await http.client.get(f"/static/{name}")).status_code == 404, name


async def test_nothing_is_fetched_from_elsewhere(http: Harness):
    """No CDN, no web font: every URL the pages name is the daemon's own."""
    rec = http.deploy(statuses=("in_progress",))
    http.control.decisions = [Decision("staging", "api", "1.0", None, "deploying", "")]
    for url in ("/", "/history", f"/deployments/{rec.id}"):
        text = (await http.client.get(url)).text
        assert not re.search(r'(src|href)="(https?:)?//', text), url
    css = (await http.client.get("/static/dashboard.css")).text
    assert "url(" not in css and "@import" not in css


def test_the_overview_groups_decisions_in_status_order():
    fleet = dashboard.group(
        "abc",
        [
            Decision("b", "x", "1", "1", "synced", ""),
            Decision("a", "y", "1", None, "failed", "exit 3"),
            Decision("b", "z", "1", "1", "synced", ""),
        ],
        {"a": "maintenance"},
    )
    assert [e.name for e in fleet.environments] == ["b", "a"]
    assert [d.service for d in fleet.environments[0].services] == ["x", "z"]
    assert fleet.environments[0].calm and not fleet.environments[1].calm
    assert fleet.environments[1].suspended and fleet.environments[1].reason == "maintenance"
    assert fleet.summary() == [("failed", 1), ("synced", 2)] and fleet.services == 3


async def test_readers_that_leave_mid_page_free_the_render_threads(http: Harness):
    """More readers than render threads leave while the fleet is read, and the read never
    ends: each render gives up waiting (within `CLOSED_CHECK_SECONDS`), and the next page
    is served."""
    stuck = SlowStatus([])  # never answers
    http.control.status = stuck  # type: ignore[method-assign]
    for _ in range(pages.RENDER_THREADS + 1):
        async with http.client.stream("GET", "/") as response:
            first = await anext(response.aiter_text())
            assert "<nav" in first
    http.control.status = FakeControl.status.__get__(http.control)  # type: ignore[method-assign]
    http.control.decisions = [Decision("staging", "api", "1.0", "1.0", "synced", "")]
    r = await http.client.get("/")
    assert r.status_code == 200 and r.text.rstrip().endswith("</html>")
    assert "1 environment, 1 service" in outline(r.text).words


# ---- accessibility: contrast -------------------------------------------------------------


def _luminance(hex_colour: str) -> float:
    value = hex_colour.lstrip("#")
    if len(value) == 3:
        value = "".join(c * 2 for c in value)
    channels = [int(value[i : i + 2], 16) / 255 for i in (0, 2, 4)]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: str, b: str) -> float:
    """WCAG 2 contrast ratio of two colours."""
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def test_every_text_colour_has_a_contrast_of_at_least_4_5():
    css = pages.static_file("dashboard.css")
    assert css is not None
    text = css.decode()
    colours = dict(re.findall(r"--([a-z]+):\s*(#[0-9a-fA-F]{3,6})", text))

    def rule(selector: str, prop: str) -> str:
        """The colour a rule gives ``prop`` (a hex value or one of the variables)."""
        block = re.search(r"(?m)^" + re.escape(selector) + r"\s*\{([^}]*)\}", text)
        assert block, selector
        value = re.search(r"(?:^|[;\s])" + prop + r":\s*([^;]+);", block.group(1))
        assert value, (selector, prop)
        colour = value.group(1).strip()
        return colours[colour[6:-1]] if colour.startswith("var(--") else colour

    page_texts = ["fg", "muted", "link", "ok", "bad", "warn", "busy", "idle"]
    for name in page_texts:
        for background in ("bg", "soft"):  # the page, and table headers
            ratio = contrast(colours[name], colours[background])
            assert ratio >= 4.5, (name, background, round(ratio, 2))
    header = rule("header.top", "background")
    assert contrast("#ffffff", header) >= 4.5
    log_bg = rule("pre.log", "background")
    for selector in ("pre.log", "pre.log .line-stderr", "pre.log .line-system"):
        assert contrast(rule(selector, "color"), log_bg) >= 4.5, selector
    button = rule("button", "background")
    assert contrast(rule("button", "color"), button) >= 4.5
