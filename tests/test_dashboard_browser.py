"""The dashboard in a real browser: Debian's headless Chromium (through its chromedriver,
driven by selenium) against a real daemon on a real git repository.

A deployment's command prints its progress step by step, each step gated by a FIFO the
test writes to, so the test knows what the page can have shown at each moment and waits
for the page's DOM to show it (no sleeps). Screenshots of the overview, the history and
the deployment page are saved in the test's folder; their paths are printed.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import World, wait_for
from tests.test_http_daemon import Served

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)",
    ),
]

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# The test's deploy script: `*-steps` versions print three steps, each after a line
# is read from the gate; the others finish at once.
STEPS_SCRIPT = r"""#!/usr/bin/env bash
set -u
env="$1"; service="$2"; version="$3"
echo "start $env $service $version" >> "$DEPLOY_LOG"
echo '{"progress": 5, "message": "preparing"}'
case "$version" in
  *-steps)
    for i in 1 2 3; do
      # A reopen can still meet the last step's writer closing: EOF with no line. Only a
      # line read lets the step go.
      until read -r _ < "$DEPLOY_GATE"; do :; done
      echo "log line of step $i"
      echo "{\"progress\": $((i * 30)), \"message\": \"step $i of 3\"}"
    done ;;
esac
echo '{"progress": 100, "message": "done"}'
"""

# Page waits: the daemon and the browser share two loaded cores with other test runs.
WAIT_SECONDS = 30


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
        "--no-first-run",
        "--disable-background-networking",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=str(CHROMEDRIVER))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def shoot(driver: webdriver.Chrome, folder: Path, name: str) -> Path:
    """A full-page screenshot (the page's whole height) for a person to look at."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, max(1000, min(int(height) + 40, 6000)))
    path = folder / f"{name}.png"
    assert driver.save_screenshot(str(path)), name
    driver.set_window_size(1280, 1000)
    print(f"screenshot: {path}")
    return path


def text_of(driver: webdriver.Chrome, css: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def test_the_dashboard_in_chromium_follows_a_running_deployment(
    tmp_path: Path, browser: webdriver.Chrome
):
    world = World(tmp_path)
    script = tmp_path / "deploy.sh"
    script.write_text(STEPS_SCRIPT)
    world.repo.write(
        "production.yaml",
        "environment: production\nprovider: local\n"
        'services:\n  api:\n    version: "1.0"\ndepends_on: [staging]\n',
    )
    world.repo.set_env("staging", {"api": "1.0", "web": "2.0"}, message="first versions")
    served = Served(world)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:
        wait_for(
            lambda: len([d for d in served.deployments() if d["status"] == "completed"]) == 3,
            what="the first three deployments",
        )
        world.repo.set_env("staging", {"api": "1.1-steps", "web": "2.0"}, message="api 1.1")
        running = wait_for(
            lambda: [d for d in served.deployments(status="in_progress")],
            what="the stepped deployment to start",
        )[0]
        assert running["version"] == "1.1-steps"
        base = f"http://127.0.0.1:{served.port}"
        wait = WebDriverWait(browser, WAIT_SECONDS)

        # ---- overview
        browser.get(base + "/")
        assert browser.title == "reconciler"
        assert browser.find_element(By.TAG_NAME, "html").get_attribute("lang") == "en"
        staging = browser.find_element(By.ID, "env-staging")
        assert staging.get_attribute("open") is not None  # something deploys: unfolded
        rows = {
            r.find_element(By.TAG_NAME, "th").text: r.text
            for r in staging.find_elements(By.CSS_SELECTOR, "tbody tr")
        }
        assert rows.keys() == {"api", "web"}
        assert "1.1-steps 1.0 deploying" in rows["api"]
        assert "2.0 2.0 synced" in rows["web"]
        production = browser.find_element(By.ID, "env-production")
        production_text = production.get_attribute("textContent") or ""
        assert "api" in production_text and "synced" in production_text
        assert "api 1.1" in text_of(browser, "#last-sync")
        # Keyboard: the skip link is the first stop and lands on the main content.
        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys(Keys.TAB)
        assert browser.switch_to.active_element.get_attribute("class") == "skip"
        shoot(browser, shots, "overview")

        # ---- history, filtered through its form (no script involved)
        browser.get(base + "/history")
        assert len(browser.find_elements(By.CSS_SELECTOR, "#history tbody tr")) == 4
        field = browser.find_element(By.ID, "f-service")
        field.send_keys("web", Keys.ENTER)
        wait.until(lambda d: "service=web" in d.current_url)
        rows_text = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#history tbody tr")]
        assert len(rows_text) == 1 and "web" in rows_text[0] and "completed" in rows_text[0]
        browser.get(base + "/history?env=staging&service=api")
        first = browser.find_element(By.CSS_SELECTOR, "#history tbody tr")
        assert "1.1-steps" in first.text and "in progress" in first.text
        shoot(browser, shots, "history")

        # ---- the running deployment: progress and log arrive while the page is open
        browser.get(f"{base}/deployments/{running['id']}")
        assert "in progress" in text_of(browser, "#status")
        timeline = browser.find_element(By.ID, "timeline")
        for step in (1, 2, 3):
            assert f"step {step} of 3" not in timeline.text
            world.open_gate()  # the command prints step N only now
            wait.until(lambda d, n=step: f"step {n} of 3" in text_of(d, "#timeline"))
            wait.until(lambda d, n=step: f"log line of step {n}" in text_of(d, "#log"))
            if step == 2:
                shoot(browser, shots, "deployment-running")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "main").get_attribute("data-finished"))
        assert browser.find_element(By.TAG_NAME, "main").get_attribute("data-finished") == (
            "completed"
        )
        assert "completed" in text_of(browser, "#status")
        assert text_of(browser, "#completed-at") != "-"
        assert "100% done" in text_of(browser, "#timeline")
        assert "log line of step 3" in text_of(browser, "#log")
        assert int(text_of(browser, "#log-total")) == len(text_of(browser, "#log").splitlines())
        # Each event once, in order, whatever the stream replayed.
        items = [li.text for li in timeline.find_elements(By.TAG_NAME, "li")]
        assert len(items) == len(set(items))
        steps = [i for i in items if " of 3" in i]
        assert [s.split("% ")[1] for s in steps] == ["step 1 of 3", "step 2 of 3", "step 3 of 3"]
        shoot(browser, shots, "deployment")
        # The page served after the end is the same, without the script.
        browser.refresh()
        assert "step 3 of 3" in text_of(browser, "#timeline")
        assert browser.find_elements(By.TAG_NAME, "script") == []
    finally:
        served.close()
    for name in ("overview", "history", "deployment-running", "deployment"):
        assert (shots / f"{name}.png").stat().st_size > 10_000, name
    logs = served.stderr.read_text()
    assert "Traceback" not in logs, logs
