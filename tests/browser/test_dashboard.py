"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright.

One walk through what an operator does, against the session's real stack:
submit a job from the form and watch it complete on its page; find a dead letter,
replay it and see it come back and end dead-lettered again with more attempts;
cancel a running job from the overview. A screenshot is saved at each step to
tests/browser/screenshots/ (git-ignored); with JOBS_UPDATE_SCREENSHOTS=1 the set is
also copied to docs/screenshots/ (committed).

No browser is downloaded: Playwright launches /usr/bin/chromium (`make test` installs
Debian's package where it can); without it the test is skipped, saying why.
`browser_type.launch()` gives every run a fresh temporary profile (user-data dir).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.client import Api

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
HERE = Path(__file__).resolve().parent
SHOTS = HERE / "screenshots"
DOCS_SHOTS = HERE.parents[1] / "docs" / "screenshots"
VIEWPORT = {"width": 1280, "height": 800}
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="Debian's chromium is not installed (/usr/bin/chromium): `make test` installs it"
               " when run as root with apt-get; else run `apt-get install chromium`",
    ),
]

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'")
expect = sync_api.expect


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, stack: Any) -> Iterator[Any]:
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1,
                                  base_url=stack.gateway_url, color_scheme="light")
    page = context.new_page()
    page.set_default_timeout(15_000)
    crashes: list[str] = []
    page.on("pageerror", lambda exc: crashes.append(str(exc)))
    yield page
    context.close()
    assert not crashes, f"uncaught errors in the page: {crashes}"


