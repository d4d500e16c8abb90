"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright.

One walk through what an operator does, against the session's real stack: sign in with
the admin token; submit a job from the form and watch it complete on its page; find a
dead letter, replay it and see it come back and end dead-lettered again with more
attempts; cancel a running job from the overview. A screenshot is saved at each step to
tests/browser/screenshots/ (git-ignored); with JOBS_UPDATE_SCREENSHOTS=1 the set is
also copied to docs/screenshots/ (committed).

Then what tokens change: no token shows only the sign-in form and asks the API nothing;
a wrong one shows the API's detail; a read-only token sees jobs but no submit form and
no cancel buttons, and is signed out when revoked; a token without jobs:read is told so.
Artifacts download with the token under their own name, and run_at leaves the browser
with its UTC offset.

No browser is downloaded: Playwright launches /usr/bin/chromium (`make test` installs
Debian's package where it can); without it the test is skipped, saying why.
`browser_type.launch()` gives every run a fresh temporary profile (user-data dir).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
TOKEN_KEY = "jobs.token"  # the dashboard's sessionStorage key

pytestmark = [
    pytest.mark.integration,
    pytest.mark.browser,
    pytest.mark.timeout(300),  # any test may be the one that starts the session's stack
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
def new_page(browser: Any, stack: Any) -> Iterator[Callable[..., Any]]:
    """Make pages, each in a fresh context (its own sessionStorage); `options` go to the
    context. An uncaught error in any of them fails the test."""
    contexts: list[Any] = []
    crashes: list[str] = []

    def make(**options: Any) -> Any:
        context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1,
                                      base_url=stack.gateway_url, color_scheme="light",
                                      **options)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.on("pageerror", lambda exc: crashes.append(str(exc)))
        return page

    yield make
    for context in contexts:
        context.close()
    assert not crashes, f"uncaught errors in the page: {crashes}"


@pytest.fixture
def page(new_page: Callable[..., Any]) -> Any:
    return new_page()


def sign_in(page: Any, token: str, name: str) -> None:
    """Sign in through the form the dashboard shows, as the token called `name`."""
    expect(page.get_by_test_id("sign-in-form")).to_be_visible()
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_test_id("who-name")).to_have_text(name)
    expect(page.get_by_test_id("sign-in-form")).to_have_count(0)


def stored_token(page: Any) -> str | None:
    return page.evaluate("(key) => sessionStorage.getItem(key)", TOKEN_KEY)  # type: ignore[no-any-return]


def create_token(api: Api, name: str, scopes: list[str]) -> dict[str, Any]:
    reply = api.request("POST", "/tokens", json_body={"name": name, "scopes": scopes})
    assert reply.status == 201, reply.body
    return reply.json  # type: ignore[no-any-return]


def is_api_call(url: str) -> bool:
    """Anything but the dashboard's own files."""
    path = urlsplit(url).path
    return not (path in ("/", "/dashboard", "/favicon.ico") or path.startswith("/static/"))


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


def test_dashboard_walkthrough(page: Any, api: Api, stack: Any) -> None:
    shots = Shots(page)

    # -- sign in with the admin token; it stays in this tab's sessionStorage only
    page.goto("/")
    expect(page.get_by_label("API token")).to_be_focused()
    shots.take("sign-in")
    sign_in(page, stack.admin_token, "admin")
    assert stored_token(page) == stack.admin_token
    assert page.evaluate("() => localStorage.length") == 0
    assert stack.admin_token not in page.url

    # -- the overview loads and goes live
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
    expect(page.get_by_test_id("job-submitted-by")).to_have_text("admin")
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


def test_a_job_page_follows_the_event_stream_to_the_final_state(
        page: Any, api: Api, stack: Any) -> None:
    """Each change shows as it happens, from GET /jobs/{id}/events: after its first read
    the page asks for the job no more (no polling) and is never reloaded."""
    page.goto("/")
    sign_in(page, stack.admin_token, "admin")
    job_id = api.submit("PROGRESS", {"steps": 10, "step_seconds": 0.5}).json["job_id"]
    calls: list[str] = []
    page.on("request", lambda r: calls.append(urlsplit(r.url).path))
    page.evaluate("() => { window.notReloaded = true; }")
    page.evaluate("(id) => { location.hash = `#/jobs/${id}`; }", job_id)
    facts = page.get_by_test_id("job-facts")
    expect(facts).to_contain_text(re.compile(r"step \d+ of 10"), timeout=30_000)
    expect(page.get_by_test_id("job-status")).to_have_text("COMPLETED", timeout=60_000)
    expect(facts).to_contain_text("100% · done")
    expect(page.get_by_test_id("attempt-row")).to_have_attribute("data-outcome", "COMPLETED")
    assert page.evaluate("() => window.notReloaded") is True
    assert calls.count(f"/jobs/{job_id}/events") == 1, calls
    assert calls.count(f"/jobs/{job_id}") == 1, calls
    assert api.job(job_id)["status"] == "COMPLETED"


