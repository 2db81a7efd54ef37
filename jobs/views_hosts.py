"""The hosts pages: every politeness unit with its jobs, wait and back-off; one host's settings for staff.

Whoever may read the crawlers page reads these (view_permission_required).
Changing a host needs a staff account with the admin's permission to change
hosts, the rule HostAdmin applies too, and goes through services.update_host
and services.end_backoff only: the claim reads a host's row under a lock, and
those write it under the same lock.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib import messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse
from django.utils.http import urlencode
from django.views.decorators.http import require_GET, require_http_methods

from . import selectors_hosts, services
from .models import Host, Status
from .views import _is_fragment, _page, view_permission_required


def can_manage_hosts(user) -> bool:
    """Staff with the admin's permission to change hosts: the same rule on this page and in the admin."""
    return user.is_active and user.is_staff and user.has_perm("jobs.change_host")


def _require_hosts(request: HttpRequest) -> None:
    if not can_manage_hosts(request.user):
        raise PermissionDenied("Changing a host needs a staff account with permission to change hosts.")


# --- The list ------------------------------------------------------------------------


@view_permission_required
@require_GET
def hosts(request: HttpRequest) -> HttpResponse:
    at = services.now()
    listing = selectors_hosts.host_page(
        query=request.GET.get("q", ""),
        state=request.GET.get("state", "all"),
        page=request.GET.get("page", 1),
        at=at,
    )
    filters: dict[str, str | int] = {
        name: value
        for name, value in (("q", listing.query), ("state", listing.state))
        if value and not (name == "state" and value == "all")
    }

    def link(number: int) -> str:
        return "?" + urlencode({**filters, "page": number})

    page = listing.page
    return _page(
        request,
        "jobs/hosts.html",
        "jobs/_hosts_live.html",
        {
            "listing": listing,
            "rows": listing.rows,
            "now": at,
            "query": listing.query,
            "state": listing.state,
            "states": [
                (value, label)
                for value, label in selectors_hosts.STATES.items()
                if value != "robots-waiting" or settings.ROBOTS_TXT == "obey" or listing.state == value
            ],
            "filtered": bool(filters),
            "previous_link": link(page.previous_page_number()) if page.has_previous() else "",
            "next_link": link(page.next_page_number()) if page.has_next() else "",
            "first_link": link(1),
        },
    )


# --- One host ------------------------------------------------------------------------


class HostSettingsForm(forms.Form):
    """A host's settings as a person typed them: services.update_host decides what is valid.

    Each field also carries, hidden, the value the page showed: only the fields
    the person changed are sent to the service, so saving a new delay does not
    undo a pause someone else set since the page was loaded.
    """

    delay = forms.FloatField(
        required=False,
        label="Delay (seconds)",
        show_hidden_initial=True,
        widget=forms.NumberInput(attrs={"step": "any", "min": "0"}),
        help_text="Seconds between two starts on this host; empty: the HOST_DELAY setting.",
    )
    concurrency = forms.IntegerField(
        required=False,
        show_hidden_initial=True,
        widget=forms.NumberInput(attrs={"step": "1", "min": "1"}),
        help_text="Most jobs of this host running at once; empty: the HOST_CONCURRENCY setting.",
    )
    paused = forms.BooleanField(
        required=False,
        show_hidden_initial=True,
        help_text="No job of a paused host starts; running ones finish.",
    )

    @classmethod
    def for_host(cls, host: Host, data: Any = None) -> HostSettingsForm:
        form = cls(data, initial={"delay": host.delay, "concurrency": host.concurrency, "paused": host.paused})
        form.fields["delay"].widget.attrs["placeholder"] = (
            f"default: {selectors_hosts.seconds_text(settings.HOST_DELAY)}"
        )
        form.fields["concurrency"].widget.attrs["placeholder"] = f"default: {settings.HOST_CONCURRENCY}"
        return form

    def changes(self) -> dict[str, Any]:
        """The fields changed from what the page showed; every field when the post does not say what it showed."""
        return {
            name: self.cleaned_data[name]
            for name in self.fields
            if name in self.changed_data or self.add_initial_prefix(name) not in self.data
        }


def _describe(host: Host, changes: dict[str, Any]) -> str:
    parts = []
    if "delay" in changes:
        parts.append(
            f"delay {selectors_hosts.seconds_text(host.delay)} s"
            if host.delay is not None
            else f"delay: the default ({selectors_hosts.seconds_text(settings.HOST_DELAY)} s)"
        )
    if "concurrency" in changes:
        parts.append(
            f"concurrency {host.concurrency}"
            if host.concurrency is not None
            else f"concurrency: the default ({settings.HOST_CONCURRENCY})"
        )
    if "paused" in changes:
        parts.append("paused" if host.paused else "not paused")
    return f"{host.key}: {', '.join(parts)}."


def _add_errors(form: forms.Form, exc: ValidationError) -> None:
    """The service's field errors under their fields, anything else above the form."""
    problems = exc.message_dict.items() if hasattr(exc, "error_dict") else [(None, exc.messages)]
    for name, texts in problems:
        form.add_error(name if name in form.fields else None, texts)


def _detail_page(request: HttpRequest, key: str, form: HostSettingsForm | None = None) -> HttpResponse:
    at = services.now()
    try:
        # The file itself is outside the live part: only the whole page reads it.
        detail = selectors_hosts.host_detail(key=key, at=at, with_robots_file=not _is_fragment(request))
    except Host.DoesNotExist:
        raise Http404("No such host.") from None
    manage = can_manage_hosts(request.user)
    return _page(
        request,
        "jobs/host_detail.html",
        "jobs/_hosts_live.html",
        {
            "detail": detail,
            "row": detail.row,
            "rows": [detail.row],
            "recent_limit": selectors_hosts.RECENT_JOBS,
            "host": detail.row.host,
            "now": at,
            "can_manage": manage,
            "form": form or (HostSettingsForm.for_host(detail.row.host) if manage else None),
            "live_url": detail.row.host.get_absolute_url() + "?fragment=1",
            "robots_file": detail.robots_file,
            # The job list filters by status, not by host: the link lists every host's disallowed jobs.
            "disallowed_link": reverse("jobs:list") + "?" + urlencode({"status": Status.DISALLOWED.value}),
        },
    )


@view_permission_required
@require_http_methods(["GET", "POST"])
def host_detail(request: HttpRequest, key: str) -> HttpResponse:
    if request.method != "POST":
        return _detail_page(request, key)
    _require_hosts(request)
    actor = f"web:{request.user.get_username()}"
    try:
        host = Host.objects.get(key=key)
        if request.POST.get("action") == "lift_backoff":
            if host.backoff_until is None:
                messages.warning(request, f"{key} is not backing off; nothing changed.")
            else:
                services.end_backoff(key=key, actor=actor)
                messages.success(request, f"{key}: back-off lifted; its jobs may start again.")
            return HttpResponseRedirect(host.get_absolute_url())
        form = HostSettingsForm.for_host(host, request.POST)
        if form.is_valid():
            changes = form.changes()
            if not changes:
                messages.warning(request, f"{key}: nothing was changed.")
                return HttpResponseRedirect(host.get_absolute_url())
            try:
                host = services.update_host(key=key, actor=actor, **changes)
            except ValidationError as exc:
                _add_errors(form, exc)
            else:
                messages.success(request, _describe(host, changes))
                return HttpResponseRedirect(host.get_absolute_url())
    except Host.DoesNotExist:
        raise Http404("No such host.") from None
    response = _detail_page(request, key, form=form)
    response.status_code = 400
    return response
