"""Every page at 1280 px (desktop) and 390 px (phone): screenshot, and nothing overflows the window
horizontally, even with long unbroken URLs, titles and error texts. And live regions stop polling
while the tab is hidden, then resume.

Screenshots: test-output/screenshots/layout/<page>-<width>.png.
"""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from tests.browser.conftest import deadline_loop, screenshot
from tests.conftest import wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(180), pytest.mark.slow]

WIDTHS = {1280: 900, 390: 844}
LONG_TOKEN = "a" * 180  # no break opportunity: the page must wrap or clip it, not widen
LONG_URL = f"https://very-long-host-name-for-layout-checks.example.org/{LONG_TOKEN}?q={'b' * 120}"

# The elements whose right edge passes the window's, for a readable failure.
OVERFLOW_REPORT = """() => {
  const width = window.innerWidth;
  const out = [];
  for (const el of document.querySelectorAll('body *')) {
    const box = el.getBoundingClientRect();
    if (box.width && box.right > width + 0.5) {
      let inside = false;  // an overflow inside a scrolling box (.table-scroll) is fine
      for (let p = el.parentElement; p && p !== document.body; p = p.parentElement) {
        const style = getComputedStyle(p);
        if (['auto', 'scroll', 'hidden', 'clip'].includes(style.overflowX)) { inside = true; break; }
      }
      if (!inside) out.push(el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') +
        (el.className && typeof el.className === 'string' ? '.' + el.className.trim().replace(/\\s+/g, '.') : '') +
        ' right=' + Math.round(box.right));
    }
  }
  return {scrollWidth: document.documentElement.scrollWidth, innerWidth: width, offenders: out.slice(0, 15)};
}"""


def _hostile_but_plausible_data(site, local_web) -> dict[str, int]:
    """Jobs in every state, with long texts: three fetched for real, the rest written directly."""
    from django.utils import timezone

    from jobs import services
    from jobs.models import EventKind, Job, JobEvent, Status

    fetched = services.enqueue_many(urls=[local_web.url(f"/page/{n}") for n in (1, 2, 3)], actor="test")
    wait_until(
        lambda: Job.objects.filter(id__in=[j.pk for j in fetched], status=Status.SUCCEEDED).count() == 3,
        timeout=60,
        interval=0.1,
        message="the three pages fetched",
    )
    now = timezone.now()
    failed = Job.objects.create(
        url=LONG_URL,
        status=Status.FAILED,
        attempt=5,
        failures=5,
        outcome_attempt=5,
        started_at=now - timedelta(seconds=3),
        finished_at=now,
        error=f"fetch failed: {LONG_TOKEN} " + "connection reset by peer; " * 20,
        result={
            "status": 500,
            "final_url": LONG_URL,
            "content_type": "text/html; charset=" + "x" * 90,
            "bytes": 123456,
            "title": "T" * 200,
            "links": 0,
            "elapsed_ms": 1234,
        },
        progress={"step": LONG_TOKEN},
    )
    JobEvent.objects.create(
        job=failed,
        at=now,
        kind=EventKind.INTERRUPT,
        from_status=Status.RUNNING,
        to_status=Status.QUEUED,
        attempt=4,
        actor="bus",
        reason=f"lease expired: {LONG_TOKEN}",
    )
    JobEvent.objects.create(
        job=failed,
        at=now,
        kind=EventKind.OUTCOME,
        from_status=Status.RUNNING,
        to_status=Status.FAILED,
        attempt=5,
        actor="bus",
        reason=f"final failure {LONG_TOKEN}",
    )
    cancelled = Job.objects.create(url=LONG_URL + "&cancelled", status=Status.CANCELLED, finished_at=now)
    return {"failed": failed.pk, "succeeded": fetched[0].pk, "cancelled": cancelled.pk}


def _assert_no_horizontal_overflow(page, label: str) -> None:
    report = page.evaluate(OVERFLOW_REPORT)
    assert report["scrollWidth"] <= report["innerWidth"], f"{label} overflows horizontally: {report}"