def test_without_a_token_the_page_shows_the_sign_in_form_and_no_data(page: Any) -> None:
    calls: list[str] = []
    page.on("request", lambda request: is_api_call(request.url) and calls.append(request.url))
    page.goto("/#/jobs")

    expect(page.get_by_test_id("sign-in-form")).to_be_visible()
    expect(page.get_by_label("API token")).to_have_attribute("type", "password")
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    expect(page.get_by_test_id("nav")).to_be_hidden()
    expect(page.get_by_test_id("who")).to_be_hidden()
    expect(page.get_by_test_id("connection")).to_contain_text("not signed in")
    expect(page.get_by_test_id("jobs-table")).to_have_count(0)
    expect(page.get_by_test_id("status-cards")).to_have_count(0)

    page.get_by_role("button", name="Sign in").click()  # nothing typed yet
    expect(page.get_by_test_id("sign-in-error")).to_have_text("Paste a token first.")
    page.wait_for_load_state("networkidle")
    assert calls == []  # nothing was asked of the API without a token
    assert stored_token(page) is None


def test_a_wrong_token_shows_the_error_and_is_not_kept(page: Any) -> None:
    page.goto("/")
    token = page.get_by_label("API token")
    error = page.get_by_test_id("sign-in-error")

    token.fill("not-a-token")
    page.get_by_role("button", name="Sign in").click()
    expect(error).to_contain_text("401")
    expect(error).to_contain_text("the token is malformed")

    token.fill("jobs_" + "0" * 32 + "_" + "A" * 43)  # well formed, but no such token
    expect(error).to_be_empty()
    page.get_by_role("button", name="Sign in").click()
    expect(error).to_contain_text("the token is not valid")

    expect(page.get_by_test_id("sign-in-form")).to_be_visible()
    expect(page.get_by_test_id("who")).to_be_hidden()
    assert stored_token(page) is None


def test_a_read_only_token_sees_jobs_but_no_submit_form_or_cancel_buttons(
        page: Any, api: Api) -> None:
    viewer = create_token(api, "viewer", ["jobs:read"])
    reply = api.submit("SLEEPY", {"seconds": 30})
    assert reply.status == 202, reply.body
    sleepy_id = reply.json["job_id"]
    try:
        page.goto("/")
        sign_in(page, viewer["token"], "viewer")
        expect(page.get_by_test_id("nav-jobs")).to_be_visible()
        expect(page.get_by_test_id("nav-submit")).to_be_hidden()

        running = page.locator(f'[data-testid=running-row][data-job-id="{sleepy_id}"]')
        expect(running).to_be_visible(timeout=60_000)
        expect(running.get_by_test_id("progress")).to_be_visible()
        expect(page.get_by_test_id("cancel-button")).to_have_count(0)

        # the submit page, reached by its address, says why instead of showing the form
        page.goto("/#/submit")
        expect(page.get_by_test_id("missing-scope")).to_contain_text("jobs:submit")
        expect(page.get_by_test_id("submit-form")).to_have_count(0)

        # a reload keeps the session (sessionStorage); the job page has no cancel or replay
        page.goto(f"/#/jobs/{sleepy_id}")
        page.reload()
        expect(page.get_by_test_id("who-name")).to_have_text("viewer")
        expect(page.get_by_test_id("job-status")).to_have_text("IN_PROGRESS")
        expect(page.get_by_test_id("job-submitted-by")).to_have_text("admin")
        expect(page.get_by_test_id("job-cancel")).to_have_count(0)
        expect(page.get_by_test_id("job-replay")).to_have_count(0)

        # revoked while the page polls: the next answer is 401 and the form comes back
        reply = api.request("DELETE", f"/tokens/{viewer['id']}")
        assert reply.status == 204, reply.body
        # every process may trust it for up to 2 s more, and the page polls every 2 s
        expect(page.get_by_test_id("sign-in-form")).to_be_visible(timeout=15_000)
        expect(page.get_by_test_id("sign-in-error")).to_contain_text("the token is not valid")
        expect(page.get_by_test_id("who")).to_be_hidden()
        assert stored_token(page) is None
    finally:
        api.request("POST", f"/jobs/{sleepy_id}/cancel")