class Shots:
    """Numbered screenshots of the viewport (1280x800 PNG)."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.saved: list[Path] = []
        SHOTS.mkdir(parents=True, exist_ok=True)
        for old in SHOTS.glob("*.png"):
            old.unlink()

    def take(self, name: str) -> None:
        path = SHOTS / f"{len(self.saved) + 1:02d}-{name}.png"
        self.page.mouse.move(0, 0)  # no hover highlight left where the last click was
        self.page.screenshot(path=str(path))
        self.saved.append(path)

    def publish(self) -> None:
        if os.environ.get("JOBS_UPDATE_SCREENSHOTS") != "1":
            return
        DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
        for old in DOCS_SHOTS.glob("*.png"):
            old.unlink()
        for path in self.saved:
            shutil.copyfile(path, DOCS_SHOTS / path.name)


@pytest.mark.timeout(300)  # it may start the session's stack, and runs three jobs to their end
def test_dashboard_walkthrough(page: Any, api: Api) -> None:
    shots = Shots(page)

    # -- the overview loads and goes live
    page.goto("/")
    expect(page.get_by_test_id("connection")).to_contain_text("live")
    expect(page.get_by_test_id("count-COMPLETED")).to_have_text(re.compile(r"^\d+$"))
    expect(page.get_by_test_id("throughput-chart").locator("svg")).to_be_visible()
    shots.take("overview")

    # -- submit a job through the form: a bad payload shows the problem's detail first
    page.get_by_test_id("nav-submit").click()
    job_type = page.get_by_label("Job type")
    expect(job_type.locator("option[value=ECHO]")).to_be_attached()
    job_type.select_option("ECHO")
    payload = page.get_by_label("Payload (JSON)")
    payload.fill('{"text": "no such field"}')
    page.get_by_test_id("submit-button").click()
    error = page.get_by_test_id("submit-error")
    expect(error).to_contain_text("payload does not match the ECHO payload model")
    expect(error).to_contain_text("message")
    shots.take("submit-error")
    payload.fill('{"message": "hello from the browser"}')
    expect(error).to_be_empty()  # a stale error goes away once the payload is edited
    shots.take("submit-form")
    page.get_by_test_id("submit-button").click()

    # -- ... and watch it complete on its page
    expect(page).to_have_url(re.compile(rf"#/jobs/{UUID}$"))
    echo_id = page.url.rsplit("/", 1)[1]
    expect(page.get_by_test_id("job-status")).to_have_text("COMPLETED", timeout=60_000)
    expect(page.get_by_test_id("job-result")).to_contain_text("hello from the browser")
    expect(page.get_by_test_id("attempt-row")).to_have_count(1)
    expect(page.get_by_test_id("attempt-row")).to_have_attribute("data-outcome", "COMPLETED")
    expect(page.get_by_test_id("job-cancel")).to_be_hidden()
    assert api.job(echo_id)["status"] == "COMPLETED"
    shots.take("job-completed")

    # -- a job that always fails ends up in Dead letters; replay it from there
    reply = api.submit("ALWAYS_FAIL", {"from": "browser test"})
    assert reply.status == 202, reply.body
    failing_id = reply.json["job_id"]
    page.get_by_test_id("nav-dead-letters").click()
    letter = page.locator(
        f'[data-testid=dl-row][data-job-id="{failing_id}"][data-replayed=false]')
    expect(letter).to_be_visible(timeout=60_000)
    first_letter_id = letter.get_attribute("data-dead-letter-id")
    first_attempts = int(letter.get_by_test_id("dl-attempts").inner_text())
    assert first_attempts >= 1
    shots.take("dead-letters")
    letter.get_by_test_id("dl-replay").click()

    trail = page.locator(f'[data-testid=dl-replay-trail][data-job-id="{failing_id}"]')
    expect(trail).to_contain_text("QUEUED")  # the answer to the replay: back in the queue
    expect(trail).to_have_attribute("data-status", "DEAD_LETTER", timeout=60_000)
    again = page.locator(f'[data-testid=dl-row][data-job-id="{failing_id}"]'
                         f':not([data-dead-letter-id="{first_letter_id}"])')
    expect(again).to_be_visible(timeout=30_000)
    expect(again).to_have_attribute("data-replayed", "false")
    second_attempts = int(again.get_by_test_id("dl-attempts").inner_text())
    assert second_attempts > first_attempts
    expect(page.locator(f'[data-dead-letter-id="{first_letter_id}"]')).to_have_attribute(
        "data-replayed", "true")
    shots.take("dead-letter-replayed")

    trail.get_by_test_id("trail-job-link").click()
    expect(page.get_by_test_id("job-status")).to_have_text("DEAD_LETTER")
    expect(page.get_by_test_id("job-attempts")).to_have_text(str(second_attempts))
    expect(page.get_by_test_id("attempt-row")).to_have_count(second_attempts)
    expect(page.get_by_test_id("job-replay")).to_be_visible()
    shots.take("job-dead-letter")

    # -- cancel a running job from the overview
    reply = api.submit("SLEEPY", {"seconds": 30})
    assert reply.status == 202, reply.body
    sleepy_id = reply.json["job_id"]
    page.get_by_test_id("nav-overview").click()
    running = page.locator(f'[data-testid=running-row][data-job-id="{sleepy_id}"]')
    expect(running).to_be_visible(timeout=60_000)
    expect(running.get_by_test_id("progress")).to_be_visible()
    shots.take("running")
    running.get_by_role("button", name=re.compile("^Cancel job")).click()
    notice = page.get_by_test_id("overview-notice")
    expect(notice).to_contain_text("accepted")
    # the handler checks ctx.should_stop(); the worker passes the request on within seconds
    expect(running).to_be_hidden(timeout=20_000)
    shots.take("cancelled")
    notice.get_by_test_id("notice-job-link").click()
    expect(page.get_by_test_id("job-status")).to_have_text("CANCELLED")
    expect(page.get_by_test_id("attempt-row")).to_have_attribute("data-outcome", "CANCELLED")
    expect(page.get_by_test_id("job-cancel")).to_be_hidden()
    assert api.job(sleepy_id)["status"] == "CANCELLED"
    shots.take("job-cancelled")

    shots.publish()
