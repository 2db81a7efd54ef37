"""The hosts pages in a real browser: staff find a host in the list, open it and pause it with its form,
and read its robots.txt (a long file scrolls in its own box, markup in it stays text) and the job it
disallowed (a badge of its own colour).

runserver runs without a bus (BUS_AUTOSTART=false): the job stays queued, so what the pages show
after the click is what the form set, not what a claim moved the host on to. robots.txt is obeyed
but nobody fetches it: the test writes the host's robots.txt fields as jobs.robots would.
"""

from __future__ import annotations

import pytest

from tests.browser.conftest import Site, screenshot

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(120), pytest.mark.slow]

KEY = "paused-by-a-person.example:8080"


class SiteWithoutBus(Site):
    def env(self) -> dict[str, str]:
        env = super().env()
        env.update(BUS_AUTOSTART="false", BUS_ENDPOINTS="", ROBOTS_TXT="obey")
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
    from django.utils import timezone
    from playwright.sync_api import expect

    from jobs import services
    from jobs.models import Host, RobotsState, Status

    *_, private = services.enqueue_many(
        urls=[f"http://{KEY}/a", f"http://{KEY}/b", f"http://{KEY}/private"], actor="test"
    )
    assert services.disallow_jobs(job_ids=[private.pk], from_status=Status.QUEUED, reason="robots.txt disallows it")
    robots_txt = "User-agent: *\nDisallow: /private  # <script>window.robotsRan = true</script>\n" + "# filler\n" * 3000
    Host.objects.filter(key=KEY).update(
        robots_state=RobotsState.ALLOWED, robots_status=200, robots_txt=robots_txt, robots_fetched_at=timezone.now()
    )
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        site_without_bus.sign_in(page)
        page.click("#nav-hosts")
        expect(page).to_have_url(site_without_bus.url("/hosts/"))
        row = page.locator(f"#hosts tr[data-host='{KEY}']")
        expect(row).to_have_attribute("data-paused", "false")
        expect(row.locator("[data-count='queued']")).to_have_text("2")
        expect(row).to_have_attribute("data-robots", "rules")
        expect(row.locator("[data-robots-words]")).to_have_text("rules in force")
        expect(page.locator("#hosts-live")).to_have_attribute("data-live-state", "polling")

        row.locator("a.host-key").click()
        expect(page).to_have_url(site_without_bus.url(f"/hosts/{KEY}/"))
        expect(page.locator("#host-key")).to_have_text(KEY)
        robots_file = page.locator("#robots-file")
        expect(robots_file).to_contain_text("<script>window.robotsRan = true</script>")
        assert page.evaluate("window.robotsRan") is None
        assert robots_file.evaluate("el => getComputedStyle(el).overflowY") == "auto"
        assert robots_file.evaluate("el => el.scrollHeight > el.clientHeight + 100")  # its own scroll box
        expect(page.locator("#robots-file-cut")).to_be_visible()
        disallowed = page.locator(f"#host-jobs tr[data-job-id='{private.pk}'] .badge")
        expect(disallowed).to_have_text("disallowed")
        expect(disallowed).to_have_css("background-color", "rgb(239, 232, 248)")
        expect(page.locator("#robots-disallowed")).to_have_attribute("data-disallowed", "1")
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
