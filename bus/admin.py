"""Connection health for operators: the bus sessions, read-only (only the bus writes them).

The model is jobs.BusSession (pages read it without importing bus), so its admin
lives at /admin/jobs/bussession/ and its URL names are admin:jobs_bussession_*.
"""

from __future__ import annotations

import uuid

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from .models import BusSession


@admin.register(BusSession)
class BusSessionAdmin(admin.ModelAdmin):
    list_display = (
        "session",
        "node",
        "endpoint",
        "crawler",
        "state",
        "slots",
        "connected_at",
        "last_heartbeat_at",
        "closed_at",
        "close_reason",
        "jobs_link",
    )
    list_filter = ("state",)
    search_fields = ("node", "endpoint", "crawler")
    search_help_text = "A session UUID, or part of a node, endpoint or crawler name."
    actions = None
    show_full_result_count = False

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[BusSession], search_term: str
    ) -> tuple[QuerySet[BusSession], bool]:
        try:
            session = uuid.UUID(search_term.strip())
        except ValueError:
            return super().get_search_results(request, queryset, search_term)
        return queryset.filter(session=session), False

    @admin.display(description="jobs")
    def jobs_link(self, bus_session: BusSession) -> str:
        url = reverse("admin:jobs_job_changelist")
        return format_html('<a href="{}?lease_session={}">running jobs</a>', url, bus_session.session)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: BusSession | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: BusSession | None = None) -> bool:
        return False
