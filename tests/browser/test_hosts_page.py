"""The hosts pages in a real browser: staff find a host in the list, open it and pause it with its form.

runserver runs without a bus (BUS_AUTOSTART=false): the job stays queued, so what the pages show
after the click is what the form set, not what a claim moved the host on to.
"""

from __future__ import annotations

import pytest

from tests.browser.conftest import Site, screenshot

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(120), pytest.mark.slow]

KEY = "paused-by-a-person.example:8080"


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


def test_staff_find_a_host_open_it_and_pause_it(browser, site_without_bus):
    from playwright.sync_api import expect

    from jobs import services
    from jobs.models import Host

    services.enqueue_many(urls=[f"http://{KEY}/a", f"http://{KEY}/b"], actor="test")
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        site_without_bus.sign_in(page)
        page.click("#nav-hosts")
        expect(page).to_have_url(site_without_bus.url("/hosts/"))
        row = page.locator(f"#hosts tr[data-host='{KEY}']")
        expect(row).to_have_attribute("data-paused", "false")
        expect(row.locator("[data-count='queued']")).to_have_text("2")
        expect(page.locator("#hosts-live")).to_have_attribute("data-live-state", "polling")

        row.locator("a.host-key").click()
        expect(page).to_have_url(site_without_bus.url(f"/hosts/{KEY}/"))
        expect(page.locator("#host-key")).to_have_text(KEY)
        page.check("#host-form [name=paused]")
        page.click("#host-save")

        expect(page.locator("#messages .message.success")).to_have_text(f"{KEY}: paused.")
        expect(page).to_have_url(site_without_bus.url(f"/hosts/{KEY}/"))
        expect(page.locator(f"#hosts tr[data-host='{KEY}']")).to_have_attribute("data-paused", "true")
        expect(page.locator("#host-form [name=paused]")).to_be_checked()
        screenshot(page, "host-detail")
        host = Host.objects.get(key=KEY)
        assert (host.paused, host.delay, host.concurrency) == (True, None, None)

        page.click("#nav-hosts")
        expect(page.locator(f"#hosts tr[data-host='{KEY}'] [data-paused-badge]")).to_have_text("paused")
    finally:
        context.close()
