"""An operator's afternoon, in a real browser: sign in, queue work, watch it finish live, lose the
crawler, watch the jobs come back to the queue, bring the crawler back, watch the work finish.

Everything runs for real: runserver with its bus, the reference crawler fetching a local
http.server, Debian's Chromium. Every "watch" is an expectation on the data-* attributes of a
page that is never reloaded (a marker set in the page's window must survive to the end).
Screenshots of every page go to test-output/screenshots/; with UPDATE_DOCS_SCREENSHOTS=1 the
dashboard's also replaces docs/screenshots/dashboard.png (the README's picture).
"""

from __future__ import annotations

import os
import re
import shutil

import pytest

from tests.browser.conftest import screenshot
from tests.conftest import ROOT

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(180), pytest.mark.slow]

DOCS_SCREENSHOT = ROOT / "docs" / "screenshots" / "dashboard.png"
# Jobs finish in a second or two; the generous bound is for a slow shared CI box.
WATCH_MS = 60_000


def test_operator_watches_jobs_finish_and_the_dashboard_follow_a_killed_crawler(browser, site, local_web):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        # --- Sign in -------------------------------------------------------------------------
        dashboard = context.new_page()
        dashboard.goto(site.url("/"))
        expect(dashboard).to_have_url(re.compile(r"/accounts/login/\?next=/$"))
        expect(dashboard.locator("#login-form")).to_be_visible()
        screenshot(dashboard, "login")
        site.sign_in(dashboard)
        expect(dashboard).to_have_url(site.url("/"))

        # The dashboard stays open, never reloaded, for the whole scenario.
        live = dashboard.locator("#dashboard-live")
        expect(live).to_have_attribute("data-live-state", "polling")
        dashboard.evaluate("window.__sameDocument = 'yes'")

        def count(status: str):
            return dashboard.locator(f"#count-{status}[data-status='{status}']")

        expect(count("succeeded")).to_have_attribute("data-count", "0")
        connected = dashboard.locator("#sessions tr[data-session-state='connected']")
        expect(connected).to_have_count(1)
        expect(connected).to_have_attribute("data-display-state", "connected")
        first_session = connected.get_attribute("data-session")
        expect(dashboard.locator("#connected-sessions")).to_have_attribute("data-count", "1")

        # --- Enqueue three pages from a second tab ---------------------------------------------
        work = context.new_page()
        work.goto(site.url("/jobs/new"))
        expect(work.locator("#enqueue-form")).to_be_visible()
        work.fill("#enqueue-form textarea[name=urls]", "\n".join(local_web.url(f"/page/{n}") for n in (1, 2, 3)))
        work.click("#enqueue-submit")
        expect(work.locator("#messages .message.success")).to_contain_text("Queued 3 jobs")
        screenshot(work, "enqueue")

        # --- ... and watch them succeed on the dashboard, without a reload -------------------
        expect(count("succeeded")).to_have_attribute("data-count", "3", timeout=WATCH_MS)
        expect(count("queued")).to_have_attribute("data-count", "0")
        expect(count("running")).to_have_attribute("data-count", "0")
        assert dashboard.evaluate("window.__sameDocument") == "yes", "the dashboard was reloaded"
        assert int(live.get_attribute("data-live-refreshes") or 0) >= 1

        # The list and a job's detail show the crawler's result.
        work.goto(site.url("/jobs/"))
        rows = work.locator("#jobs tbody tr[data-job-id]")
        expect(rows).to_have_count(3)
        expect(work.locator("#jobs tbody tr[data-status='succeeded']")).to_have_count(3)
        screenshot(work, "jobs")
        work.locator("#jobs tbody tr[data-job-id]", has_text="/page/1").locator("td.url-cell a").click()
        expect(work.locator("#job-status")).to_have_attribute("data-status", "succeeded")
        expect(work.locator("#job-result [data-field='title']")).to_have_text("First test page")
        expect(work.locator("#job-result [data-field='status']")).to_have_text("200")
        screenshot(work, "job-detail")

        # --- Work that stays running ------------------------------------------------------------
        work.goto(site.url("/jobs/new"))
        work.fill("#enqueue-form textarea[name=urls]", "\n".join(local_web.url(f"/slow/{n}") for n in (1, 2, 3)))
        work.click("#enqueue-submit")
        expect(work.locator("#messages .message.success")).to_contain_text("Queued 3 jobs")
        hrefs = work.locator("#messages a[href^='/jobs/'][href$='/']").evaluate_all(
            "els => els.map(e => e.getAttribute('href'))"
        )
        slow_ids = [int(href.rstrip("/").rsplit("/", 1)[1]) for href in hrefs]
        assert len(slow_ids) == 3, slow_ids

        # A third tab follows one of them, live as well.
        detail = context.new_page()
        detail.goto(site.url(f"/jobs/{slow_ids[0]}/"))
        detail.evaluate("window.__sameDocument = 'yes'")
        job_status = detail.locator("#job-status")

        expect(count("running")).to_have_attribute("data-count", "3", timeout=WATCH_MS)
        expect(
            dashboard.locator(f"#sessions tr[data-session='{first_session}'] [data-slots-in-use]")
        ).to_have_attribute("data-slots-in-use", "3")
        expect(dashboard.locator("#oldest-running")).to_have_attribute("data-age-seconds", re.compile(r"^\d"))
        expect(job_status).to_have_attribute("data-status", "running", timeout=WATCH_MS)
        expect(detail.locator("#job-attempt")).to_have_attribute("data-attempt", "1")
        screenshot(dashboard, "dashboard-running")
        screenshot(detail, "job-detail-running")

        # --- The crawler dies (SIGKILL: no bye) ----------------------------------------------------
        site.kill_crawler()
        old_row = dashboard.locator(f"#sessions tr[data-session='{first_session}']")
        expect(old_row).to_have_attribute("data-display-state", re.compile(r"^(lost|reconnecting)$"), timeout=WATCH_MS)
        expect(old_row).not_to_have_attribute("data-session-state", "connected")
        expect(count("running")).to_have_attribute("data-count", "0")
        expect(count("queued")).to_have_attribute("data-count", "3")
        expect(dashboard.locator("#connected-sessions")).to_have_attribute("data-count", "0")
        for job_id in slow_ids:
            expect(dashboard.locator(f"#requeues li[data-job-id='{job_id}'][data-to-status='queued']")).to_have_count(1)
        expect(job_status).to_have_attribute("data-status", "queued", timeout=WATCH_MS)
        expect(detail.locator("#events li[data-kind='interrupt']")).to_have_count(1)
        screenshot(dashboard, "dashboard-crawler-lost")
        screenshot(detail, "job-detail-requeued")

        # --- The crawler comes back on the same socket; the slow pages answer at once now --------
        local_web.fast.set()
        site.start_crawler()
        expect(count("succeeded")).to_have_attribute("data-count", "6", timeout=WATCH_MS)
        expect(count("running")).to_have_attribute("data-count", "0")
        expect(count("queued")).to_have_attribute("data-count", "0")
        new_connected = dashboard.locator(
            f"#sessions tr[data-session-state='connected']:not([data-session='{first_session}'])"
        )
        expect(new_connected).to_have_count(1)
        expect(new_connected).to_have_attribute("data-display-state", "connected")
        expect(old_row).to_have_attribute("data-display-state", re.compile(r"^(lost|closed)$"))
        expect(dashboard.locator("#connected-sessions")).to_have_attribute("data-count", "1")
        expect(dashboard.locator("#finished-last-hour")).to_have_attribute("data-count", "6")
        expect(job_status).to_have_attribute("data-status", "succeeded", timeout=WATCH_MS)
        expect(detail.locator("#job-attempt")).to_have_attribute("data-attempt", "2")
        expect(detail.locator("#job-result [data-field='title']")).to_have_text("Slow page 1")

        assert dashboard.evaluate("window.__sameDocument") == "yes", "the dashboard was reloaded"
        assert detail.evaluate("window.__sameDocument") == "yes", "the job page was reloaded"
        # The README's picture: a dashboard after a crawler was lost and came back.
        shot = screenshot(dashboard, "dashboard")
        screenshot(detail, "job-detail-after-recovery")
        if os.environ.get("UPDATE_DOCS_SCREENSHOTS") == "1":
            DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, DOCS_SCREENSHOT)
    finally:
        context.close()
