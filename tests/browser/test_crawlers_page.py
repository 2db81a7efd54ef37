"""The crawlers page in a real browser: a registered crawler is listed, and staff drain it with its button.

runserver runs without a bus (BUS_AUTOSTART=false): nobody owns the crawler, so the state the
page shows after the click is the one the button set, not one a bus moved it on to.
"""

from __future__ import annotations

import pytest

from tests.browser.conftest import Site, screenshot

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(120), pytest.mark.slow]

ENDPOINT = "unix:/tmp/jsb-crawlers-page.sock"


class SiteWithoutBus(Site):
    def env(self) -> dict[str, str]:
        env = super().env()
        env.update(BUS_AUTOSTART="false", BUS_ENDPOINTS="")
        return env


@pytest.fixture
def site_without_bus(processes, site_socket, admin_user):
    started = SiteWithoutBus(processes, site_socket)
    try:
        started.start_server()
        yield started
    finally:
        processes.stop_all()


def test_staff_drain_a_listed_crawler_from_the_crawlers_page(browser, site_without_bus):
    from playwright.sync_api import expect

    from jobs import fleet
    from jobs.models import Crawler, CrawlerState

    fleet.add_crawler(endpoint=ENDPOINT, label="browser crawler")
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        site_without_bus.sign_in(page)
        page.click("#nav-crawlers")
        expect(page).to_have_url(site_without_bus.url("/crawlers/"))
        row = page.locator(f"#crawlers tr[data-endpoint='{ENDPOINT}']")
        expect(row).to_have_attribute("data-state", "active")
        expect(row).to_contain_text("browser crawler")
        expect(page.locator("#crawlers-live")).to_have_attribute("data-live-state", "polling")

        row.locator("button[data-action='drain']").click()
        expect(page.locator("#messages .message.success")).to_contain_text(f"{ENDPOINT}: draining")
        row = page.locator(f"#crawlers tr[data-endpoint='{ENDPOINT}']")
        expect(row).to_have_attribute("data-state", "draining")
        expect(row.locator(".badge")).to_have_text("draining")
        expect(row.locator("button[data-action='resume']")).to_be_visible()
        screenshot(page, "crawlers")
        assert Crawler.objects.get(endpoint=ENDPOINT).state == CrawlerState.DRAINING
    finally:
        context.close()