def test_a_token_without_jobs_read_is_told_so_and_may_still_submit(page: Any, api: Api) -> None:
    submitter = create_token(api, "submitter", ["jobs:submit"])
    page.goto("/")
    sign_in(page, submitter["token"], "submitter")
    expect(page.get_by_test_id("missing-scope")).to_contain_text("lacks the jobs:read scope")
    expect(page.get_by_test_id("status-cards")).to_have_count(0)
    expect(page.get_by_test_id("nav-jobs")).to_be_hidden()
    expect(page.get_by_test_id("nav-dead-letters")).to_be_hidden()

    page.get_by_test_id("nav-submit").click()
    job_type = page.get_by_label("Job type")
    expect(job_type.locator("option[value=ECHO]")).to_be_attached()
    job_type.select_option("ECHO")
    page.get_by_label("Payload (JSON)").fill('{"message": "sent blind"}')
    page.get_by_test_id("submit-button").click()
    expect(page).to_have_url(re.compile(rf"#/jobs/{UUID}$"))
    job_id = page.url.rsplit("/", 1)[1]
    expect(page.get_by_test_id("page-notice")).to_contain_text(f"Submitted: job {job_id}")
    expect(page.get_by_test_id("missing-scope")).to_contain_text("jobs:read")
    assert api.job(job_id)["submitted_by"] == "submitter"

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_test_id("sign-in-form")).to_be_visible()
    expect(page.get_by_test_id("sign-in-error")).to_have_text("Signed out.")
    expect(page.get_by_test_id("who")).to_be_hidden()
    assert stored_token(page) is None


def test_an_artifact_downloads_with_the_token_under_its_own_name(
        page: Any, api: Api, stack: Any) -> None:
    reply = api.submit("REPORT_GENERATION", {
        "title": "Sales", "columns": ["region", "total"],
        "rows": [["north", 120], ["south", 80]], "format": "csv"})
    assert reply.status == 202, reply.body
    job_id = reply.json["job_id"]
    page.goto(f"/#/jobs/{job_id}")
    sign_in(page, stack.admin_token, "admin")  # and back to the page asked for
    expect(page.get_by_test_id("job-status")).to_have_text("COMPLETED", timeout=60_000)

    button = page.get_by_test_id("artifact-download")
    with page.expect_download() as info:
        button.click()
    download = info.value
    assert download.suggested_filename == f"report-{job_id[:8]}.csv"
    assert download.url.startswith("blob:")
    text = Path(download.path()).read_text(encoding="utf-8")
    assert "north" in text and "120" in text

    def without_disposition(route: Any) -> None:
        response = route.fetch()
        headers = {k: v for k, v in response.headers.items()
                   if k.lower() != "content-disposition"}
        route.fulfill(response=response, headers=headers)

    page.route("**/artifact", without_disposition)
    with page.expect_download() as info:
        button.click()
    # no name from the server: the job id (Chromium adds the extension text/csv implies)
    assert Path(info.value.suggested_filename).stem == job_id


def test_run_at_is_sent_with_the_browsers_utc_offset(
        new_page: Callable[..., Any], api: Api, stack: Any) -> None:
    page = new_page(timezone_id="Asia/Kolkata")  # +05:30 all year: no summer time to guess
    india = timezone(timedelta(hours=5, minutes=30))
    run_at = (datetime.now(india) + timedelta(hours=2)).replace(second=0, microsecond=0)
    page.goto("/#/submit")
    sign_in(page, stack.admin_token, "admin")

    job_type = page.get_by_label("Job type")
    expect(job_type.locator("option[value=ECHO]")).to_be_attached()
    job_type.select_option("ECHO")
    page.get_by_label("Payload (JSON)").fill('{"message": "later"}')
    page.get_by_label("Run at").fill(run_at.strftime("%Y-%m-%dT%H:%M"))
    with page.expect_request(lambda r: r.method == "POST"
                             and urlsplit(r.url).path == "/jobs") as sent:
        page.get_by_test_id("submit-button").click()
    assert sent.value.post_data_json["run_at"] == run_at.isoformat()  # ...T..:..:00+05:30

    expect(page).to_have_url(re.compile(rf"#/jobs/{UUID}$"))
    job_id = page.url.rsplit("/", 1)[1]
    expect(page.get_by_test_id("job-status")).to_have_text("QUEUED")
    expect(page.get_by_test_id("job-facts")).to_contain_text("Run at")
    assert datetime.fromisoformat(api.job(job_id)["run_at"]) == run_at

    page.get_by_test_id("job-cancel").click()  # a waiting job is cancelled at once
    expect(page.get_by_test_id("job-status")).to_have_text("CANCELLED")