def test_every_page_fits_desktop_and_phone_widths(browser, site, local_web):
    from playwright.sync_api import expect

    ids = _hostile_but_plausible_data(site, local_web)
    pages = [
        ("dashboard", "/", "#dashboard-live"),
        ("jobs", "/jobs/", "#jobs-live"),
        ("job-detail-failed", f"/jobs/{ids['failed']}/", "#job-live"),
        ("job-detail-succeeded", f"/jobs/{ids['succeeded']}/", "#job-live"),
        ("enqueue", "/jobs/new", None),
    ]
    for width, height in WIDTHS.items():
        context = browser.new_context(viewport={"width": width, "height": height})
        try:
            page = context.new_page()
            page.goto(site.url("/accounts/login/"))
            expect(page.locator("#login-form")).to_be_visible()
            _assert_no_horizontal_overflow(page, f"login at {width}px")
            screenshot(page, f"layout/login-{width}")
            site.sign_in(page)

            for name, path, live in pages:
                page.goto(site.url(path))
                if live:
                    # Check the page as the live swap leaves it, not only as first served.
                    expect(page.locator(live)).to_have_attribute("data-live-refreshes", re.compile(r"^[1-9]"))
                if name == "job-detail-failed":
                    page.click("#job-result-raw summary")  # the folded raw JSON, open
                    expect(page.locator("#job-error")).to_be_visible()
                _assert_no_horizontal_overflow(page, f"{name} at {width}px")
                screenshot(page, f"layout/{name}-{width}")

            # The enqueue form with its error box: a long invalid line, and nothing queued.
            page.fill("#enqueue-form textarea[name=urls]", f"{local_web.url('/page/1')}\nnot a url {LONG_TOKEN}")
            page.click("#enqueue-submit")
            expect(page.locator("#enqueue-errors li[data-line='2']")).to_be_visible()
            _assert_no_horizontal_overflow(page, f"enqueue with errors at {width}px")
            screenshot(page, f"layout/enqueue-errors-{width}")

            # The job list with a message after a bulk action (cancel skips a finished job: nothing changes).
            page.goto(site.url("/jobs/"))
            page.check(f"#jobs input[name=job][value='{ids['succeeded']}']")
            page.click("#bulk-cancel")
            expect(page.locator("#messages .message.warning")).to_contain_text("skipped 1 already finished")
            _assert_no_horizontal_overflow(page, f"jobs after a bulk action at {width}px")
            screenshot(page, f"layout/jobs-after-action-{width}")
        finally:
            context.close()


HIDE = """() => {
  Object.defineProperty(document, 'hidden', {value: true, configurable: true});
  Object.defineProperty(document, 'visibilityState', {value: 'hidden', configurable: true});
  document.dispatchEvent(new Event('visibilitychange'));
}"""
SHOW = """() => {
  delete document.hidden;  // back to the prototype's getter: the real (visible) state
  delete document.visibilityState;
  document.dispatchEvent(new Event('visibilitychange'));
}"""


@pytest.mark.parametrize(
    "path, region, has_indicator",
    [
        ("/", "#dashboard-live", True),  # only the dashboard shows "live"/"paused" in words
        ("/jobs/", "#jobs-live", False),
    ],
    ids=["dashboard", "jobs"],
)
def test_live_polling_pauses_while_the_tab_is_hidden_and_resumes_when_visible(
    browser, site, path, region, has_indicator
):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        site.sign_in(page)
        page.goto(site.url(path))
        live = page.locator(region)
        indicator = page.locator("[data-live-indicator]")
        expect(live).to_have_attribute("data-live-state", "polling")
        expect(live).to_have_attribute("data-live-refreshes", re.compile(r"^[2-9]|^\d\d"))  # it does poll

        page.evaluate(HIDE)
        expect(live).to_have_attribute("data-live-state", "paused")
        if has_indicator:
            expect(indicator).to_have_text("paused")
        # A fetch already under way when the tab hid may still land; after that, nothing.
        expect(live).not_to_have_attribute("data-live-busy", "1")
        before = int(live.get_attribute("data-live-refreshes"))
        for _ in deadline_loop(5.0):  # 2.5 polling intervals
            assert int(live.get_attribute("data-live-refreshes")) == before, "it polled while hidden"
            assert live.get_attribute("data-live-state") == "paused"

        page.evaluate(SHOW)
        expect(live).to_have_attribute("data-live-state", "polling")
        if has_indicator:
            expect(indicator).to_have_text("live")
        wait_until(
            lambda: int(live.get_attribute("data-live-refreshes")) >= before + 2,
            timeout=30,
            interval=0.1,
            message="polling again after the tab became visible",
        )
    finally:
        context.close()