def test_a_job_page_links_parents_and_dependents_and_replays_them(
        page: Any, api: Api, stack: Any) -> None:
    parent, child = (j["job_id"] for j in api.request("POST", "/jobs/batch", json_body={
        "jobs": [{"job_type": "PERMANENT_FAIL"},
                 {"job_type": "PARENTS", "depends_on": [0]}]}).json["jobs"])
    api.wait_status(child, "CANCELLED", timeout=30)

    page.goto(f"/#/jobs/{parent}")
    sign_in(page, stack.admin_token, "admin")
    expect(page.get_by_test_id("job-status")).to_have_text("DEAD_LETTER")
    row = page.get_by_test_id("dependent-row")
    expect(row).to_have_count(1)
    expect(row).to_have_attribute("data-status", "CANCELLED")
    expect(row).to_contain_text(f"parent {parent} ended DEAD_LETTER")

    row.get_by_role("link").click()
    expect(page.get_by_test_id("job-id")).to_have_text(child)
    expect(page.get_by_test_id("job-cancelled-by")).to_have_text(parent[:8])
    page.get_by_test_id("job-parent").click()
    expect(page.get_by_test_id("job-id")).to_have_text(parent)

    page.get_by_test_id("job-replay-with-dependents").click()
    expect(page.get_by_test_id("job-notice")).to_contain_text("wait for it again")
    # the parent fails again (a permanent error), and so its dependent is cancelled again
    expect(page.get_by_test_id("job-status")).to_have_text("DEAD_LETTER", timeout=30_000)
    assert api.wait_status(child, "CANCELLED", timeout=30)["version"] >= 4
def test_the_schedules_page_lists_schedules_and_creates_pauses_and_deletes_them(
        page: Any, api: Api, stack: Any) -> None:
    suffix = os.urandom(4).hex()
    cron_name, every_name, form_name = (f"{kind}-{suffix}" for kind in ("cron", "every", "form"))
    reply = api.request("POST", "/schedules", json_body={
        "name": cron_name, "job_type": "NOOP", "cron": "30 2 * * *",
        "timezone": "America/New_York"})
    assert reply.status == 201, reply.body
    next_run = reply.json["next_run_at"]
    assert api.request("POST", "/schedules", json_body={
        "name": every_name, "job_type": "NOOP", "every_seconds": 1}).status == 201
    try:
        page.goto("/")
        sign_in(page, stack.admin_token, "admin")
        page.get_by_test_id("nav-schedules").click()
        expect(page).to_have_title(re.compile("^Schedules"))

        cron_row = page.locator(f'[data-testid=schedule-row][data-name="{cron_name}"]')
        expect(cron_row).to_contain_text("30 2 * * *")
        expect(cron_row).to_contain_text("America/New_York")
        expect(cron_row.get_by_test_id("schedule-next-run")).to_have_attribute(
            "datetime", next_run)
        # the every-second one fills in its last job as it ticks
        every_row = page.locator(f'[data-testid=schedule-row][data-name="{every_name}"]')
        expect(every_row.get_by_test_id("schedule-last-job")).to_be_visible(timeout=20_000)

        every_row.get_by_test_id("schedule-pause").click()
        expect(every_row).to_have_attribute("data-paused", "true")
        assert api.request("GET", f"/schedules/{every_name}").json["paused"] is True
        every_row.get_by_test_id("schedule-delete").click()  # the first click only asks
        expect(every_row.get_by_test_id("schedule-delete")).to_have_text("Confirm delete")
        every_row.get_by_test_id("schedule-delete").click()
        expect(every_row).to_have_count(0)
        assert api.request("GET", f"/schedules/{every_name}").status == 404

        # a bad cron expression: the API's detail, then a good one lists the new schedule
        page.get_by_test_id("schedule-name").fill(form_name)
        page.get_by_test_id("schedule-type").select_option("NOOP")
        page.get_by_test_id("schedule-cron").fill("0 24 * * *")
        page.get_by_test_id("schedule-create").click()
        expect(page.get_by_test_id("schedule-error")).to_contain_text("Bad hour")
        page.get_by_test_id("schedule-cron").fill("0 9 * * MON-FRI")
        page.get_by_test_id("schedule-timezone").fill("Europe/Berlin")
        page.get_by_test_id("schedule-create").click()
        expect(page.locator(f'[data-testid=schedule-row][data-name="{form_name}"]')
               ).to_contain_text("Europe/Berlin")
        assert api.request("GET", f"/schedules/{form_name}").json["cron"] == "0 9 * * MON-FRI"
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "schedules.png"))
    finally:
        for name in (cron_name, every_name, form_name):
            api.request("DELETE", f"/schedules/{name}")
